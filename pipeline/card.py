"""The dataset card (README.md with the YAML header the hub reads) of a published population.

The card is a `huggingface_hub.DatasetCard`; its YAML header is a `DatasetCardData` holding the
license, tags, the parquet `configs` and the `dataset_info` that `datasets` itself writes on
`push_to_hub` (features, and per split `num_bytes` and `num_examples`, written by
`datasets.info.DatasetInfosDict.to_dataset_card_data`), so `datasets.load_dataset` reads the
header whole, without a warning.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from lol_models.published import COLUMNS, LAYOUT_FILE
from pipeline import runtime
from pipeline.manifest import Manifest
from pipeline.score import scorer_id


def _split_rule(seed: int | None) -> str:
    if seed is None:
        return "each group's split a hash of its name alone (the LoL protocol's rule, `lol_models.split_rule`)"
    return f"each group's split drawn from (seed {seed}, group)"

def code_version() -> str:
    version = importlib.metadata.version("lol-pipeline")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


def card_data(manifest: Manifest, dataset, shard_bytes: dict[str, int]):
    """The card's YAML header for `dataset` (split name -> `datasets.Dataset`) whose splits' parquet
    shards hold `shard_bytes[split]` bytes: license, tags, `configs` and `dataset_info` with each
    split's `num_bytes` (its Arrow table's size, as `push_to_hub` records it) and `num_examples`."""
    import datasets
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    data = DatasetCardData(
        license=manifest.publish.license,
        pretty_name=f"{manifest.population.name} LoRA population",
        source_datasets=[manifest.data.source.removeprefix("hf:")] if manifest.data.source.startswith("hf:") else None,
        tags=["lora", "learning-on-loras", "weight-space", manifest.base.kind],
        configs=[{"config_name": "default",
                  "data_files": [{"split": name, "path": f"data/{name}-*.parquet"} for name in dataset]}],
    )
    splits = datasets.SplitDict()
    for name, split in dataset.items():
        splits.add(datasets.SplitInfo(name=name, num_bytes=split.data.nbytes, num_examples=len(split)))
    info = datasets.DatasetInfo(features=next(iter(dataset.values())).features, splits=splits,
                                download_size=sum(shard_bytes.values()),
                                dataset_size=sum(split.num_bytes for split in splits.values()))
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    return data


def dataset_card(manifest: Manifest, dataset, shard_bytes: dict[str, int], layout: dict[str, Any],
                 label_names: dict[str, dict[str, str]], data_provenance: list[tuple[dict[str, Any], int]] | None = None):
    """The card, a `huggingface_hub.DatasetCard` (`.save(path)` writes README.md): the header of
    `card_data`, then what the population is, how to load it, its schema, label statistics and
    provenance. `data_provenance` holds the distinct (provenance, LoRA count) of the training data
    the records name (an `hf:` / `folder:` source's config, revision and fingerprints)."""
    from huggingface_hub import DatasetCard

    data = card_data(manifest, dataset, shard_bytes)
    lines = ["---", data.to_yaml(), "---", "",
             f"# {manifest.population.name}", "",
             manifest.population.description or "A population of LoRA finetunes.", "",
             f"{sum(len(s) for s in dataset.values())} LoRAs of `{manifest.base.ref}` "
             f"({manifest.base.kind}), rank {sorted({int(r) for s in dataset.values() for r in s['rank']})}, "
             f"targets {', '.join(manifest.lora.target_modules)}. One row per LoRA, with its weights, "
             "hyperparameters, training-data descriptor and labels.", "",
             "## Load it", "", "```python", "import datasets",
             "ds = datasets.load_dataset(PATH_OR_REPO)            # plain Hugging Face datasets",
             "# or, as tensors for Learning-on-LoRAs models:",
             "from lol_models.data import pull",
             "train = pull(PATH_OR_REPO, split='train')", "```", "",
             f"`weights` holds each LoRA's factors as one float32 vector; `{LAYOUT_FILE}` gives, per module, the",
             f"offsets of `lora_A` (r_max × in) and `lora_B` (out × r_max), r_max = {layout['max_rank']}, "
             f"{layout['size']} floats per row; rows of lower rank are zero-padded.", "",
             "## Schema", "", "| column | type | meaning |", "|---|---|---|"]
    for feature in data.dataset_info["features"]:
        name = feature["name"]
        kind = feature.get("dtype") or f"list<{feature.get('list')}>" + (f"[{feature['length']}]" if "length" in feature else "")
        meaning = COLUMNS.get(name) or (
            f"label `{label_names[name]['label']}` from scorer `{label_names[name]['scorer_id']}`" if name in label_names else "")
        lines.append(f"| `{name}` | {kind} | {meaning} |")
    lines += ["", "## Label statistics", "", "| label | split | mean | std | n |", "|---|---|---|---|---|"]
    for column in sorted(label_names):
        for name, split in dataset.items():
            values = np.asarray(split[column], dtype=float)
            lines.append(f"| `{column}` | {name} | {values.mean():.4g} | {values.std():.4g} | {len(values)} |")
    manifest_hash = hashlib.sha256(manifest.canonical_json().encode()).hexdigest()[:12]
    lines += ["", "## Provenance", "",
              f"- manifest: `{manifest.population.name}` v{manifest.population.version}, canonical hash `{manifest_hash}` (copy in `manifest.yaml`)",
              f"- base: `{manifest.base.ref}` revision `{manifest.base.revision or 'n/a'}`",
              *_data_lines(manifest, data_provenance or []),
              f"- splits: group-disjoint, fractions {dict(manifest.publish.splits)}, " + _split_rule(manifest.publish.split_seed),
              f"- code: lol-pipeline {code_version()}",
              "- libraries: " + ", ".join(f"{p} {v}" for p, v in runtime.versions("torch", "diffusers", "transformers", "peft", "datasets").items()),
              "- scorers:"]
    for spec in manifest.scorers:
        lines.append(f"  - `{scorer_id(spec)}`: `{json.dumps(spec.model_dump(mode='json'), sort_keys=True)}`")
    lines += ["", f"License: {manifest.publish.license}.", ""]
    return DatasetCard("\n".join(lines))


def _data_lines(manifest: Manifest, provenance: list[tuple[dict[str, Any], int]]) -> list[str]:
    """`- data: …` with the source's config, revision, split and per-config fingerprint and row count."""
    data = manifest.data
    if not provenance:
        return [f"- data: `{data.source}`, split `{data.split}`" + (" (built in)" if ":" not in data.source else "")]
    lines = []
    for entry, count in provenance:
        configs = ", ".join(entry.get("config") or []) or "default"
        fingerprints = ", ".join(f"{c}: `{fp}` ({(entry.get('num_rows') or {}).get(c, '?')} rows)"
                                 for c, fp in sorted((entry.get("fingerprints") or {}).items()))
        content = ", ".join(f"{c}: `{v}`" for c, v in sorted((entry.get("content") or {}).items()) if v)
        lines.append(f"- data: `{entry.get('source', data.source)}` config {configs}, revision `{entry.get('revision') or 'n/a'}`, "
                     f"split `{entry.get('split', data.split)}`; fingerprints {fingerprints or 'n/a'}"
                     + (f"; content {content}" if content else "")
                     + (f" — {count} LoRAs" if len(provenance) > 1 else ""))
    return lines

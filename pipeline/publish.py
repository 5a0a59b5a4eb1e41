"""Publish a population as a Hugging Face dataset: one row per verified, scored LoRA.

The published folder is laid out as a hub dataset repo::

    {store}/published/{population}/
        README.md                          # dataset card: YAML header (configs, splits, features, license)
        data/{split}-{sha12}.parquet       # parquet shards, named by content (so pushes append)
        arrow/                             # the same splits, `save_to_disk` (memory-mapped on load)
        layout.json                        # how the flat weight vector maps to peft tensors
        labels.json                        # label column -> scorer id, scorer, original label name
        manifest.yaml                      # the manifest as run

Weights: every row holds one fixed-size float32 vector `weights` (an Arrow FixedSizeList),
so a split loads as an (N, D) array without per-row parsing. `layout.json` lists, for each
LoRA module in order, `in`/`out` sizes and the offsets of its `lora_A` (r_max × in) and
`lora_B` (out × r_max) blocks; rows of rank r < r_max are zero-padded (which leaves every
B·A unchanged) and the `rank` column says how much to keep. `row_to_adapter` rebuilds the
exact peft adapter files from a row.

Splits are group-disjoint: a LoRA's group is its identity group, its set of classes or its
set of sources; each group goes to a split by a hash of (split_seed, group) against the
manifest's fractions, so adding LoRAs never moves old ones between splits. The folder is
written under `published/.versions/` and `published/{population}` is a symlink swapped
atomically: readers see the old version or the new, and a killed publish leaves the old.

Nothing is published from a damaged store: if any planned LoRA fails verification (or its
score does, or a job holds files without a record), publishing stops and names them. Adapter
weights are read with `pipeline.safe_weights` (safetensors, checked; pickle only when
trusted); a LoRA holding NaN/Inf weights is left out and listed with its count.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.jobs import Job, canonical_json, expand, unit_draw
from pipeline.manifest import Manifest
from pipeline.score import scorer_id
from storage import Store, StoreError

LAYOUT_VERSION = 1
PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"  # what peft wrote before safetensors; read only when trusted
ADAPTER_CONFIG = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20
ROWS_PER_SHARD = 1000
MAX_SHARD_BYTES = 256 << 20  # a parquet shard holds at most this many bytes of weights (fewer rows for big LoRAs)
BATCH_BYTES = 64 << 20  # weights of the rows written to Arrow at once
# Float weights do not compress and dictionary encoding only slows them down.
PARQUET_OPTIONS = {"compression": "none", "use_dictionary": False, "write_statistics": False}


class PublishError(ValueError):
    """The population cannot be published as asked; names the rows or files at fault."""


@dataclass
class PublishSummary:
    folder: str
    rows: dict[str, int]
    excluded: dict[str, str] = field(default_factory=dict)  # job_id -> why it is not published
    pushed: bool = False
    message: str = ""


# ---------------------------------------------------------------- groups and splits


def group_key(job: Job) -> str:
    """The finetuning group of a job: no group ever appears in two splits."""
    data = job.spec.data
    if data["kind"] == "identity_groups":
        return f"group:{data['group']}"
    if data["kind"] == "class_subsets":
        return "classes:" + "|".join(sorted(data["classes"]))
    if data["kind"] == "source_subsets":
        return "sources:" + "|".join(sorted(data["sources"]))
    raise PublishError(f"job {job.job_id} has an unknown data kind {data['kind']!r}")


def split_of(group: str, fractions: dict[str, float], seed: int) -> str:
    u = unit_draw(seed, 0, f"split:{group}")
    edge = 0.0
    for name in ("train", "validation", "test"):
        edge += fractions.get(name, 0.0)
        if u < edge:
            return name
    return "train" if fractions.get("train") else next(n for n, f in fractions.items() if f > 0)


# ---------------------------------------------------------------- weights


def read_adapter(store: Store, rel: str, trust_remote_pickle: bool = False):
    """(Weights, adapter_config) of a stored peft adapter folder, read with `safe_weights`.

    NaN/Inf values are counted, not refused (`Weights.non_finite`): the caller decides.
    """
    from pipeline.safe_weights import load_weights

    name = _adapter_weights_name(store, rel)
    weights = load_weights(store.read_bytes(f"{rel}/{name}"), f"{rel}/{name}", non_finite="count",
                           trust_remote_pickle=trust_remote_pickle)
    return weights, read_adapter_config(store, rel)


def _adapter_weights_name(store: Store, rel: str) -> str:
    """The weights file of the adapter folder `rel` (safetensors, else a pickle), its sizes checked."""
    from pipeline.safe_weights import max_file_bytes

    names = store.list_dir(rel)
    name = ADAPTER_WEIGHTS if ADAPTER_WEIGHTS in names else ADAPTER_PICKLE if ADAPTER_PICKLE in names else None
    if name is None or ADAPTER_CONFIG not in names:
        raise PublishError(f"{rel} is not a peft adapter folder: it needs {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}, "
                           f"it holds: {', '.join(names) or 'nothing'}")
    if store.size(f"{rel}/{name}") > max_file_bytes() or store.size(f"{rel}/{ADAPTER_CONFIG}") > MAX_CONFIG_BYTES:
        raise PublishError(f"{rel}: the adapter files are larger than any LoRA's")
    return name


def read_adapter_config(store: Store, rel: str) -> dict[str, Any]:
    """The adapter_config.json of the adapter folder `rel`, as a dict."""
    try:
        config = json.loads(store.read_bytes(f"{rel}/{ADAPTER_CONFIG}"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PublishError(f"{rel}/{ADAPTER_CONFIG} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise PublishError(f"{rel}/{ADAPTER_CONFIG} holds a JSON {type(config).__name__}, not an object")
    return config


def module_factors(tensors: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module name -> (lora_A (r, in), lora_B (out, r)) from peft's saved keys."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise PublishError(f"unexpected tensor {key!r} in a LoRA adapter (expected …lora_A.weight / …lora_B.weight)")
        modules.setdefault(match.group(1), {})[match.group(2)] = value
    incomplete = [name for name, parts in modules.items() if set(parts) != {"A", "B"}]
    if incomplete:
        raise PublishError(f"modules without both lora_A and lora_B: {incomplete[:5]}")
    return {name: (parts["A"], parts["B"]) for name, parts in sorted(modules.items())}


def check_factor_shapes(factors: dict[str, tuple[np.ndarray, np.ndarray]], rank: int, job_id: str) -> None:
    """PublishError unless every module is lora_A (rank, in) and lora_B (out, rank) with in, out ≥ 1.

    Checked before anything is allocated from these shapes: a header may declare any shape for a
    zero-byte tensor (e.g. lora_A of [2**40, 0]), and the layout's size is computed from them.
    """
    for name, (a, b) in factors.items():
        ok = (a.ndim == 2 and b.ndim == 2 and a.shape[0] == rank and b.shape[1] == rank
              and a.shape[1] >= 1 and b.shape[0] >= 1)
        if not ok:
            raise PublishError(f"job {job_id}: module {name} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
                               f"its spec's rank {rank} needs lora_A [{rank}, in] and lora_B [out, {rank}] with in, out ≥ 1 "
                               "— the adapter is not this job's; `lol finetune` retrains it once it is removed")


def make_layout(factors: dict[str, tuple[np.ndarray, np.ndarray]], max_rank: int) -> dict[str, Any]:
    modules, offset = [], 0
    for name, (a, b) in factors.items():
        n_in, n_out = a.shape[1], b.shape[0]
        modules.append({"name": name, "in": int(n_in), "out": int(n_out), "a_offset": offset,
                        "b_offset": offset + max_rank * n_in})
        offset += max_rank * (n_in + n_out)
    return {"layout_version": LAYOUT_VERSION, "max_rank": max_rank, "size": offset, "modules": modules,
            "scale": "U = lora_B * alpha / rank; V = lora_A^T", "peft_prefix": PEFT_PREFIX}


def flatten(factors: dict[str, tuple[np.ndarray, np.ndarray]], layout: dict[str, Any]) -> np.ndarray:
    """One LoRA's tensors as the layout's (D,) float32 vector, rank zero-padded."""
    vector = np.zeros(layout["size"], dtype=np.float32)
    r_max = layout["max_rank"]
    names = [m["name"] for m in layout["modules"]]
    if list(factors) != names:
        raise PublishError(f"LoRA modules {list(factors)[:3]}… differ from the population's layout {names[:3]}…")
    for module in layout["modules"]:
        a, b = factors[module["name"]]
        rank = a.shape[0]
        if a.shape[1] != module["in"] or b.shape[0] != module["out"]:
            raise PublishError(f"module {module['name']}: shapes {a.shape}/{b.shape} differ from the layout")
        block_a = np.zeros((r_max, module["in"]), np.float32)
        block_a[:rank] = a
        block_b = np.zeros((module["out"], r_max), np.float32)
        block_b[:, :rank] = b
        vector[module["a_offset"]:module["a_offset"] + block_a.size] = block_a.ravel()
        vector[module["b_offset"]:module["b_offset"] + block_b.size] = block_b.ravel()
    return vector


def unflatten(vector: np.ndarray, layout: dict[str, Any], rank: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    r_max = layout["max_rank"]
    out = {}
    for module in layout["modules"]:
        a = vector[module["a_offset"]:module["a_offset"] + r_max * module["in"]].reshape(r_max, module["in"])
        b = vector[module["b_offset"]:module["b_offset"] + module["out"] * r_max].reshape(module["out"], r_max)
        out[module["name"]] = (a[:rank].copy(), b[:, :rank].copy())
    return out


def row_to_adapter(row: dict[str, Any], layout: dict[str, Any], out_dir: str | Path) -> Path:
    """Write the peft adapter (adapter_config.json + adapter_model.safetensors) a row holds.

    Rows and layouts come from published datasets (outside data): the layout, the row's width,
    rank and config are checked first, and a row with NaN/Inf weights is refused.
    """
    from safetensors.numpy import save_file

    from lol_models.data import check_layout

    check_layout(layout)
    vector = np.asarray(row["weights"], dtype=np.float32)
    rank, config_text = row.get("rank"), row.get("adapter_config")
    if vector.shape != (layout["size"],):
        raise PublishError(f"row {row.get('job_id')!r}: {vector.size} weights, but the layout describes {layout['size']}")
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or not 1 <= rank <= layout["max_rank"]:
        raise PublishError(f"row {row.get('job_id')!r}: rank {rank!r} is not in 1..{layout['max_rank']}")
    if not np.isfinite(vector).all():
        raise PublishError(f"row {row.get('job_id')!r}: {int((~np.isfinite(vector)).sum())} NaN/Inf weight value(s)")
    try:
        config = json.loads(config_text) if isinstance(config_text, str) and len(config_text) <= MAX_CONFIG_BYTES else None
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise PublishError(f"row {row.get('job_id')!r}: adapter_config is not a JSON object")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in unflatten(vector, layout, int(rank)).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / ADAPTER_CONFIG).write_text(config_text)
    return out_dir


# ---------------------------------------------------------------- assembling rows


def label_column(scorer: str, label: str) -> str:
    return f"{scorer}.{re.sub(r'[^A-Za-z0-9]+', '_', label).strip('_')}"


@dataclass
class Assembled:
    """What a publish writes, before any weights are read: one metadata row per LoRA (no weights,
    each with its split), the layout of the weight vector, the label columns, and the jobs left
    out with why. Weights are read row by row while the folder is written (`weighted_rows`), so
    memory does not grow with the population."""

    rows: list[dict[str, Any]]
    layout: dict[str, Any]
    label_names: dict[str, dict[str, str]]
    excluded: dict[str, str]
    adapters: dict[str, str]  # job_id -> the adapter folder's store path
    ranks: dict[str, int]  # job_id -> the rank its spec trains


def assemble(manifest: Manifest, store: Store, trust_remote_pickle: bool = False) -> Assembled:
    """Every publishable LoRA's row (without weights), the layout, label columns and exclusions.

    Raises PublishError if any planned LoRA is damaged (see `refuse_damage`). The layout comes
    from the first row's adapter (its module shapes, checked against its spec's rank) and the
    largest rank of the rows; every other adapter is checked against it when it is read.
    """
    population = store.population(manifest.population.name)
    refuse_damage(manifest, population)
    scorers = [(spec.name, scorer_id(spec)) for spec in manifest.scorers]
    excluded: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    adapters: dict[str, str] = {}
    ranks: dict[str, int] = {}
    label_names: dict[str, dict[str, str]] = {}
    for job in expand(manifest):
        record = population.record(job.job_id)
        if record is None:
            failure = population.failure(job.job_id)
            excluded[job.job_id] = f"failed: {failure['reason']}" if failure else "not finetuned yet"
            continue
        labels, missing = {}, []
        for name, sid in scorers:
            score = population.read_score(job.job_id, sid)
            if score is None:
                missing.append(sid)
                continue
            for label, value in score["labels"].items():
                column = label_column(name, label)
                label_names.setdefault(column, {"scorer": name, "scorer_id": sid, "label": label})
                labels[column] = value
        if missing:
            excluded[job.job_id] = f"not scored by {', '.join(missing)}"
            continue
        adapters[job.job_id] = population.job_rel(job.job_id, "adapter")
        ranks[job.job_id] = job.spec.rank
        config = read_adapter_config(store, adapters[job.job_id])
        spec = job.spec
        rows.append({
            "job_id": job.job_id, "population": job.population, "index": job.index,
            "base_ref": spec.base["ref"], "base_revision": spec.base.get("revision") or "",
            "rank": spec.rank, "alpha": spec.alpha, "target_modules": list(spec.target_modules),
            "lora_dropout": spec.lora_dropout, "seed": spec.seed,
            "hyperparameters": canonical_json(spec.hyperparameters), "data": canonical_json(spec.data),
            "group": group_key(job), "adapter_config": json.dumps(config, sort_keys=True),
            **labels,
        })
    if not rows:
        reasons = sorted(set(excluded.values()))[:5]
        raise PublishError(f"population {manifest.population.name!r} has no verified, scored LoRA to publish "
                           f"({len(excluded)} planned; e.g. {'; '.join(reasons)}); run `lol finetune` and `lol score` first")
    gaps = {column: [r["job_id"] for r in rows if column not in r] for column in label_names}
    gaps = {c: ids for c, ids in gaps.items() if ids}
    if gaps:
        column, ids = next(iter(gaps.items()))
        raise PublishError(f"label {column!r} is missing from {len(ids)} row(s), e.g. {ids[:5]}; rescore those LoRAs")
    first = rows[0]["job_id"]
    weights, _ = read_adapter(store, adapters[first], trust_remote_pickle)
    factors = module_factors(weights.tensors)
    check_factor_shapes(factors, ranks[first], first)
    layout = make_layout(factors, max(ranks.values()))
    fractions = dict(manifest.publish.splits)
    for row in rows:
        row["split"] = split_of(row["group"], fractions, manifest.publish.split_seed)
    return Assembled(rows, layout, label_names, excluded, adapters, ranks)


def weighted_rows(assembled: Assembled, store: Store, rows: list[dict[str, Any]],
                  trust_remote_pickle: bool = False) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """(row, its (D,) float32 weight vector) for each of `rows`, one adapter read at a time; a LoRA
    holding NaN/Inf weights is skipped and added to `assembled.excluded` with its count."""
    for row in rows:
        job_id = row["job_id"]
        weights, _ = read_adapter(store, assembled.adapters[job_id], trust_remote_pickle)
        if weights.non_finite:
            assembled.excluded[job_id] = f"{weights.non_finite_total} NaN/Inf weight value(s)"
            continue
        factors = module_factors(weights.tensors)
        check_factor_shapes(factors, assembled.ranks[job_id], job_id)
        try:
            yield row, flatten(factors, assembled.layout)
        except PublishError as exc:
            raise PublishError(f"job {job_id}: {exc}; every LoRA of a population adapts the same base "
                               f"(the layout is job {assembled.rows[0]['job_id']}'s)") from None


def refuse_damage(manifest: Manifest, population) -> None:
    """PublishError naming every planned job whose LoRA, scores or files are damaged.

    Publishing around damage would silently drop those LoRAs (or their labels) from the
    dataset; the repair is a rerun (`lol finetune` retrains them, `lol score` relabels them).
    """
    damaged = {job.job_id: found for job in expand(manifest) if (found := population.damage(job.job_id))}
    if damaged:
        examples = "; ".join(str(p) for problems in list(damaged.values())[:3] for p in problems[:1])
        raise PublishError(f"{len(damaged)} stored LoRA(s) of {manifest.population.name!r} are damaged, so nothing was "
                           f"published: {examples}. `lol verify` lists every problem; `lol finetune` then `lol score` repair them")


# ---------------------------------------------------------------- writing


def in_memory_dataset(rows: list[dict[str, Any]], weights: np.ndarray):
    """A published split held in memory: `rows` (dicts of columns) with their (N, D) float32
    `weights` as the fixed-size `weights` column — the schema `publish_population` streams to
    disk (small populations and tests)."""
    import datasets
    import pyarrow as pa

    table = pa.table({key: [row[key] for row in rows] for key in rows[0]})
    flat = pa.array(np.ascontiguousarray(weights, np.float32).reshape(-1), type=pa.float32())
    return datasets.Dataset(table.append_column("weights", pa.FixedSizeListArray.from_arrays(flat, weights.shape[1])))


def _metadata_table(rows: list[dict[str, Any]]):
    """The rows' columns (no weights) as one Arrow table: its types are the published schema's."""
    import pyarrow as pa

    return pa.table({key: [row[key] for row in rows] for key in rows[0]})


def _record_batch(rows: list[dict[str, Any]], vectors: list[np.ndarray], schema):
    import pyarrow as pa

    columns = [pa.array([row[field.name] for row in rows], type=field.type) for field in schema if field.name != "weights"]
    flat = pa.array(np.concatenate(vectors), type=pa.float32())
    columns.append(pa.FixedSizeListArray.from_arrays(flat, len(vectors[0])))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


class _SplitWriter:
    """Streams one split's record batches into `save_to_disk`-format Arrow shards (rolled over at
    MAX_SHARD_BYTES) and parquet shards of `rows_per_shard` rows (named by their sha256), holding
    at most one parquet shard's rows in memory and never mapping what it wrote."""

    def __init__(self, folder: Path, name: str, schema, rows_per_shard: int):
        self.folder, self.name, self.schema, self.rows_per_shard = folder, name, schema, rows_per_shard
        self.arrow_dir = folder / "arrow" / name
        self.arrow_dir.mkdir(parents=True)
        self.arrow_files: list[Path] = []
        self.parquet_files: list[str] = []
        self._sink = self._writer = None
        self._arrow_bytes = 0
        self._pending: list = []
        self._pending_rows = 0
        self.rows = 0

    def write(self, batch) -> None:
        if self._writer is None or self._arrow_bytes >= MAX_SHARD_BYTES:
            self._close_arrow()
            import pyarrow as pa

            self.arrow_files.append(self.arrow_dir / f".shard-{len(self.arrow_files):05d}.arrow")
            self._sink = pa.OSFile(str(self.arrow_files[-1]), "wb")
            self._writer = pa.ipc.new_stream(self._sink, self.schema)
            self._arrow_bytes = 0
        self._writer.write_batch(batch)
        self._arrow_bytes += batch.nbytes
        self.rows += batch.num_rows
        start = 0
        while start < batch.num_rows:  # parquet shards hold exactly rows_per_shard rows (the last fewer)
            take = min(batch.num_rows - start, self.rows_per_shard - self._pending_rows)
            self._pending.append(batch.slice(start, take))
            self._pending_rows += take
            start += take
            if self._pending_rows == self.rows_per_shard:
                self._flush_parquet()

    def close(self) -> None:
        """Finish the shards: the last parquet shard, then the Arrow shards named as `save_to_disk` names them."""
        if self._pending_rows:
            self._flush_parquet()
        self._close_arrow()
        count = len(self.arrow_files)
        for index, path in enumerate(self.arrow_files):
            path.rename(self.arrow_dir / f"data-{index:05d}-of-{count:05d}.arrow")
        self.arrow_files = [self.arrow_dir / f"data-{i:05d}-of-{count:05d}.arrow" for i in range(count)]

    def _close_arrow(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        (self.folder / "data").mkdir(exist_ok=True)
        part = self.folder / "data" / f".{self.name}-part.parquet"
        pq.write_table(pa.Table.from_batches(self._pending, schema=self.schema), part, **PARQUET_OPTIONS)
        path = f"data/{self.name}-{_file_sha256(part)[:12]}.parquet"
        part.rename(self.folder / path)
        self.parquet_files.append(path)
        self._pending, self._pending_rows = [], 0


def _write_split(assembled: Assembled, store: Store, rows: list[dict[str, Any]], writer: _SplitWriter,
                 trust_remote_pickle: bool) -> list[dict[str, Any]]:
    """Stream `rows` with their weights through `writer`, a few rows per batch; returns the rows
    written (LoRAs with NaN/Inf weights are left out)."""
    batch_rows = max(1, min(64, BATCH_BYTES // (4 * assembled.layout["size"])))
    written: list[dict[str, Any]] = []
    pending: tuple[list, list] = ([], [])
    for row, vector in weighted_rows(assembled, store, rows, trust_remote_pickle):
        pending[0].append(row)
        pending[1].append(vector)
        written.append(row)
        if len(pending[0]) == batch_rows:
            writer.write(_record_batch(*pending, writer.schema))
            pending = ([], [])
    if pending[0]:
        writer.write(_record_batch(*pending, writer.schema))
    writer.close()
    return written


def _write_arrow_metadata(folder: Path, splits: dict[str, _SplitWriter], schema) -> None:
    """`save_to_disk`'s bookkeeping files for the streamed Arrow shards: made by `datasets` itself
    (saving the empty splits with the same features), then pointed at the shards."""
    import datasets

    features = datasets.Features.from_arrow_schema(schema)
    template = folder / "arrow-template"
    datasets.DatasetDict({name: datasets.Dataset.from_dict({key: [] for key in features}, features=features)
                          for name in splits}).save_to_disk(str(template))
    shutil.copyfile(template / "dataset_dict.json", folder / "arrow" / "dataset_dict.json")
    for name, writer in splits.items():
        shutil.copyfile(template / name / "dataset_info.json", writer.arrow_dir / "dataset_info.json")
        state = json.loads((template / name / "state.json").read_text())
        state["_data_files"] = [{"filename": path.name} for path in writer.arrow_files]
        (writer.arrow_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    shutil.rmtree(template)


def write_folder(manifest: Manifest, store: Store, folder: Path, assembled: Assembled,
                 trust_remote_pickle: bool = False) -> dict[str, int]:
    """Write the published folder for `assembled` into `folder`, reading one adapter at a time and
    holding at most one parquet shard (≤ MAX_SHARD_BYTES of weights): memory does not grow with
    the number of LoRAs."""
    import datasets

    size = assembled.layout["size"]
    schema = _schema_of(_metadata_table(assembled.rows), size)  # column types inferred over every row
    rows_per_shard = max(1, min(ROWS_PER_SHARD, MAX_SHARD_BYTES // (4 * size)))
    splits: dict[str, _SplitWriter] = {}
    published: list[dict[str, Any]] = []
    for name in ("train", "validation", "test"):
        rows = [row for row in assembled.rows if row["split"] == name]
        if not rows:
            continue
        writer = _SplitWriter(folder, name, schema, rows_per_shard)
        written = _write_split(assembled, store, rows, writer, trust_remote_pickle)
        if written:
            splits[name] = writer
            published += written
        else:
            shutil.rmtree(writer.arrow_dir)
    if not splits:
        raise PublishError(f"population {manifest.population.name!r} has no LoRA with finite weights to publish; "
                           f"excluded: {'; '.join(sorted(set(assembled.excluded.values()))[:5])}")
    _write_arrow_metadata(folder, splits, schema)
    (folder / "layout.json").write_text(json.dumps(assembled.layout, indent=1) + "\n")
    (folder / "labels.json").write_text(json.dumps(assembled.label_names, indent=1, sort_keys=True) + "\n")
    manifest_rel = store.population(manifest.population.name).rel("manifest.yaml")
    if store.exists(manifest_rel):
        (folder / "manifest.yaml").write_bytes(store.read_bytes(manifest_rel))
    from pipeline.card import dataset_card

    dataset = datasets.load_from_disk(str(folder / "arrow"))  # memory-mapped: the card reads the rank column only
    shards = {name: writer.parquet_files for name, writer in splits.items()}
    (folder / "README.md").write_text(dataset_card(manifest, dataset, shards, assembled.layout, assembled.label_names,
                                                   data_provenance(store, manifest, published)))
    return {name: writer.rows for name, writer in splits.items()}


def _schema_of(metadata, size: int):
    """The published schema (with its `datasets` features) for `metadata`'s columns plus `weights`."""
    import datasets
    import pyarrow as pa

    one = metadata.slice(0, 1).append_column(
        "weights", pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(size, np.float32)), size))
    return datasets.Dataset(one).features.arrow_schema


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_provenance(store: Store, manifest: Manifest, rows) -> list[tuple[dict[str, Any], int]]:
    """The distinct data provenances (source, config, revision, fingerprints) the published LoRAs' records
    hold, each with how many LoRAs trained on it; empty for built-in sources, which record none."""
    population = store.population(manifest.population.name)
    counts: dict[str, int] = {}
    for row in rows:
        record = population.record(row["job_id"]) or {}
        data = (record.get("metrics") or {}).get("data")
        if isinstance(data, dict):
            key = json.dumps(data, sort_keys=True)
            counts[key] = counts.get(key, 0) + 1
    return [(json.loads(key), n) for key, n in sorted(counts.items(), key=lambda kv: -kv[1])]


def published_rel(manifest: Manifest) -> str:
    return f"published/{manifest.population.name}"


def publish_population(manifest: Manifest, store: Store, push: bool | None = None,
                       trust_remote_pickle: bool = False) -> PublishSummary:
    """Assemble, write the folder atomically, and push when a token is set (and `push` allows)."""
    assembled = assemble(manifest, store, trust_remote_pickle)
    rel = published_rel(manifest)
    with tempfile.TemporaryDirectory(prefix="lol-publish-") as tmp:
        staging = Path(tmp) / "folder"
        staging.mkdir()
        counts = write_folder(manifest, store, staging, assembled, trust_remote_pickle)
        _install(store, staging, rel)
    summary = PublishSummary(folder=store.path(rel), rows=counts, excluded=assembled.excluded)
    from pipeline.hub import push_folder, redact, token_from_env

    token = token_from_env()
    if manifest.publish.repo_id and token and push is not False:
        failure = None
        try:
            push_folder(store.local_path(rel) if store.is_local else store.path(rel), manifest.publish.repo_id, token,
                        private=manifest.publish.private)
        except Exception as exc:  # noqa: BLE001 - the hub's errors vary; the local folder is done either way
            failure = redact(f"{type(exc).__name__}: {exc}", token)[:500]
        if failure is not None:  # raised outside the handler: the hub's error (it may echo the token) is not chained
            raise PublishError(f"wrote {summary.folder} locally, but pushing to {manifest.publish.repo_id} failed "
                               f"({failure}); rerun `lol publish` to resume the push")
        summary.pushed, summary.message = True, f"pushed to the hub as {manifest.publish.repo_id}"
    elif manifest.publish.repo_id and not token:
        summary.message = f"wrote {summary.folder} locally; did not push to {manifest.publish.repo_id}: no HF_TOKEN set"
    else:
        summary.message = f"wrote {summary.folder} locally (no publish.repo_id in the manifest, so nothing to push)"
    return summary


def _install(store: Store, staging: Path, rel: str) -> None:
    """Put the staged folder at `rel` atomically.

    Local disks: the folder is copied to `published/.versions/{name}-{id}` and `published/{name}`
    is a symlink swapped with one `os.replace`, so a reader (or a crash) sees the old version or
    the new, never a mix. Versions other than the current one — the previous version, and what
    a killed publish left half-copied — are removed only after the swap. Publishes of one
    population are serialised by a lock, so this cleanup never removes a version in the making.
    Every path is the store's `write_path` (no link between the root and it is followed), so a
    `.versions`, lock or version planted as a link is refused or unlinked, never written through.
    """
    if store.is_local:
        parent, name = rel.rsplit("/", 1)
        versions_rel = f"{parent}/.versions"
        versions = Path(store.write_path(f"{versions_rel}/{name}"))
        if store.is_link(versions_rel):
            raise StoreError(f"{versions_rel!r} is a symbolic link; the store never writes through links — remove it")
        try:
            versions.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StoreError(f"{versions_rel!r} is not a folder; remove what stands there") from None
        with store.lock(f"{parent}/.lock-{name}"):
            version_name = f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
            version = Path(store.write_path(f"{versions_rel}/{version_name}"))
            shutil.copytree(staging, version)
            link = Path(store.write_path(rel))
            if link.exists() and not link.is_symlink():  # a plain folder from elsewhere: keep it aside
                os.rename(link, store.write_path(f"{versions_rel}/{name}-replaced-{uuid.uuid4().hex[:8]}"))
            temporary_link = Path(store.write_path(f"{parent}/.link-{name}-{uuid.uuid4().hex[:8]}"))
            os.symlink(os.path.relpath(version, link.parent), temporary_link)
            os.replace(temporary_link, link)
            _remove_stale(store, parent, name, keep=version_name)
        return
    # Object stores: upload every file, the card last (a reader that finds the card finds the data).
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != "README.md")
    for path in files:
        store.write_bytes(f"{rel}/{path.relative_to(staging).as_posix()}", path.read_bytes())
    store.write_bytes(f"{rel}/README.md", (staging / "README.md").read_bytes())


def _remove_stale(store: Store, parent: str, name: str, keep: str) -> None:
    """Remove every version of population `name` but `keep` (kept-aside folders stay), and the
    temporary links a killed publish left — through `store.delete`, which unlinks links and never
    follows them."""
    ours = re.compile(rf"{re.escape(name)}-\d{{8}}T\d{{6}}-[0-9a-f]{{8}}")  # not another population's
    for entry in store.list_dir(f"{parent}/.versions"):
        if ours.fullmatch(entry) and entry != keep:
            store.delete(f"{parent}/.versions/{entry}")
    for entry in store.list_dir(parent):
        if entry.startswith(f".link-{name}-"):
            store.delete(f"{parent}/{entry}")

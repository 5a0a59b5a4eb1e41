"""`lol export`: one published row back to the peft adapter folder it was made from.

The row is found by its job id in a local published folder (what `lol publish` writes under
`{store}/published/{population}`, or a hub dataset repo downloaded to a folder) and written by
`lol_models.published.row_to_adapter`, the published format's own writer: adapter_config.json as
stored and adapter_model.safetensors with lora_A / lora_B cut back to the row's rank, so
`PeftModel.from_pretrained(base, OUT)` loads it. For LoRAs of a diffusers model (adapter_config's
`auto_mapping` names a diffusers class) the folder also gets `pytorch_lora_weights.safetensors`
(`pipeline.lora_export`), which `pipe.load_lora_weights(OUT)` reads. The folder is written under a
temporary name beside OUT and renamed into place: OUT is whole or absent, never half written.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lol_models.data import read_layout, read_rows, split_names
from lol_models.published import row_to_adapter
from storage import DomainError

__all__ = ["ExportError", "ExportResult", "export_row"]

README = "README.md"


class ExportError(DomainError):
    """An export that cannot be done as asked: no such job id in the dataset, or an OUT that is in use."""


@dataclass
class ExportResult:
    out: Path
    job_id: str
    split: str
    population: str
    base_ref: str
    base_revision: str
    rank: int
    alpha: float
    files: list[str]
    diffusers: bool
    labels: dict[str, Any] = field(default_factory=dict)


def is_diffusers_adapter(config: dict[str, Any]) -> bool:
    """Whether peft wrapped a diffusers model (a UNet) when it saved this adapter."""
    mapping = config.get("auto_mapping") or {}
    return isinstance(mapping, dict) and str(mapping.get("parent_library", "")).startswith("diffusers")


def _check_out(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"{out} exists and is not a folder; give the path of a new (or empty) folder")
    if out.is_dir() and any(out.iterdir()):
        held = sorted(p.name for p in out.iterdir())
        raise ExportError(f"{out} exists and is not empty (it holds {', '.join(held[:5])}{' …' if len(held) > 5 else ''}); "
                          "export never overwrites: give a new or empty folder")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent} does not exist; create it, or give OUT inside an existing folder")


def _find(folder: Path, job_id: str) -> tuple[dict[str, Any], str]:
    splits = split_names(folder)
    for split in splits:
        rows = read_rows(folder, split, job_ids=[job_id])
        if rows:
            return rows[0], split
    ids = sorted(row["job_id"] for split in splits for row in read_rows(folder, split, columns=["job_id"]))
    near = [i for i in ids if i.startswith(job_id[:6])] if len(job_id) >= 6 else []
    hint = f"did you mean {', '.join(near[:3])}? " if near else ""
    raise ExportError(f"no LoRA {job_id!r} in {folder} ({len(ids)} rows in {', '.join(splits)}); {hint}its job ids are "
                      f"e.g. {', '.join(ids[:3])} — all of them: python -c \"import datasets; d = datasets.load_dataset("
                      f"'{folder}'); print({{s: list(d[s]['job_id']) for s in d}})\"")


def export_row(dataset: str | Path, job_id: str, out: str | Path, diffusers: bool | None = None) -> ExportResult:
    """Write the published row `job_id` of `dataset` as the peft adapter folder `out` (new or empty);
    diffusers=None writes the diffusers file exactly for adapters of a diffusers model."""
    from pipeline.lora_export import write_diffusers_lora

    folder, out = Path(dataset).expanduser(), Path(out).expanduser()
    if not folder.is_dir():
        there = sorted(p.name for p in folder.parent.iterdir())[:10] if folder.parent.is_dir() else []
        raise ExportError(f"no published dataset folder at {dataset} ({folder.parent} holds: {', '.join(there) or 'nothing'}); "
                          "`lol publish MANIFEST` writes one as {store}/published/{population}; for a hub dataset, "
                          "`hf download --repo-type dataset ID --local-dir DIR` first")
    layout, label_info = read_layout(folder)  # a PulledDataError lists what the folder holds when it is not a published dataset
    _check_out(out)
    row, split = _find(folder, job_id)
    config = json.loads(row["adapter_config"]) if isinstance(row.get("adapter_config"), str) else {}
    write_diffusers = is_diffusers_adapter(config) if diffusers is None else diffusers
    staging = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"
    try:
        row_to_adapter(row, layout, staging)
        if write_diffusers:
            write_diffusers_lora(staging, staging)
        labels = {k: row[k] for k in sorted(label_info) if k in row}
        (staging / README).write_text(_readme(row, split, labels, write_diffusers))
        if out.is_dir():
            out.rmdir()  # empty (checked): replaced by the finished folder
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out, job_id, split, str(row.get("population", "")), str(row.get("base_ref", "")),
                        str(row.get("base_revision") or ""), int(row["rank"]), float(row["alpha"]),
                        sorted(p.name for p in out.iterdir()), write_diffusers, labels)


def _readme(row: dict[str, Any], split: str, labels: dict[str, Any], diffusers: bool) -> str:
    lines = [f"# LoRA {row['job_id']} of {row.get('population', '?')}", "",
             f"Exported from the published dataset (split {split}) by `lol export`.", "",
             f"- base: `{row.get('base_ref')}`" + (f" @ {row['base_revision']}" if row.get("base_revision") else ""),
             f"- rank {row['rank']}, alpha {row['alpha']}, target modules {', '.join(row.get('target_modules') or [])}",
             *(f"- {name}: {value}" for name, value in sorted(labels.items())), "",
             "```python", "from peft import PeftModel", "model = PeftModel.from_pretrained(base_model, THIS_FOLDER)"]
    if diffusers:
        lines += ["# or, with diffusers: pipe.load_lora_weights(THIS_FOLDER)  # reads pytorch_lora_weights.safetensors"]
    return "\n".join(lines + ["```", ""])

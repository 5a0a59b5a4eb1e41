"""Read a published LoRA population (a hub id or a local folder) as tensors for LoL models.

The published format (written by `lol publish`) is the contract; this module never imports
the pipeline. Each row holds a fixed-size float32 vector `weights`; `layout.json` says where
each module's `lora_A` (r_max × in) and `lora_B` (out × r_max) blocks sit, and the row's
`rank` and `alpha` give the scale, so that per module i

    U_i = lora_B_i · alpha / rank   (out × r_max)     V_i = lora_A_iᵀ   (in × r_max)

and U_i V_iᵀ = ΔW_i (the zero-padded rank columns add nothing).

`pull(...)` memory-maps the Arrow files of a local folder (`arrow/`, `save_to_disk`) or loads
a hub dataset with `datasets.load_dataset`; `stream(...)` walks parquet shards batch by batch
with bounded memory, for populations larger than memory.

Shapes: N LoRAs, D floats per LoRA, T targets.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lol_models.weights import LoraWeights

META_COLUMNS = ("job_id", "population", "index", "base_ref", "base_revision", "rank", "alpha", "target_modules",
                "lora_dropout", "seed", "hyperparameters", "data", "group", "adapter_config", "split", "weights")


class PulledDataError(ValueError):
    """A published dataset that cannot be read: missing files, unknown split, bad layout."""


@dataclass
class LoraDataset(torch.utils.data.Dataset):
    """One split of a published population: weights for all N LoRAs, labels, row metadata."""

    weights: LoraWeights  # batch of N
    labels: dict[str, Tensor]  # label column -> (N,)
    job_ids: list[str]
    groups: list[str]
    ranks: Tensor  # (N,)
    label_info: dict[str, dict[str, str]]

    def __len__(self) -> int:
        return len(self.job_ids)

    def __getitem__(self, index: int) -> tuple[LoraWeights, dict[str, Tensor]]:
        return self.weights.index([index]), {k: v[index] for k, v in self.labels.items()}

    @property
    def label_names(self) -> list[str]:
        return sorted(self.labels)

    def targets(self, names: Sequence[str]) -> Tensor:
        """(N, T) float targets; unknown names list the known ones."""
        unknown = [n for n in names if n not in self.labels]
        if unknown:
            raise PulledDataError(f"unknown target(s) {unknown}; labels of this dataset: {', '.join(self.label_names)}")
        return torch.stack([self.labels[n].float() for n in names], dim=1)


def _is_local(repo_or_path: str | Path) -> bool:
    """A folder (existing, or written as a path) rather than a hub id like `namespace/name`."""
    text = str(repo_or_path)
    return isinstance(repo_or_path, Path) or Path(text).exists() or text.startswith(("/", ".", "~")) or text.count("/") > 1


def read_layout(repo_or_path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(layout, label info) of a published folder or hub dataset repo."""
    if _is_local(repo_or_path):
        folder = Path(repo_or_path)
        if not folder.is_dir():
            raise PulledDataError(f"no published dataset at {folder}: the folder does not exist (run `lol publish` first)")
        missing = [f for f in ("layout.json", "labels.json") if not (folder / f).is_file()]
        if missing:
            there = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
            raise PulledDataError(f"{folder} is not a published LoRA dataset: missing {', '.join(missing)} (it holds: {there})")
        return json.loads((folder / "layout.json").read_text()), json.loads((folder / "labels.json").read_text())
    from huggingface_hub import hf_hub_download

    layout = json.loads(Path(hf_hub_download(str(repo_or_path), "layout.json", repo_type="dataset")).read_text())
    labels = json.loads(Path(hf_hub_download(str(repo_or_path), "labels.json", repo_type="dataset")).read_text())
    return layout, labels


def factors_from_flat(flat: np.ndarray | Tensor, layout: dict[str, Any], alpha: Tensor, rank: Tensor) -> LoraWeights:
    """(N, D) flat rows → LoraWeights with U = lora_B·alpha/rank, V = lora_Aᵀ per module."""
    flat = torch.as_tensor(flat)
    n_rows, r_max = flat.shape[0], layout["max_rank"]
    scale = (alpha.to(flat.dtype) / rank.to(flat.dtype)).view(n_rows, 1, 1)
    names, us, vs = [], [], []
    for module in layout["modules"]:
        a = flat[:, module["a_offset"]:module["a_offset"] + r_max * module["in"]].view(n_rows, r_max, module["in"])
        b = flat[:, module["b_offset"]:module["b_offset"] + module["out"] * r_max].view(n_rows, module["out"], r_max)
        names.append(module["name"])
        us.append(b * scale)  # (N, out, r_max)
        vs.append(a.transpose(1, 2))  # (N, in, r_max)
    return LoraWeights.from_layers(names, us, vs)


def _weights_matrix(table) -> np.ndarray:
    """(N, D) float32 view of an Arrow `weights` FixedSizeList column (no per-row parsing)."""
    chunks = table.column("weights").chunks
    column = chunks[0] if len(chunks) == 1 else table.column("weights").combine_chunks()
    width = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=column.null_count == 0)
    return values.reshape(len(column), width)


def pull(repo_or_path: str | Path, split: str = "train") -> LoraDataset:
    """One split of a published population as tensors (memory-mapped for local folders)."""
    import datasets

    layout, label_info = read_layout(repo_or_path)
    if _is_local(repo_or_path) and (Path(repo_or_path) / "arrow").is_dir():
        dataset = datasets.load_from_disk(str(Path(repo_or_path) / "arrow"))
        if split not in dataset:
            raise PulledDataError(f"unknown split {split!r}; this dataset has: {', '.join(dataset)}")
        table = dataset[split].data.table
    else:
        try:
            table = datasets.load_dataset(str(repo_or_path), split=split).data.table
        except ValueError as exc:
            raise PulledDataError(f"cannot load split {split!r} of {repo_or_path}: {exc}") from None
    return _from_table(table, layout, label_info)


def _from_table(table, layout: dict[str, Any], label_info: dict[str, Any]) -> LoraDataset:
    if "weights" not in table.column_names:
        raise PulledDataError(f"no `weights` column; columns: {', '.join(table.column_names)}")
    flat = _weights_matrix(table)
    if flat.shape[1] != layout["size"]:
        raise PulledDataError(f"rows hold {flat.shape[1]} floats but layout.json describes {layout['size']}: rows and layout disagree")
    with warnings.catch_warnings():  # memory-mapped Arrow buffers are read-only; we never write to them
        warnings.simplefilter("ignore", UserWarning)
        flat_t = torch.from_numpy(flat)
    rank = torch.as_tensor(table.column("rank").to_numpy())
    alpha = torch.as_tensor(table.column("alpha").to_numpy())
    labels = {name: torch.as_tensor(table.column(name).to_numpy()) for name in label_info if name in table.column_names}
    missing = sorted(set(label_info) - set(labels))
    if missing:
        raise PulledDataError(f"label column(s) {missing} named in labels.json are missing from the rows")
    return LoraDataset(
        weights=factors_from_flat(flat_t, layout, alpha, rank), labels=labels,
        job_ids=table.column("job_id").to_pylist(), groups=table.column("group").to_pylist(),
        ranks=rank, label_info=label_info,
    )


def stream(repo_or_path: str | Path, split: str = "train", batch_size: int = 256) -> Iterator[LoraDataset]:
    """Batches of one split with bounded memory, for populations larger than memory.

    A local folder is read from its Arrow files (`arrow/{split}/*.arrow`), one memory-mapped
    shard at a time (zero-copy; a shard's pages are released when it is closed); a hub dataset
    from its parquet shards, batch by batch.
    """
    import pyarrow as pa

    layout, label_info = read_layout(repo_or_path)
    arrow_files = sorted((Path(repo_or_path) / "arrow" / split).glob("*.arrow")) if _is_local(repo_or_path) else []
    if arrow_files:
        for path in arrow_files:
            try:
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_stream(source).read_all()
                    for start in range(0, table.num_rows, batch_size):
                        yield _from_table(table.slice(start, batch_size), layout, label_info)
                    del table
            except (OSError, pa.ArrowException) as exc:
                raise PulledDataError(f"corrupt Arrow shard {path}: {exc}") from None
        return
    yield from _stream_parquet(repo_or_path, split, batch_size, layout, label_info)


def _stream_parquet(repo_or_path, split: str, batch_size: int, layout, label_info) -> Iterator[LoraDataset]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not _is_local(repo_or_path):
        from huggingface_hub import HfApi, hf_hub_download

        files = [f for f in HfApi().list_repo_files(str(repo_or_path), repo_type="dataset") if f.startswith(f"data/{split}-")]
        shards = [Path(hf_hub_download(str(repo_or_path), f, repo_type="dataset")) for f in files]
    else:
        shards = sorted((Path(repo_or_path) / "data").glob(f"{split}-*.parquet"))
    if not shards:
        raise PulledDataError(f"no parquet shards for split {split!r} in {repo_or_path}")
    for shard in shards:
        try:
            batches = pq.ParquetFile(shard).iter_batches(batch_size=batch_size)
            for batch in batches:
                yield _from_table(pa.Table.from_batches([batch]), layout, label_info)
        except (OSError, pa.ArrowException) as exc:
            raise PulledDataError(f"corrupt parquet shard {shard}: {exc}") from None

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

Published data comes from outside, so it is checked before use: `layout.json` must place
every block inside the row (`check_layout`), JSON files are size-capped, the `weights` column
must be fixed-size float32, and rows holding NaN/Inf weights fail the load — or, with
`non_finite="skip"`, are left out and counted in `LoraDataset.skipped`.

Shapes: N LoRAs, D floats per LoRA, T targets.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lol_models.weights import LoraWeights

MAX_JSON_BYTES = 64 << 20  # layout.json / labels.json of any real population are far smaller
MAX_MODULES = 100_000
NON_FINITE_POLICIES = ("fail", "skip")
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
    skipped: dict[str, int] = field(default_factory=dict)  # job_id -> NaN/Inf count of rows left out

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
        layout_path, labels_path = folder / "layout.json", folder / "labels.json"
    else:
        from huggingface_hub import hf_hub_download

        layout_path = Path(hf_hub_download(str(repo_or_path), "layout.json", repo_type="dataset"))
        labels_path = Path(hf_hub_download(str(repo_or_path), "labels.json", repo_type="dataset"))
    layout, labels = _read_json(layout_path), _read_json(labels_path)
    if not isinstance(labels, dict) or not all(isinstance(v, dict) for v in labels.values()):
        raise PulledDataError(f"{labels_path}: expected an object of label column -> {{scorer, scorer_id, label}}")
    return check_layout(layout), labels


def _read_json(path: Path) -> Any:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise PulledDataError(f"{path} is {path.stat().st_size} bytes; a published dataset's JSON files are far smaller")
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as exc:
        raise PulledDataError(f"{path} is not JSON: {exc}") from None


def check_layout(layout: Any, width: int | None = None) -> dict[str, Any]:
    """A published layout, checked: positive sizes, plain unique names, every module's lora_A
    (r_max × in) and lora_B (out × r_max) block inside the row and no two blocks overlapping."""

    def fail(why: str) -> PulledDataError:
        return PulledDataError(f"layout.json is not a valid LoRA layout: {why}")

    def count(value: Any, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    if not isinstance(layout, dict) or not isinstance(layout.get("modules"), list):
        raise fail("expected an object with a `modules` list")
    size, r_max, modules = layout.get("size"), layout.get("max_rank"), layout["modules"]
    if not count(size, 0) or not count(r_max, 1) or not 1 <= len(modules) <= MAX_MODULES:
        raise fail(f"size {size!r}, max_rank {r_max!r}, {len(modules)} modules")
    if width is not None and width != size:
        raise fail(f"it describes {size} floats per row, the rows hold {width}")
    blocks, names = [], set()
    for module in modules:
        if not isinstance(module, dict):
            raise fail(f"module entry {str(module)[:60]} is not an object")
        name = module.get("name")
        if not isinstance(name, str) or not name or len(name) > 512 or not name.isprintable() or name in names:
            raise fail(f"module name {str(name)[:60]!r} is empty, repeated or not plain text")
        names.add(name)
        n_in, n_out, a_at, b_at = (module.get(k) for k in ("in", "out", "a_offset", "b_offset"))
        if not (count(n_in, 1) and count(n_out, 1) and count(a_at, 0) and count(b_at, 0)):
            raise fail(f"module {name!r}: in/out must be ≥ 1 and offsets ≥ 0, got {n_in!r}, {n_out!r}, {a_at!r}, {b_at!r}")
        blocks += [(a_at, a_at + r_max * n_in, name), (b_at, b_at + n_out * r_max, name)]
    end = 0
    for start, stop, name in sorted(blocks):
        if start < end or stop > size:
            raise fail(f"module {name!r}: block {start}..{stop} overlaps another or passes the row's {size} floats")
        end = stop
    return layout


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
    import pyarrow as pa

    kind = table.schema.field("weights").type
    if not pa.types.is_fixed_size_list(kind) or kind.value_type != pa.float32():
        raise PulledDataError(f"the `weights` column is {kind}, not a fixed-size list of float32")
    chunks = table.column("weights").chunks
    column = chunks[0] if len(chunks) == 1 else table.column("weights").combine_chunks()
    width = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=column.null_count == 0)
    return values.reshape(len(column), width)


def pull(repo_or_path: str | Path, split: str = "train", non_finite: str = "fail") -> LoraDataset:
    """One split of a published population as tensors (memory-mapped for local folders).

    Rows with NaN/Inf weights raise PulledDataError, or with `non_finite="skip"` are left out
    (their job ids and counts in `.skipped`).
    """
    import datasets

    _check_policy(non_finite)
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
    return _from_table(table, layout, label_info, non_finite)


def _check_policy(non_finite: str) -> None:
    if non_finite not in NON_FINITE_POLICIES:
        raise PulledDataError(f"non_finite={non_finite!r}: choose one of {', '.join(NON_FINITE_POLICIES)}")


def non_finite_counts(flat: np.ndarray, chunk_rows: int = 4096) -> np.ndarray:
    """(N,) number of NaN/Inf values per row of an (N, D) matrix, a chunk of rows at a time."""
    counts = np.zeros(flat.shape[0], dtype=np.int64)
    for start in range(0, flat.shape[0], chunk_rows):
        block = flat[start:start + chunk_rows]
        counts[start:start + len(block)] = block.shape[1] - np.count_nonzero(np.isfinite(block), axis=1)
    return counts


def _from_table(table, layout: dict[str, Any], label_info: dict[str, Any], non_finite: str = "fail") -> LoraDataset:
    import pyarrow as pa

    missing_columns = [c for c in ("weights", "rank", "alpha", "job_id", "group") if c not in table.column_names]
    if missing_columns:
        raise PulledDataError(f"no {', '.join(missing_columns)} column(s); columns: {', '.join(table.column_names)}")
    flat = _weights_matrix(table)
    if flat.shape[1] != layout["size"]:
        raise PulledDataError(f"rows hold {flat.shape[1]} floats but layout.json describes {layout['size']}: rows and layout disagree")
    counts = non_finite_counts(flat)
    skipped: dict[str, int] = {}
    if counts.any():
        bad = np.flatnonzero(counts)
        ids = table.column("job_id").to_pylist()
        if non_finite == "fail":
            raise PulledDataError(f"{len(bad)} row(s) hold NaN/Inf weights, e.g. {ids[bad[0]]} ({counts[bad[0]]} values); "
                                  "pass non_finite='skip' (lol pull --non-finite skip) to leave them out")
        skipped = {ids[i]: int(counts[i]) for i in bad}
        table = table.filter(pa.array(counts == 0))
        flat = _weights_matrix(table)
    try:
        with warnings.catch_warnings():  # read-only Arrow buffers, never written to
            warnings.simplefilter("ignore", UserWarning)
            rank = torch.as_tensor(table.column("rank").to_numpy())
            alpha = torch.as_tensor(table.column("alpha").to_numpy())
            labels = {name: torch.as_tensor(table.column(name).to_numpy()) for name in label_info if name in table.column_names}
    except (TypeError, ValueError, RuntimeError, pa.ArrowException) as exc:
        raise PulledDataError(f"rank, alpha and label columns must be numeric: {exc}") from None
    if rank.numel() and (int(rank.min()) < 1 or int(rank.max()) > layout["max_rank"]):
        raise PulledDataError(f"ranks {int(rank.min())}..{int(rank.max())} are outside 1..{layout['max_rank']} (layout.json)")
    with warnings.catch_warnings():  # memory-mapped Arrow buffers are read-only; we never write to them
        warnings.simplefilter("ignore", UserWarning)
        flat_t = torch.from_numpy(flat)
    missing = sorted(set(label_info) - set(labels))
    if missing:
        raise PulledDataError(f"label column(s) {missing} named in labels.json are missing from the rows")
    return LoraDataset(
        weights=factors_from_flat(flat_t, layout, alpha, rank), labels=labels,
        job_ids=table.column("job_id").to_pylist(), groups=table.column("group").to_pylist(),
        ranks=rank, label_info=label_info, skipped=skipped,
    )


def stream(repo_or_path: str | Path, split: str = "train", batch_size: int = 256, non_finite: str = "fail") -> Iterator[LoraDataset]:
    """Batches of one split with bounded memory, for populations larger than memory.

    A local folder is read from its Arrow files (`arrow/{split}/*.arrow`), one memory-mapped
    shard at a time (zero-copy; a shard's pages are released when it is closed); a hub dataset
    from its parquet shards, batch by batch.
    """
    import pyarrow as pa

    _check_policy(non_finite)
    layout, label_info = read_layout(repo_or_path)
    arrow_files = sorted((Path(repo_or_path) / "arrow" / split).glob("*.arrow")) if _is_local(repo_or_path) else []
    if arrow_files:
        for path in arrow_files:
            try:
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_stream(source).read_all()
                    for start in range(0, table.num_rows, batch_size):
                        yield _from_table(table.slice(start, batch_size), layout, label_info, non_finite)
                    del table
            except (OSError, pa.ArrowException) as exc:
                raise PulledDataError(f"corrupt Arrow shard {path}: {exc}") from None
        return
    yield from _stream_parquet(repo_or_path, split, batch_size, layout, label_info, non_finite)


def _stream_parquet(repo_or_path, split: str, batch_size: int, layout, label_info, non_finite: str = "fail") -> Iterator[LoraDataset]:
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
                yield _from_table(pa.Table.from_batches([batch]), layout, label_info, non_finite)
        except (OSError, pa.ArrowException) as exc:
            raise PulledDataError(f"corrupt parquet shard {shard}: {exc}") from None

"""Read a published LoRA population (a hub id or a local folder) as tensors for LoL models.

The published format (`lol_models.published`, which `lol publish` writes through too) is the
contract; this module never imports the pipeline. Each row holds a fixed-size float32 vector
`weights`; `layout.json` says where each module's `lora_A` (r_max × in) and `lora_B`
(out × r_max) blocks sit, and the row's `rank` and `alpha` give the scale, so that per module i

    U_i = lora_B_i · alpha / rank   (out × r_max)     V_i = lora_A_iᵀ   (in × r_max)

and U_i V_iᵀ = ΔW_i (the zero-padded rank columns add nothing).

`pull(...)` memory-maps the Arrow files of a local folder (`arrow/`, `save_to_disk`) or loads
a hub dataset with `datasets.load_dataset`; `stream(...)` walks parquet shards batch by batch
with bounded memory, for populations larger than memory.

Published data comes from outside, so it is checked before use: `layout.json` must place
every block inside the row (`check_layout`), JSON files are size- and depth-capped, the
`weights` column must be fixed-size float32, and rows holding NaN/Inf weights, alpha or labels
fail the load — or, with `non_finite="skip"`, are left out and counted in `LoraDataset.skipped`
(weights) and `LoraDataset.skipped_labels` (labels). A local folder is read only through the
files it lists (`arrow/dataset_dict.json`, each split's `state.json`), each a plain file name
that resolves inside the folder; nothing outside the folder is ever opened.

Shapes: N LoRAs, D floats per LoRA, T targets.
"""

from __future__ import annotations

import json
import re
import reprlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lol_models.published import (
    LABELS_FILE,
    LAYOUT_FILE,
    READ_COLUMNS,
    WEIGHTS_COLUMN,
    PulledDataError,
    blocks,
    check_layout,
)
from lol_models.weights import LoraWeights

MAX_JSON_BYTES = 64 << 20  # layout.json / labels.json of any real population are far smaller
MAX_JSON_DEPTH = 32  # layout.json and labels.json are 3 levels deep
MAX_SHARDS = 100_000
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # split names and data file names: no '/', no '..'
_brief = reprlib.Repr()
_brief.maxlevel, _brief.maxstring, _brief.maxother = 2, 60, 60
NON_FINITE_POLICIES = ("fail", "skip")


@dataclass
class LoraDataset(torch.utils.data.Dataset):
    """One split of a published population: weights for all N LoRAs, labels, row metadata."""

    weights: LoraWeights  # batch of N
    labels: dict[str, Tensor]  # label column -> (N,)
    job_ids: list[str]
    groups: list[str]
    ranks: Tensor  # (N,)
    label_info: dict[str, dict[str, str]]
    skipped: dict[str, int] = field(default_factory=dict)  # job_id -> NaN/Inf weights (and alpha) of rows left out
    skipped_labels: dict[str, int] = field(default_factory=dict)  # job_id -> NaN/Inf labels of rows left out

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
        missing = [f for f in (LAYOUT_FILE, LABELS_FILE) if not (folder / f).is_file()]
        if missing:
            there = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
            raise PulledDataError(f"{folder} is not a published LoRA dataset: missing {', '.join(missing)} (it holds: {there})")
        layout_path, labels_path = _inside(folder, LAYOUT_FILE), _inside(folder, LABELS_FILE)
    else:
        from huggingface_hub import hf_hub_download

        layout_path = Path(hf_hub_download(str(repo_or_path), LAYOUT_FILE, repo_type="dataset"))
        labels_path = Path(hf_hub_download(str(repo_or_path), LABELS_FILE, repo_type="dataset"))
    layout, labels = _read_json(layout_path), _read_json(labels_path)
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and all(isinstance(x, str) for x in v.values()) for k, v in labels.items()):
        raise PulledDataError(f"{labels_path}: expected an object of label column -> {{scorer, scorer_id, label}} (strings)")
    return check_layout(layout), labels


def _inside(folder: Path, *parts: str) -> Path:
    """`folder/parts…`, refused unless every part is a plain name and the file (symlinks followed)
    lies inside the folder: a published folder never makes `pull` read anything outside it."""
    for part in parts:
        if not PLAIN_NAME.fullmatch(part):
            raise PulledDataError(f"{_brief.repr(part)} is not a plain file or split name (letters, digits, '.', '_', '-'; "
                                  f"no '/' or leading '.'), refused: {folder} may only name files inside itself")
    root = folder.resolve()
    path = folder.joinpath(*parts)
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return path
    if not resolved.is_relative_to(root):
        raise PulledDataError(f"{path} resolves to {resolved}, outside the published folder {root}; refused")
    return resolved


def _read_json(path: Path) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise PulledDataError(f"{path} is {size} bytes; a published dataset's JSON files are far smaller")
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as exc:
        raise PulledDataError(f"{path} is not JSON: {exc}") from None
    except RecursionError:
        raise PulledDataError(f"{path} is nested too deeply to be a published dataset's JSON (at most {MAX_JSON_DEPTH} levels)") from None
    except OSError as exc:
        raise PulledDataError(f"cannot read {path}: {exc.strerror or exc}") from None
    depth, stack = 0, [(value, 1)]
    while stack:  # iterative: the value may be nested up to the recursion limit
        item, level = stack.pop()
        depth = max(depth, level)
        if depth > MAX_JSON_DEPTH:
            raise PulledDataError(f"{path} is nested more than {MAX_JSON_DEPTH} levels deep; a published dataset's JSON is not")
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return value


def factors_from_flat(flat: np.ndarray | Tensor, layout: dict[str, Any], alpha: Tensor, rank: Tensor) -> LoraWeights:
    """(N, D) flat rows → LoraWeights with U = lora_B·alpha/rank, V = lora_Aᵀ per module."""
    flat = torch.as_tensor(flat)
    n_rows, r_max = flat.shape[0], layout["max_rank"]
    scale = (alpha.to(flat.dtype) / rank.to(flat.dtype)).view(n_rows, 1, 1)
    names, us, vs = [], [], []
    for block in blocks(layout):
        a = flat[:, block.a].view(n_rows, r_max, block.n_in)
        b = flat[:, block.b].view(n_rows, block.n_out, r_max)
        names.append(block.name)
        us.append(b * scale)  # (N, out, r_max)
        vs.append(a.transpose(1, 2))  # (N, in, r_max)
    return LoraWeights.from_layers(names, us, vs)


def _weights_matrix(table) -> np.ndarray:
    """(N, D) float32 view of an Arrow `weights` FixedSizeList column (no per-row parsing)."""
    import pyarrow as pa

    kind = table.schema.field(WEIGHTS_COLUMN).type
    if not pa.types.is_fixed_size_list(kind) or kind.value_type != pa.float32():
        raise PulledDataError(f"the `weights` column is {kind}, not a fixed-size list of float32")
    chunks = table.column(WEIGHTS_COLUMN).chunks
    column = chunks[0] if len(chunks) == 1 else table.column(WEIGHTS_COLUMN).combine_chunks()
    width = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=column.null_count == 0)
    return values.reshape(len(column), width)


def pull(repo_or_path: str | Path, split: str = "train", non_finite: str = "fail") -> LoraDataset:
    """One split of a published population as tensors (memory-mapped for local folders).

    Rows with NaN/Inf weights, alpha or labels raise PulledDataError, or with `non_finite="skip"`
    are left out (their job ids and counts in `.skipped` and `.skipped_labels`).
    """
    _check_policy(non_finite)
    layout, label_info = read_layout(repo_or_path)
    if _is_local(repo_or_path):
        table = _local_table(Path(repo_or_path), split)
    else:
        import datasets

        try:
            table = datasets.load_dataset(str(repo_or_path), split=split).data.table
        except ValueError as exc:
            raise PulledDataError(f"cannot load split {split!r} of {repo_or_path}: {exc}") from None
    return table_to_dataset(table, layout, label_info, non_finite)


def _local_table(folder: Path, split: str):
    """The rows of `split` of a local published folder: its Arrow files memory-mapped (zero-copy),
    else its parquet shards; only files the folder lists, each inside the folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (folder / "arrow").is_dir():
        paths, read = _arrow_files(folder, split), _read_arrow
    else:
        paths, read = _parquet_files(folder, split), lambda path: pq.read_table(path, memory_map=True)
    tables = []
    for path in paths:
        try:
            tables.append(read(path))
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise PulledDataError(f"corrupt shard {path}: {exc}") from None
    try:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    except pa.ArrowException as exc:
        raise PulledDataError(f"the shards of split {split!r} in {folder} disagree: {exc}") from None
    if table.num_rows == 0:
        raise PulledDataError(f"split {split!r} of {folder} holds 0 rows; a published split holds at least one LoRA")
    return table


def published_fingerprint(repo_or_path: str | Path) -> str | None:
    """A short hash of a local published folder's content, or None for a hub repo (never taken as unchanged).

    Parquet shards are named by their sha256, so their sorted names identify the rows; the Arrow copy's
    files enter by name, size and modification time (a new publish writes new files)."""
    if not _is_local(repo_or_path):
        return None
    import hashlib

    folder = Path(repo_or_path)
    parts = sorted(p.name for p in (folder / "data").glob("*.parquet"))
    parts += sorted(f"{p.relative_to(folder).as_posix()}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                    for p in (folder / "arrow").rglob("*") if p.is_file())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16] if parts else None


def split_names(folder: str | Path) -> list[str]:
    """The splits of a local published folder: those `arrow/dataset_dict.json` lists, else those of its parquet shards."""
    folder = Path(folder)
    read_layout(folder)  # a published folder at all (else PulledDataError listing what is there)
    if (folder / "arrow").is_dir():
        listing = _read_json(_inside(folder, "arrow", "dataset_dict.json"))
        splits = listing.get("splits") if isinstance(listing, dict) else None
        if isinstance(splits, list) and all(isinstance(name, str) for name in splits):
            return splits
    shards = sorted((folder / "data").glob("*-*.parquet")) if (folder / "data").is_dir() else []
    return sorted({shard.name.rsplit("-", 1)[0] for shard in shards})


def read_rows(folder: str | Path, split: str, columns: Sequence[str] | None = None,
              job_ids: Sequence[str] | None = None, strict: bool = True) -> list[dict[str, Any]]:
    """Rows of one split of a local published folder as dicts (`weights` as a (D,) float32 array),
    only `columns` (default: all; strict=False leaves out those the rows lack) and only the rows of
    `job_ids` (default: all), in stored order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = _local_table(Path(folder), split)
    missing = sorted(set(columns or ()) - set(table.column_names))
    if missing and not strict:
        columns, missing = [c for c in columns or () if c in table.column_names], []
    if missing:
        raise PulledDataError(f"split {split!r} of {folder} has no column(s) {missing}; columns: {', '.join(table.column_names)}")
    if job_ids is not None:
        table = table.filter(pc.is_in(table.column("job_id"), value_set=pa.array(list(job_ids), pa.string())))
    if columns is not None:
        table = table.select(list(columns))
    rows = table.drop_columns([WEIGHTS_COLUMN]).to_pylist() if WEIGHTS_COLUMN in table.column_names else table.to_pylist()
    if WEIGHTS_COLUMN in table.column_names and len(rows):
        matrix = _weights_matrix(table)
        for row, vector in zip(rows, matrix):
            row[WEIGHTS_COLUMN] = np.array(vector, dtype=np.float32)
    return rows


def _read_arrow(path: Path):
    """One Arrow stream file (as `save_to_disk` writes them), memory-mapped."""
    import pyarrow as pa

    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    table.validate()
    return table


def _arrow_files(folder: Path, split: str) -> list[Path]:
    """The Arrow files of `split`, as `arrow/dataset_dict.json` and `arrow/{split}/state.json` list them."""
    _inside(folder, "arrow")
    listing = _read_json(_inside(folder, "arrow", "dataset_dict.json")) if (folder / "arrow" / "dataset_dict.json").exists() else None
    splits = listing.get("splits") if isinstance(listing, dict) else None
    if not isinstance(splits, list) or not all(isinstance(name, str) for name in splits):
        there = ", ".join(sorted(p.name for p in (folder / "arrow").iterdir())[:20]) or "nothing"
        raise PulledDataError(f"{folder / 'arrow'} is not a saved DatasetDict: no dataset_dict.json with a list of "
                              f"split names (it holds: {there})")
    if split not in splits:
        raise PulledDataError(f"unknown split {_brief.repr(split)}; this dataset has: {', '.join(map(_brief.repr, splits))}")
    state = _read_json(_inside(folder, "arrow", split, "state.json"))
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files):
        raise PulledDataError(f"{folder / 'arrow' / split / 'state.json'}: expected `_data_files`, a list of {{filename}}")
    if not 1 <= len(files) <= MAX_SHARDS:
        raise PulledDataError(f"split {split!r} of {folder} lists {len(files)} data files (0 rows); "
                              "a published split holds at least one LoRA")
    paths = []
    for entry in files:
        name = entry["filename"]
        if not name.endswith(".arrow"):
            raise PulledDataError(f"split {split!r} lists the data file {_brief.repr(name)}, not an .arrow file; refused")
        paths.append(_inside(folder, "arrow", split, name))
    if len(set(paths)) != len(paths):  # one shard listed many times would repeat its rows (and memory) at will
        raise PulledDataError(f"split {split!r} of {folder} lists a data file more than once; refused")
    return paths


def _parquet_files(folder: Path, split: str) -> list[Path]:
    _inside(folder, split)  # the split name is part of the file names: plain names only
    data = folder / "data"
    shards = sorted(data.glob(f"{split}-*.parquet")) if data.is_dir() else []
    if not shards:
        raise PulledDataError(f"no parquet shards for split {split!r} in {folder}")
    return [_inside(folder, "data", shard.name) for shard in shards]


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


def _non_finite_labels(table, names: Sequence[str]) -> np.ndarray:
    """(N,) number of NaN/Inf values per row among the float label columns `names`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    counts = np.zeros(table.num_rows, dtype=np.int64)
    for name in names:
        column = table.column(name)
        if pa.types.is_floating(column.type):
            finite = pc.fill_null(pc.is_finite(column), True)
            counts += ~finite.to_numpy(zero_copy_only=False)
    return counts


def table_to_dataset(table, layout: dict[str, Any], label_info: dict[str, Any], non_finite: str = "fail") -> LoraDataset:
    import pyarrow as pa

    missing_columns = [c for c in READ_COLUMNS if c not in table.column_names]
    if missing_columns:
        raise PulledDataError(f"no {', '.join(missing_columns)} column(s); columns: {', '.join(table.column_names)}")
    missing = sorted(set(label_info) - set(table.column_names))
    if missing:
        raise PulledDataError(f"label column(s) {missing} named in labels.json are missing from the rows")
    flat = _weights_matrix(table)
    if flat.shape[1] != layout["size"]:
        raise PulledDataError(f"rows hold {flat.shape[1]} floats but layout.json describes {layout['size']}: rows and layout disagree")
    try:
        counts = non_finite_counts(flat) + _non_finite_labels(table, ["alpha"])  # alpha scales U: part of the weights
        label_counts = _non_finite_labels(table, sorted(label_info))
    except pa.ArrowException as exc:
        raise PulledDataError(f"alpha and label columns must be numeric: {exc}") from None
    skipped: dict[str, int] = {}
    skipped_labels: dict[str, int] = {}
    if counts.any() or label_counts.any():
        ids = table.column("job_id").to_pylist()
        if non_finite == "fail":
            hint = "pass non_finite='skip' (lol pull --non-finite skip) to leave them out"
            if counts.any():
                bad = np.flatnonzero(counts)
                raise PulledDataError(f"{len(bad)} row(s) hold NaN/Inf weights, e.g. {ids[bad[0]]} ({counts[bad[0]]} values); {hint}")
            bad = np.flatnonzero(label_counts)
            row = table.slice(int(bad[0]), 1)
            names = [n for n in sorted(label_info) if _non_finite_labels(row, [n]).any()]
            raise PulledDataError(f"{len(bad)} row(s) hold NaN/Inf labels, e.g. {ids[bad[0]]} ({', '.join(names)}); {hint}")
        skipped = {ids[i]: int(counts[i]) for i in np.flatnonzero(counts)}
        skipped_labels = {ids[i]: int(label_counts[i]) for i in np.flatnonzero(label_counts) if not counts[i]}
        table = table.filter(pa.array((counts == 0) & (label_counts == 0)))
        flat = _weights_matrix(table)
    try:
        with warnings.catch_warnings():  # read-only Arrow buffers, never written to
            warnings.simplefilter("ignore", UserWarning)
            rank = torch.as_tensor(table.column("rank").to_numpy())
            alpha = torch.as_tensor(table.column("alpha").to_numpy())
            labels = {name: torch.as_tensor(table.column(name).to_numpy()) for name in label_info}
    except (TypeError, ValueError, RuntimeError, pa.ArrowException) as exc:
        raise PulledDataError(f"rank, alpha and label columns must be numeric: {exc}") from None
    if not pa.types.is_integer(table.column("rank").type):
        raise PulledDataError(f"the `rank` column is {table.column('rank').type}, not integers")
    if rank.numel() and (int(rank.min()) < 1 or int(rank.max()) > layout["max_rank"]):
        raise PulledDataError(f"ranks {int(rank.min())}..{int(rank.max())} are outside 1..{layout['max_rank']} (layout.json)")
    with warnings.catch_warnings():  # memory-mapped Arrow buffers are read-only; we never write to them
        warnings.simplefilter("ignore", UserWarning)
        flat_t = torch.from_numpy(flat)
    return LoraDataset(
        weights=factors_from_flat(flat_t, layout, alpha, rank), labels=labels,
        job_ids=table.column("job_id").to_pylist(), groups=table.column("group").to_pylist(),
        ranks=rank, label_info=label_info, skipped=skipped, skipped_labels=skipped_labels,
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
    local = _is_local(repo_or_path)
    arrow_files = _arrow_files(Path(repo_or_path), split) if local and (Path(repo_or_path) / "arrow").is_dir() else []
    if arrow_files:
        for path in arrow_files:
            try:
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_stream(source).read_all()
                    for start in range(0, table.num_rows, batch_size):
                        yield table_to_dataset(table.slice(start, batch_size), layout, label_info, non_finite)
                    del table
            except (OSError, ValueError, pa.ArrowException) as exc:
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
        shards = _parquet_files(Path(repo_or_path), split)
    if not shards:
        raise PulledDataError(f"no parquet shards for split {split!r} in {repo_or_path}")
    for shard in shards:
        try:
            batches = pq.ParquetFile(shard).iter_batches(batch_size=batch_size)
            for batch in batches:
                yield table_to_dataset(pa.Table.from_batches([batch]), layout, label_info, non_finite)
        except (OSError, pa.ArrowException) as exc:
            raise PulledDataError(f"corrupt parquet shard {shard}: {exc}") from None

"""The published format: what a published LoRA population holds, defined once.

The writer (`pipeline.publish`) and the reader (`lol_models.data`) both use this module and
nothing else defines the format. It lives in `lol_models` because the import contracts let the
pipeline import `lol_models` but never the reverse; it imports numpy only (no torch, no
`datasets`), so the writer stays light.

A published folder (a Hugging Face dataset repo)::

    README.md                      dataset card (YAML header: configs, dataset_info, license)
    data/{split}-{sha12}.parquet   the rows, in shards named by content (the hub's view)
    arrow/                         the same splits as `save_to_disk` writes them (memory-mapped by `pull`)
    layout.json                    the layout (below)
    labels.json                    label column -> {scorer, scorer_id, label}
    manifest.yaml                  the manifest as run

A row is one LoRA: the COLUMNS below, one column per label (`label_column`), and `weights`, a
fixed-size float32 list (an Arrow FixedSizeList), so a split loads as an (N, D) array without
per-row parsing.

The layout is the layout of every LoRA of the population (its layers in order, each with its
in/out sizes, and the largest rank r_max: what `lol_models.weights.Layout` describes, there
grouped by shape for models; `Layout.from_published` converts) plus where each layer's factors
sit in `weights`. `layout.json` holds it as::

    {"layout_version": 1, "max_rank": r_max, "size": D,
     "modules": [{"name": ..., "in": ..., "out": ..., "a_offset": ..., "b_offset": ...}, ...],
     "scale": "U = lora_B * alpha / rank; V = lora_A^T", "peft_prefix": "base_model.model."}

Module i's lora_A (r_max × in) starts at a_offset and its lora_B (out × r_max) at b_offset,
both row-major. A LoRA of rank r < r_max fills the first r rows of lora_A and the first r
columns of lora_B and zeros elsewhere (which leaves B·A unchanged); its row's `rank` says how
much to keep. The factors LoL models take are U = lora_B · alpha / rank and V = lora_Aᵀ.

peft names a module's factors `base_model.model.{module}.lora_A.weight` / `.lora_B.weight`
(`peft_key`, `module_factors`); `row_to_adapter` writes the exact peft adapter a row holds.

Layouts and rows come from outside when read, so `check_layout` and `row_to_adapter` check them
first and raise `PulledDataError`; the writer's helpers raise `FormatError`, which the writer
reports with the job at fault.

Shapes: N LoRAs, D floats per LoRA, r rank, r_max largest rank, in/out sizes of a layer.
"""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storage.errors import DomainError

FORMAT_VERSION = 1  # written as layout.json's `layout_version`
LAYOUT_FILE = "layout.json"
LABELS_FILE = "labels.json"
WEIGHTS_COLUMN = "weights"
PEFT_PREFIX = "base_model.model."
# peft's file names (peft.utils.constants SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, CONFIG_NAME); peft
# itself is not imported here (it imports torch), a test keeps these equal to peft's.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"  # what peft wrote before safetensors; read only when trusted
ADAPTER_CONFIG = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json, in the store or in a row
MAX_MODULES = 100_000
SCALE = "U = lora_B * alpha / rank; V = lora_A^T"

# The columns of every row, in order, with what they hold (the card's schema table). Label
# columns sit between `adapter_config` and `split`; `weights` is last.
COLUMNS: dict[str, str] = {
    "job_id": "content hash of the job spec (names the LoRA)",
    "population": "population name", "index": "job index k in the population",
    "base_ref": "base model (HF id or tiny:NAME)", "base_revision": "revision of the base",
    "rank": "LoRA rank r", "alpha": "LoRA alpha (update scaled by alpha / r)",
    "target_modules": "module names that carry LoRA layers", "lora_dropout": "LoRA dropout",
    "seed": "the job's own seed", "hyperparameters": "JSON of the drawn hyperparameters",
    "data": "JSON of the job's data subset (group / classes / sources)",
    "group": "finetuning group; splits never share a group", "adapter_config": "peft adapter_config.json",
    "split": "train / validation / test", WEIGHTS_COLUMN: f"flat float32 LoRA factors, see {LAYOUT_FILE}",
}
READ_COLUMNS = (WEIGHTS_COLUMN, "rank", "alpha", "job_id", "group")  # what `lol_models.data` needs of a row

_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight")
_brief = reprlib.Repr()
_brief.maxlevel, _brief.maxstring, _brief.maxother = 2, 60, 60


class FormatError(DomainError):
    """LoRA factors, a layout or a row that the published format cannot hold."""


class PulledDataError(FormatError):
    """A published dataset that cannot be read: missing files, unknown split, bad layout or row."""


# ---------------------------------------------------------------- names


def label_column(scorer: str, label: str) -> str:
    """The column of label `label` of scorer `scorer`: `{scorer}.{label}`, non-alphanumerics as `_`."""
    return f"{scorer}.{re.sub(r'[^A-Za-z0-9]+', '_', label).strip('_')}"


def peft_key(module: str, factor: str) -> str:
    """peft's saved name of `module`'s factor `factor` ("A" or "B")."""
    return f"{PEFT_PREFIX}{module}.lora_{factor}.weight"


def module_factors(tensors: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """module name -> (lora_A (r, in), lora_B (out, r)) from peft's saved keys, sorted by name.

    Works on numpy arrays and torch tensors alike (only the keys are read). FormatError for a key
    that is not a LoRA factor, or a module without both factors.
    """
    modules: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise FormatError(f"unexpected tensor {key!r} in a LoRA adapter (expected …lora_A.weight / …lora_B.weight)")
        modules.setdefault(match.group(1), {})[match.group(2)] = value
    incomplete = [name for name, parts in modules.items() if set(parts) != {"A", "B"}]
    if incomplete:
        raise FormatError(f"modules without both lora_A and lora_B: {incomplete[:5]}")
    return {name: (parts["A"], parts["B"]) for name, parts in sorted(modules.items())}


def adapter_tensors(factors: Mapping[str, tuple[Any, Any]]) -> dict[str, Any]:
    """peft's saved tensors {`base_model.model.{module}.lora_A.weight`: A, …lora_B…: B} of `factors`."""
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[peft_key(name, "A")] = a
        tensors[peft_key(name, "B")] = b
    return tensors


# ---------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Block:
    """Where one module's factors sit in a row: lora_A (r_max × n_in) at a, lora_B (n_out × r_max) at b."""

    name: str
    n_in: int
    n_out: int
    a: slice
    b: slice


def blocks(layout: Mapping[str, Any]) -> Iterator[Block]:
    """The modules of a (checked) layout in order, each with the slices of `weights` its factors fill."""
    r_max = layout["max_rank"]
    for module in layout["modules"]:
        n_in, n_out, a_at, b_at = module["in"], module["out"], module["a_offset"], module["b_offset"]
        yield Block(module["name"], n_in, n_out, slice(a_at, a_at + r_max * n_in), slice(b_at, b_at + n_out * r_max))


def check_factor_shapes(factors: Mapping[str, tuple[np.ndarray, np.ndarray]], rank: int) -> None:
    """FormatError unless every module is lora_A (rank, in) and lora_B (out, rank) with in, out ≥ 1.

    Checked before anything is allocated from these shapes: a header may declare any shape for a
    zero-byte tensor (e.g. lora_A of [2**40, 0]), and the layout's size is computed from them.
    """
    for name, (a, b) in factors.items():
        ok = (a.ndim == 2 and b.ndim == 2 and a.shape[0] == rank and b.shape[1] == rank
              and a.shape[1] >= 1 and b.shape[0] >= 1)
        if not ok:
            raise FormatError(f"module {name} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
                              f"rank {rank} needs lora_A [{rank}, in] and lora_B [out, {rank}] with in, out ≥ 1")


def make_layout(factors: Mapping[str, tuple[np.ndarray, np.ndarray]], max_rank: int) -> dict[str, Any]:
    """The layout of LoRAs shaped like `factors` (module -> (lora_A, lora_B)) up to rank `max_rank`:
    modules in `factors`' order, each lora_A block followed by its lora_B block."""
    modules, offset = [], 0
    for name, (a, b) in factors.items():
        n_in, n_out = a.shape[1], b.shape[0]
        modules.append({"name": name, "in": int(n_in), "out": int(n_out), "a_offset": offset,
                        "b_offset": offset + max_rank * n_in})
        offset += max_rank * (n_in + n_out)
    return {"layout_version": FORMAT_VERSION, "max_rank": max_rank, "size": offset, "modules": modules,
            "scale": SCALE, "peft_prefix": PEFT_PREFIX}


def check_layout(layout: Any, width: int | None = None) -> dict[str, Any]:
    """A published layout, checked: positive sizes, plain unique names, every module's lora_A
    (r_max × in) and lora_B (out × r_max) block inside the row and no two blocks overlapping."""

    def fail(why: str) -> PulledDataError:
        return PulledDataError(f"{LAYOUT_FILE} is not a valid LoRA layout: {why}")

    def count(value: Any, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    if not isinstance(layout, dict) or not isinstance(layout.get("modules"), list):
        raise fail("expected an object with a `modules` list")
    size, r_max, modules = layout.get("size"), layout.get("max_rank"), layout["modules"]
    if not count(size, 0) or not count(r_max, 1) or not 1 <= len(modules) <= MAX_MODULES:
        raise fail(f"size {_brief.repr(size)}, max_rank {_brief.repr(r_max)}, {len(modules)} modules")
    if width is not None and width != size:
        raise fail(f"it describes {size} floats per row, the rows hold {width}")
    spans, names = [], set()
    for module in modules:
        if not isinstance(module, dict):
            raise fail(f"module entry {_brief.repr(module)} is not an object")
        name = module.get("name")
        if not isinstance(name, str) or not name or len(name) > 512 or not name.isprintable() or name in names:
            raise fail(f"module name {_brief.repr(name)} is empty, repeated or not plain text")
        names.add(name)
        n_in, n_out, a_at, b_at = (module.get(k) for k in ("in", "out", "a_offset", "b_offset"))
        if not (count(n_in, 1) and count(n_out, 1) and count(a_at, 0) and count(b_at, 0)):
            raise fail(f"module {name!r}: in/out must be ≥ 1 and offsets ≥ 0, got "
                       + ", ".join(_brief.repr(v) for v in (n_in, n_out, a_at, b_at)))
        spans += [(a_at, a_at + r_max * n_in, name), (b_at, b_at + n_out * r_max, name)]
    end = 0
    for start, stop, name in sorted(spans):
        if start < end or stop > size:
            raise fail(f"module {name!r}: block {start}..{stop} overlaps another or passes the row's {size} floats")
        end = stop
    return layout


def layer_shapes(layout: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """module name -> (out, in), i.e. (n, m) of ΔW = U Vᵀ, in the layout's order."""
    return {block.name: (block.n_out, block.n_in) for block in blocks(layout)}


# ---------------------------------------------------------------- rows


def flatten(factors: Mapping[str, tuple[np.ndarray, np.ndarray]], layout: Mapping[str, Any]) -> np.ndarray:
    """One LoRA's factors (module -> (lora_A (r, in), lora_B (out, r))) as the layout's (D,) float32
    row, rank zero-padded. FormatError if its modules or shapes are not the layout's."""
    vector = np.zeros(layout["size"], dtype=np.float32)
    r_max = layout["max_rank"]
    names = [m["name"] for m in layout["modules"]]
    if list(factors) != names:
        raise FormatError(f"LoRA modules {list(factors)[:3]}… differ from the population's layout {names[:3]}…")
    for block in blocks(layout):
        a, b = factors[block.name]
        rank = a.shape[0]
        if a.shape[1] != block.n_in or b.shape[0] != block.n_out:
            raise FormatError(f"module {block.name}: shapes {a.shape}/{b.shape} differ from the layout")
        block_a = np.zeros((r_max, block.n_in), np.float32)
        block_a[:rank] = a
        block_b = np.zeros((block.n_out, r_max), np.float32)
        block_b[:, :rank] = b
        vector[block.a] = block_a.ravel()
        vector[block.b] = block_b.ravel()
    return vector


def unflatten(vector: np.ndarray, layout: Mapping[str, Any], rank: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The factors module -> (lora_A (rank, in), lora_B (out, rank)) that the (D,) row `vector` holds."""
    r_max = layout["max_rank"]
    out = {}
    for block in blocks(layout):
        a = vector[block.a].reshape(r_max, block.n_in)
        b = vector[block.b].reshape(block.n_out, r_max)
        out[block.name] = (a[:rank].copy(), b[:, :rank].copy())
    return out


def row_to_adapter(row: Mapping[str, Any], layout: Any, out_dir: str | Path) -> Path:
    """Write the peft adapter (adapter_config.json + adapter_model.safetensors) a row holds.

    Rows and layouts come from published datasets (outside data): the layout, the row's width,
    rank and config are checked first, and a row with NaN/Inf weights is refused (PulledDataError).
    """
    from safetensors.numpy import save_file

    check_layout(layout)
    vector = np.asarray(row[WEIGHTS_COLUMN], dtype=np.float32)
    rank, config_text = row.get("rank"), row.get("adapter_config")
    if vector.shape != (layout["size"],):
        raise PulledDataError(f"row {row.get('job_id')!r}: {vector.size} weights, but the layout describes {layout['size']}")
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or not 1 <= rank <= layout["max_rank"]:
        raise PulledDataError(f"row {row.get('job_id')!r}: rank {rank!r} is not in 1..{layout['max_rank']}")
    if not np.isfinite(vector).all():
        raise PulledDataError(f"row {row.get('job_id')!r}: {int((~np.isfinite(vector)).sum())} NaN/Inf weight value(s)")
    try:
        config = json.loads(config_text) if isinstance(config_text, str) and len(config_text) <= MAX_CONFIG_BYTES else None
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise PulledDataError(f"row {row.get('job_id')!r}: adapter_config is not a JSON object")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(unflatten(vector, layout, int(rank))), str(out_dir / ADAPTER_WEIGHTS))
    (out_dir / ADAPTER_CONFIG).write_text(config_text)
    return out_dir

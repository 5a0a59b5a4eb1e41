"""Reading LoRA weights that come from outside: safetensors only, checked before anything is allocated.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON describing
each tensor (dtype, shape, byte offsets), then the raw data. `read_safetensors` checks all of
it against `WeightLimits` before decoding a single tensor: N itself, the JSON, every dtype
(an allow-list of float types), every shape and element count, that the offsets tile the data
exactly (no overlaps, no gaps, nothing past the end: a truncated file is refused), and the
total size. Then it counts NaN/Inf values per tensor and fails on them, or reports them so
the caller can skip the row (`non_finite="count"`).

Pickle-based checkpoints (`.bin`, `.pt`, `.pth`, `.pkl`, `.pickle`, `.ckpt`, or any file
whose first bytes are a pickle or a torch zip archive) run code when loaded, so they are
refused unless the caller passes `trust_remote_pickle=True` (CLI: `--trust-remote-pickle`);
even then they are loaded with `torch.load(weights_only=True)` and checked like safetensors.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from storage.errors import DomainError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_PICKLE_MAGIC = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format: a zip holding a pickle
# safetensors dtype -> numpy dtype; BF16 is widened to float32 (numpy has no bfloat16).
DTYPES: dict[str, np.dtype] = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "BF16": np.dtype("<u2")}
NonFinite = Literal["fail", "count"]


class UnsafeWeightsError(DomainError):
    """Weights that are refused: pickle without trust, a malformed or oversized file, bad values."""


@dataclass(frozen=True)
class WeightLimits:
    """What an acceptable weights file may hold; the defaults fit any LoRA of a 175B model."""

    max_header_bytes: int = field(default=16 << 20, metadata={"help": "Largest JSON header (safetensors allows 100 MB)."})
    max_tensor_elements: int = field(default=1 << 28, metadata={"help": "Elements in one tensor (1 GiB of float32)."})
    max_total_bytes: int = field(default=4 << 30, metadata={"help": "All tensor data together."})
    max_tensors: int = field(default=100_000, metadata={"help": "Tensors in one file."})
    max_dims: int = field(default=8, metadata={"help": "Dimensions of one tensor."})
    dtypes: tuple[str, ...] = field(default=tuple(DTYPES), metadata={"help": "Allowed safetensors dtypes."})


@dataclass
class Weights:
    """The tensors of one file and the NaN/Inf count of each tensor that has any."""

    tensors: dict[str, np.ndarray]
    non_finite: dict[str, int] = field(default_factory=dict)

    @property
    def non_finite_total(self) -> int:
        return sum(self.non_finite.values())


def is_pickle(path: str | Path, head: bytes | None = None) -> bool:
    """A pickle checkpoint by name or by its first bytes (pickle protocol 2–5, or a torch zip)."""
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        return True
    return head is not None and (head[:2] in _PICKLE_MAGIC or head[:4] == _ZIP_MAGIC)


def refuse_pickle(what: str) -> UnsafeWeightsError:
    return UnsafeWeightsError(
        f"refusing to load {what}: it is a pickle checkpoint, and unpickling runs arbitrary code. "
        "Convert it to safetensors, or pass --trust-remote-pickle (trust_remote_pickle=True) if you trust its source")


def read_header(data: bytes | memoryview, file_size: int, limits: WeightLimits = WeightLimits(), what: str = "weights") -> tuple[int, dict]:
    """(N, header dict) of a safetensors file whose first bytes are `data`, checked against `limits`."""
    if file_size < 8 or len(data) < 8:
        raise UnsafeWeightsError(f"{what}: {file_size} bytes is too short for a safetensors file (8-byte header length)")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > limits.max_header_bytes:
        raise UnsafeWeightsError(f"{what}: the header claims {header_len} bytes; the limit is {limits.max_header_bytes}")
    if 8 + header_len > file_size:
        raise UnsafeWeightsError(f"{what}: truncated: the header claims {header_len} bytes but the file holds {file_size - 8} after the length")
    if len(data) < 8 + header_len:
        raise UnsafeWeightsError(f"{what}: only {len(data)} bytes given to read a header of {header_len}")
    try:
        header = json.loads(bytes(data[8:8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UnsafeWeightsError(f"{what}: the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise UnsafeWeightsError(f"{what}: the header is a JSON {type(header).__name__}, not an object")
    return header_len, header


def check_entries(header: dict, data_size: int, limits: WeightLimits = WeightLimits(), what: str = "weights") -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, begin, end) for every tensor, after checking each against `limits`
    and that the byte ranges tile the `data_size` bytes of data exactly."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise UnsafeWeightsError(f"{what}: __metadata__ must map strings to strings")
    entries = {name: info for name, info in header.items() if name != "__metadata__"}
    if len(entries) > limits.max_tensors:
        raise UnsafeWeightsError(f"{what}: {len(entries)} tensors; the limit is {limits.max_tensors}")
    checked, total = {}, 0
    for name, info in entries.items():
        if not name or len(name) > 1024 or not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise UnsafeWeightsError(f"{what}: tensor {name[:80]!r} is not described by dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in limits.dtypes or dtype not in DTYPES:
            raise UnsafeWeightsError(f"{what}: tensor {name!r} has dtype {dtype!r}; allowed: {', '.join(limits.dtypes)}")
        if not isinstance(shape, list) or len(shape) > limits.max_dims or not all(_is_int(d) and d >= 0 for d in shape):
            raise UnsafeWeightsError(f"{what}: tensor {name!r} has shape {str(shape)[:80]}; expected ≤ {limits.max_dims} sizes ≥ 0")
        numel = math.prod(shape)
        if numel > limits.max_tensor_elements:
            raise UnsafeWeightsError(f"{what}: tensor {name!r} claims {numel} elements {shape}; the limit is {limits.max_tensor_elements}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise UnsafeWeightsError(f"{what}: tensor {name!r} has data_offsets {str(offsets)[:80]}; expected [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != numel * DTYPES[dtype].itemsize:
            raise UnsafeWeightsError(f"{what}: tensor {name!r}: bytes {begin}..{end} do not hold {numel} × {dtype}")
        total += end - begin
        if total > limits.max_total_bytes:
            raise UnsafeWeightsError(f"{what}: tensors hold more than {limits.max_total_bytes} bytes")
        checked[name] = (dtype, tuple(shape), begin, end)
    position = 0
    for name, (_, _, begin, end) in sorted(checked.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != position:
            raise UnsafeWeightsError(f"{what}: tensor {name!r} starts at byte {begin}, expected {position} (overlap or gap)")
        position = end
    if position != data_size:
        state = "truncated" if position > data_size else "has trailing bytes"
        raise UnsafeWeightsError(f"{what}: {state}: the header describes {position} bytes of data, the file holds {data_size}")
    return checked


def read_safetensors(data: bytes, limits: WeightLimits = WeightLimits(), non_finite: NonFinite = "fail",
                     what: str = "weights") -> Weights:
    """The tensors of a safetensors file's bytes, every claim checked before a tensor is decoded."""
    header_len, header = read_header(data, len(data), limits, what)
    start = 8 + header_len
    entries = check_entries(header, len(data) - start, limits, what)
    view = memoryview(data)[start:]
    weights = Weights(tensors={})
    for name, (dtype, shape, begin, end) in entries.items():
        array = np.frombuffer(view[begin:end], dtype=DTYPES[dtype]).reshape(shape)
        array = (array.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else array.copy()
        weights.tensors[name] = array
    _count_non_finite(weights, non_finite, what)
    return weights


def load_weights(data: bytes, name: str, limits: WeightLimits = WeightLimits(), non_finite: NonFinite = "fail",
                 trust_remote_pickle: bool = False) -> Weights:
    """The tensors of a weights file's bytes: safetensors (checked), or a pickle only when trusted."""
    if is_pickle(name, data[:8]):
        if not trust_remote_pickle:
            raise refuse_pickle(name)
        return _load_trusted_pickle(data, name, limits, non_finite)
    return read_safetensors(data, limits, non_finite, name)


def load_weights_file(path: str | Path, limits: WeightLimits = WeightLimits(), non_finite: NonFinite = "fail",
                      trust_remote_pickle: bool = False) -> Weights:
    """A weights file from disk; an oversized file is refused before it is read."""
    path = Path(path)
    if path.stat().st_size > max_file_bytes(limits):
        raise UnsafeWeightsError(f"{path}: {path.stat().st_size} bytes is larger than any allowed weights file")
    return load_weights(path.read_bytes(), str(path), limits, non_finite, trust_remote_pickle)


def max_file_bytes(limits: WeightLimits = WeightLimits()) -> int:
    """The largest file that could hold weights within `limits` (check a size before downloading)."""
    return 8 + limits.max_header_bytes + limits.max_total_bytes


def _load_trusted_pickle(data: bytes, name: str, limits: WeightLimits, non_finite: NonFinite) -> Weights:
    """A trusted pickle, still with `weights_only=True` (plain tensors, no arbitrary objects)."""
    import io

    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the unpickler says, the file is not plain tensors
        raise UnsafeWeightsError(f"{name}: not a plain tensor checkpoint: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UnsafeWeightsError(f"{name}: expected a dict of named tensors")
    names = {torch.float16: "F16", torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16"}
    weights, total = Weights(tensors={}), 0
    for key, tensor in state.items():
        dtype = names.get(tensor.dtype)
        if dtype not in limits.dtypes or tensor.dim() > limits.max_dims or tensor.numel() > limits.max_tensor_elements:
            raise UnsafeWeightsError(f"{name}: tensor {key!r} ({tensor.dtype}, {list(tensor.shape)}) is outside the limits")
        total += tensor.numel() * tensor.element_size()
        if total > limits.max_total_bytes:
            raise UnsafeWeightsError(f"{name}: tensors hold more than {limits.max_total_bytes} bytes")
        weights.tensors[key] = tensor.float().numpy() if dtype == "BF16" else tensor.numpy().copy()
    _count_non_finite(weights, non_finite, name)
    return weights


def _count_non_finite(weights: Weights, non_finite: NonFinite, what: str) -> None:
    for name, array in weights.tensors.items():
        count = int(array.size - np.count_nonzero(np.isfinite(array)))
        if count:
            weights.non_finite[name] = count
    if weights.non_finite and non_finite == "fail":
        worst = max(weights.non_finite, key=weights.non_finite.get)
        raise UnsafeWeightsError(f"{what}: {weights.non_finite_total} NaN/Inf value(s) in {len(weights.non_finite)} "
                                 f"tensor(s), e.g. {worst!r} ({weights.non_finite[worst]})")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

"""How many adapters share a pass: the cohort size K, from free memory.

A cohort's memory beyond the frozen base is, to first order, K × (what autograd saves for one
adapter's rows in a forward). `saved_tensor_bytes` measures that during a real forward (the first
micro-step of every cohort, `pipeline.finetune.cohort.train_members`), and `CohortSizer` sizes the
next cohort so that it fits in `memory_fraction` of the memory free now — on a GPU
`torch.cuda.mem_get_info`, on the CPU the kernel's MemAvailable. When a cohort still runs out
of memory, the runner halves the sizer's ceiling and trains the same jobs again in smaller
cohorts; nothing of theirs was committed, and every adapter starts from its own seed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)
SAFETY = 1.5  # activations of later micro-steps (longer LM batches) and allocator slack


class SavedBytes:
    total: int = 0


@contextmanager
def saved_tensor_bytes(model: torch.nn.Module | None = None) -> Iterator[SavedBytes]:
    """Counts the bytes of the distinct tensors autograd saves for backward inside the block,
    leaving out the parameters of `model` (the frozen base is there whatever K is)."""
    counter = SavedBytes()
    seen = {(p.untyped_storage().data_ptr(), p.device) for p in model.parameters()} if model is not None else set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key not in seen:
            seen.add(key)
            counter.total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield counter


def free_memory_bytes(device: torch.device) -> int:
    """Bytes free now on `device` (CUDA: the driver's count; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


@dataclass
class CohortSizer:
    """K for the next cohort: the requested size, capped by memory and by earlier out-of-memory retries."""

    requested: int  # the manifest's cohort_size, or its max_cohort_size when "auto"
    memory_fraction: float = 0.5
    ceiling: int | None = None  # lowered after an out-of-memory
    notes: list[str] = field(default_factory=list)  # what was reduced and why (reported by the runner)

    def size(self, bytes_per_member: float | None, device: torch.device, free_bytes: int | None = None) -> int:
        k = self.requested if self.ceiling is None else min(self.requested, self.ceiling)
        if bytes_per_member:
            free = free_memory_bytes(device) if free_bytes is None else free_bytes
            fits = max(1, int(free * self.memory_fraction // (SAFETY * bytes_per_member)))
            if fits < k:
                self._note(f"cohort size reduced from {k} to {fits}: {free / 2**30:.1f} GiB free on {device.type}, "
                           f"~{bytes_per_member / 2**20:.0f} MiB of activations per adapter")
                k = fits
        return k

    def out_of_memory(self, k: int) -> int:
        """Halve after an out-of-memory in a cohort of `k`; returns the new ceiling."""
        self.ceiling = max(1, k // 2)
        self._note(f"cohort of {k} ran out of memory; retrying its jobs in cohorts of {self.ceiling}")
        return self.ceiling

    def _note(self, message: str) -> None:
        if not self.notes or self.notes[-1] != message:
            self.notes.append(message)
            log.warning(message)

"""A Linear layer carrying the LoRAs of K adapters at once, each input row routed to its adapter.

peft gives a Linear layer one active LoRA: y = W x + s · B (A dropout(x)). A cohort puts K
adapters on the same frozen W and sends a batch whose rows (dim 0) belong to different
adapters through it once; `CohortLoraLinear` computes W x for every row, then the K low-rank
paths with two batched matrix products (`torch.bmm`) over the rows of each adapter:

    x (N, L, in) ─group rows by slot→ (S, M·L, in) ─bmm Aᵀ→ (S, M·L, r) ─bmm Bᵀ→ (S, M·L, out) · s_k

Mixed ranks are stacked by padding A with zero rows and B with zero columns up to the largest
rank, which leaves every B A unchanged. Rows of slot -1 get no LoRA (the bare base). When the
adapters have unequal row counts, each group is padded with zero rows to the largest (S·M ≤ 2N
rows in all), or else the low-rank paths run one slot at a time.

Shapes: N rows (dim 0 of the model's input, e.g. the batch), L positions per row (flattened
middle dims), S adapters present in the batch, M rows per adapter, r rank, in/out features.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cohort import CohortError


@dataclass
class LoraFactors:
    """One adapter's LoRA on one Linear layer, as peft stores it: ΔW = scaling · B A."""

    A: torch.Tensor  # (r, in): lora_A.weight
    B: torch.Tensor  # (out, r): lora_B.weight
    scaling: float  # lora_alpha / r


@dataclass(frozen=True)
class RoutePlan:
    """How the rows of one forward pass split among the adapters present."""

    slots: tuple[int, ...]  # adapter slots in the batch, in the order their rows are grouped
    counts: tuple[int, ...]  # rows of each slot
    gather: torch.Tensor | None  # (Σ counts,) row indices grouping rows by slot; None when already grouped and no base-only rows
    rows: int  # N, the rows the model's input has
    pad: torch.Tensor | None = None  # (S·M,) for unequal counts: the grouped row padded into place j·M + i, or Σ counts (a zero row)
    unpad: torch.Tensor | None = None  # (Σ counts,) where each grouped row sits among the S·M padded ones
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def equal(self) -> bool:
        return len(set(self.counts)) == 1

    def indices(self, device: torch.device) -> tuple[torch.Tensor | None, ...]:
        """(gather, pad, unpad) on `device`, copied there once per plan rather than once per layer."""
        if device not in self._on_device:
            self._on_device[device] = tuple(None if t is None else t.to(device) for t in (self.gather, self.pad, self.unpad))
        return self._on_device[device]


def padding(counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(pad, unpad) indices that lay row groups of `counts` out as S equal groups of M = max(counts)
    rows, or None when that would more than double the rows."""
    S, M, total = len(counts), max(counts), sum(counts)
    if S * M > 2 * total:
        return None
    starts = torch.tensor([0, *counts[:-1]]).cumsum(0)  # (S,)
    position = torch.arange(M)  # (M,)
    valid = position[None, :] < torch.tensor(counts)[:, None]  # (S, M)
    pad = torch.where(valid, starts[:, None] + position[None, :], total).flatten()  # (S·M,)
    return pad, torch.nonzero(valid.flatten()).flatten()


class Routing:
    """Which adapter slot each row of the model's next forward belongs to (shared by all layers)."""

    def __init__(self) -> None:
        self.plan: RoutePlan | None = None

    def set(self, row_slot: Sequence[int] | torch.Tensor) -> None:
        """`row_slot[i]`: the adapter slot of input row i, or -1 for the bare base."""
        slot = torch.as_tensor(row_slot, dtype=torch.long).cpu()
        if slot.ndim != 1:
            raise ValueError(f"row_slot must be 1-D (one slot per row), got shape {tuple(slot.shape)}")
        first: dict[int, int] = {}
        for i, s in enumerate(slot.tolist()):
            if s >= 0:
                first.setdefault(s, i)
        slots = tuple(sorted(first, key=first.get))
        counts = tuple(int((slot == s).sum()) for s in slots)
        grouped = torch.cat([torch.nonzero(slot == s).flatten() for s in slots]) if slots else torch.zeros(0, dtype=torch.long)
        identity = len(grouped) == len(slot) and bool((grouped == torch.arange(len(slot))).all())
        padded = padding(counts) if slots and len(set(counts)) > 1 else None
        self.plan = RoutePlan(slots, counts, None if identity else grouped, len(slot), *(padded or (None, None)))

    def set_blocks(self, slots: Sequence[int], rows_per_slot: Sequence[int]) -> None:
        """Rows grouped in consecutive blocks: `rows_per_slot[j]` rows of `slots[j]`, in order."""
        self.set([s for s, n in zip(slots, rows_per_slot) for _ in range(n)])

    def clear(self) -> None:
        self.plan = None


class CohortLoraLinear(nn.Module):
    """A frozen `nn.Linear` plus the LoRAs of several adapter slots (see the module docstring)."""

    def __init__(self, base_layer: nn.Linear, routing: Routing, name: str):
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.name = name  # the module's qualified name in the model (for messages)
        self.lora_A = nn.ParameterDict()  # slot -> (r, in)
        self.lora_B = nn.ParameterDict()  # slot -> (out, r)
        self.scaling: dict[int, float] = {}
        self.dropout: dict[int, float] = {}

    def add_slot(self, slot: int, factors: LoraFactors, dropout: float = 0.0, trainable: bool = True) -> None:
        weight = self.base_layer.weight
        if factors.A.shape[1] != weight.shape[1] or factors.B.shape[0] != weight.shape[0] or factors.A.shape[0] != factors.B.shape[1]:
            raise ValueError(f"{self.name}: LoRA factors A {tuple(factors.A.shape)}, B {tuple(factors.B.shape)} do not fit "
                             f"a Linear of {weight.shape[1]} → {weight.shape[0]} features")
        self.lora_A[str(slot)] = nn.Parameter(factors.A.detach().clone().to(weight.device), requires_grad=trainable)
        self.lora_B[str(slot)] = nn.Parameter(factors.B.detach().clone().to(weight.device), requires_grad=trainable)
        self.scaling[slot] = float(factors.scaling)
        self.dropout[slot] = float(dropout)

    def remove_slot(self, slot: int) -> None:
        del self.lora_A[str(slot)], self.lora_B[str(slot)]
        self.scaling.pop(slot)
        self.dropout.pop(slot)

    def factors(self, slot: int) -> LoraFactors:
        return LoraFactors(self.lora_A[str(slot)].detach(), self.lora_B[str(slot)].detach(), self.scaling[slot])

    def slot_parameters(self, slot: int) -> list[nn.Parameter]:
        return [self.lora_A[str(slot)], self.lora_B[str(slot)]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        plan = self.routing.plan
        if plan is None or not plan.slots:
            return y
        if x.shape[0] != plan.rows:
            raise RuntimeError(f"{self.name}: input has {x.shape[0]} rows in dim 0 but the cohort routed {plan.rows}; "
                               "cohort LoRA layers need the batch in dim 0 of every targeted Linear's input")
        dtype = self.lora_A[str(plan.slots[0])].dtype
        gather, pad, unpad = plan.indices(x.device)
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)  # (N, L, in)
        grouped = flat if gather is None else flat.index_select(0, gather)
        if plan.equal:
            delta = self._batched(grouped, len(plan.slots), plan)
        elif pad is not None:  # zero rows pad every group to M, then the same two bmm's
            zero = grouped.new_zeros((1,) + grouped.shape[1:])
            padded = torch.cat([grouped, zero]).index_select(0, pad)  # (S·M, L, in)
            delta = self._batched(padded, len(plan.slots), plan).index_select(0, unpad)
        else:
            delta = torch.cat([self._one(chunk, slot) for chunk, slot in zip(grouped.split(list(plan.counts)), plan.slots)])
        if gather is not None:  # back to the input's row order; base-only rows get no delta
            delta = torch.zeros(flat.shape[:-1] + (delta.shape[-1],), dtype=delta.dtype, device=delta.device).index_copy(
                0, gather, delta)
        return y + delta.reshape(y.shape).to(y.dtype)

    def _batched(self, grouped: torch.Tensor, S: int, plan: RoutePlan) -> torch.Tensor:
        """(S·M, L, out) low-rank paths of S equal-sized row groups (S·M, L, in), as two bmm's."""
        M, L, n_in = grouped.shape[0] // S, grouped.shape[1], grouped.shape[2]
        ranks = [self.lora_A[str(s)].shape[0] for s in plan.slots]
        rank = max(ranks)
        A = torch.stack([self.lora_A[str(s)] if r == rank else F.pad(self.lora_A[str(s)], (0, 0, 0, rank - r))
                         for s, r in zip(plan.slots, ranks)])  # (S, r, in)
        B = torch.stack([self.lora_B[str(s)] if r == rank else F.pad(self.lora_B[str(s)], (0, rank - r))
                         for s, r in zip(plan.slots, ranks)])  # (S, out, r)
        scaling = torch.tensor([self.scaling[s] for s in plan.slots], dtype=A.dtype, device=A.device).view(S, 1, 1)
        xs = self._drop(grouped.reshape(S, M * L, n_in), [self.dropout[s] for s in plan.slots])  # (S, M·L, in)
        delta = torch.bmm(torch.bmm(xs, A.transpose(1, 2)), B.transpose(1, 2)) * scaling  # (S, M·L, out)
        return delta.reshape(S * M, L, -1)

    def _one(self, rows: torch.Tensor, slot: int) -> torch.Tensor:
        """(M, L, out) low-rank path of one slot's rows."""
        xs = self._drop(rows.unsqueeze(0), [self.dropout[slot]])[0]
        return (xs @ self.lora_A[str(slot)].T) @ self.lora_B[str(slot)].T * self.scaling[slot]

    def _drop(self, xs: torch.Tensor, rates: list[float]) -> torch.Tensor:
        """Inverted dropout with each slot's rate on (S, R, in), as peft's `lora_dropout` (training only)."""
        if not self.training or not any(rates):
            return xs
        keep = torch.tensor([1.0 - p for p in rates], dtype=xs.dtype, device=xs.device).view(-1, 1, 1)
        return xs * (torch.rand_like(xs) < keep) / keep


def matching_linears(model: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Linear]:
    """The Linear layers peft would wrap for `target_modules` (a name equal to, or ending in ".", a target).

    Conv layers peft could also wrap are refused: cohort layers are Linear only.
    """
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in target_modules):
            if isinstance(module, CohortLoraLinear):
                raise ValueError(f"{name} already carries cohort LoRA layers")
            if not isinstance(module, nn.Linear):
                raise CohortError(f"target module {name} is a {type(module).__name__}; cohort training and scoring "
                                 "batch Linear layers only (set execution.cohort_size: 1 to train such LoRAs one at a time)")
            found[name] = module
    if not found:
        raise CohortError(f"no Linear layer matches target modules {list(target_modules)}")
    return found


@contextmanager
def cohort_layers(model: nn.Module, target_modules: Sequence[str]) -> Iterator[tuple[Routing, dict[str, CohortLoraLinear]]]:
    """Replace the targeted Linear layers of `model` by `CohortLoraLinear`s; put the originals back after.

    Yields (routing, {qualified name: layer}); adapters are added to the layers by slot.
    """
    routing = Routing()
    layers: dict[str, CohortLoraLinear] = {}
    originals = matching_linears(model, target_modules)
    for name, linear in originals.items():
        parent, _, child = name.rpartition(".")
        layers[name] = CohortLoraLinear(linear, routing, name)
        setattr(model.get_submodule(parent) if parent else model, child, layers[name])
    try:
        yield routing, layers
    finally:
        for name, linear in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
        routing.clear()

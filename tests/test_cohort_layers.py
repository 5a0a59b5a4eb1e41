"""`CohortLoraLinear`: every row gets its own adapter's LoRA, whatever the routing path."""

from __future__ import annotations

import pytest
import torch

from pipeline.cohort.layers import CohortLoraLinear, LoraFactors, Routing, padding

RANKS = {0: 2, 1: 4, 2: 3}  # mixed ranks share one layer


def layer() -> CohortLoraLinear:
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(6, 5).double()
    cohort = CohortLoraLinear(base, Routing(), "q_proj")
    for slot, r in RANKS.items():
        cohort.add_slot(slot, LoraFactors(torch.randn(r, 6, generator=gen, dtype=torch.float64),
                                          torch.randn(5, r, generator=gen, dtype=torch.float64), 2.0 / r))
    return cohort


def reference(cohort: CohortLoraLinear, x: torch.Tensor, row_slot: list[int]) -> torch.Tensor:
    """Row by row: W x + s B A x for the row's slot (nothing for -1)."""
    rows = []
    for xi, s in zip(x, row_slot):
        y = cohort.base_layer(xi)
        if s >= 0:
            y = y + (xi @ cohort.lora_A[str(s)].T) @ cohort.lora_B[str(s)].T * cohort.scaling[s]
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("row_slot", [
    [0, 0, 1, 1, 2, 2],  # equal groups: two bmm's
    [0, 0, 0, 1, 1, 2, 2, 2, 2],  # unequal, padded to 4 rows each (12 ≤ 2 · 9)
    [0, 1, 2, 2, 2, 2, 2, 2, 2, 2],  # unequal, padding would more than double the rows: one slot at a time
    [2, -1, 0, 2, 1, -1, 0],  # interleaved, with rows of the bare base
    [1, -1, 0, 0, -1, 1],  # equal groups, interleaved with the bare base
    [0, 0, 1, -1],  # slot 2 absent: its factors get no gradient
], ids=["equal", "padded", "per-slot", "interleaved", "equal-interleaved", "absent-slot"])
def test_each_row_gets_its_own_adapter_and_gradients_reach_only_it(row_slot):
    cohort = layer()
    x = torch.randn(len(row_slot), 3, 6, dtype=torch.float64, requires_grad=True)  # (N, L, in)
    cohort.routing.set(row_slot)
    got = cohort(x)
    torch.testing.assert_close(got, reference(cohort, x, row_slot), rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), [*cohort.parameters()][2:], allow_unused=True)  # the LoRA factors
    expected = torch.autograd.grad((reference(cohort, x, row_slot) * weights).sum(), [*cohort.parameters()][2:],
                                   allow_unused=True)
    for p, g, e in zip([*cohort.parameters()][2:], grads, expected):
        zero = torch.zeros_like(p)
        torch.testing.assert_close(zero if g is None else g, zero if e is None else e, rtol=1e-12, atol=1e-12)
    absent = set(RANKS) - set(row_slot)
    assert all((g is None) == (e is None) for g, e in zip(grads, expected)) and (absent or all(g is not None for g in grads))


def test_padding_lays_groups_out_equally_or_declines():
    pad, unpad = padding([3, 1, 2])
    assert pad.tolist() == [0, 1, 2, 3, 6, 6, 4, 5, 6] and unpad.tolist() == [0, 1, 2, 3, 6, 7]
    assert padding([1, 1, 8]) is None  # 24 rows for 10

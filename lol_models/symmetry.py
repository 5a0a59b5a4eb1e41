"""The GL(r) symmetry of LoRA weights: sampling group elements and acting with them.

Shape legend
    B batch, L_g layers in a group, n/m rows of U/V, r rank.

The symmetry group is a product over layers: layer i has its own g_i ∈ GL(r), acting as
(U_i, V_i) ↦ (U_i g_i, V_i g_i⁻ᵀ), which leaves every ΔW_i = U_i V_iᵀ unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lol_models.weights import LayerGroup, LoraWeights

__all__ = ["gl_act", "random_gl", "random_gl_like", "random_orthogonal", "random_orthogonal_like"]


def random_orthogonal(shape: Sequence[int], r: int, *, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float64) -> Tensor:
    """Haar-random orthogonal matrices: Tensor (*shape, r, r) (reflections included)."""
    a = torch.randn(*shape, r, r, generator=generator, dtype=dtype)
    q, rr = torch.linalg.qr(a)
    signs = torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1))
    signs[signs == 0] = 1
    return q * signs.unsqueeze(-2)


def random_gl(shape: Sequence[int], r: int, *, max_cond: float = 1e3, scale_range: float = 10.0,
              generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """Random invertible matrices g = c · Q₁ diag(s) Q₂: Tensor (*shape, r, r).

    Singular values s are log-uniform with ratio exactly `max_cond` between the largest and the
    smallest (condition number = max_cond, when r ≥ 2); c is log-uniform in [1/scale_range, scale_range].
    """
    if max_cond < 1:
        raise ValueError(f"max_cond must be ≥ 1, got {max_cond}")
    q1 = random_orthogonal(shape, r, generator=generator, dtype=dtype)
    q2 = random_orthogonal(shape, r, generator=generator, dtype=dtype)
    logs = torch.rand(*shape, r, generator=generator, dtype=dtype) * math.log(max_cond)
    if r >= 2:  # pin the extremes so the condition number is exactly max_cond
        logs[..., 0] = 0.0
        logs[..., 1] = math.log(max_cond)
    log_c = (torch.rand(*shape, 1, generator=generator, dtype=dtype) * 2 - 1) * math.log(scale_range)
    s = torch.exp(logs - logs.mean(-1, keepdim=True) + log_c)
    return q1 @ torch.diag_embed(s) @ q2


def random_gl_like(weights: LoraWeights, *, per_sample: bool = True, **kwargs) -> tuple[Tensor, ...]:
    """One g per group: Tensor (B, L_g, r, r) (or (L_g, r, r) when not per_sample), in weights' dtype."""
    shape_of = (lambda g: (weights.batch_size, g.num_layers)) if per_sample else (lambda g: (g.num_layers,))
    return tuple(
        random_gl(shape_of(g), weights.rank, **kwargs).to(device=weights.device, dtype=weights.dtype)
        for g in weights.groups
    )


def random_orthogonal_like(weights: LoraWeights, *, per_sample: bool = True,
                           generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """One orthogonal g per layer: tuple over groups of Tensor (B, L_g, r, r)."""
    shape_of = (lambda g: (weights.batch_size, g.num_layers)) if per_sample else (lambda g: (g.num_layers,))
    return tuple(
        random_orthogonal(shape_of(g), weights.rank, generator=generator).to(weights.device, weights.dtype)
        for g in weights.groups
    )


def gl_act(weights: LoraWeights, gs: Sequence[Tensor]) -> LoraWeights:
    """(U_i, V_i) ↦ (U_i g_i, V_i g_i⁻ᵀ) for every layer.

    gs: one Tensor per group, (B, L_g, r, r) or (L_g, r, r). V g⁻ᵀ is computed with a solve,
    not an explicit inverse.
    """
    if len(gs) != len(weights.groups):
        raise ValueError(f"need one g tensor per group ({len(weights.groups)}), got {len(gs)}")
    out = []
    for grp, g in zip(weights.groups, gs):
        u = grp.u @ g  # (B, L_g, n, r)
        # V g⁻ᵀ = (g⁻¹ Vᵀ)ᵀ
        g_b = g.expand(grp.v.shape[0], *g.shape[-3:]) if g.dim() == 3 else g
        v = torch.linalg.solve(g_b, grp.v.transpose(-1, -2)).transpose(-1, -2)  # (B, L_g, m, r)
        out.append(LayerGroup(grp.names, u, v))
    return LoraWeights(tuple(out))

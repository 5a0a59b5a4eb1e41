"""GL-net's spectral-filter readout: a rank-agnostic, scale-free view of each layer's update.

Shape legend: B batch, L_g layers in a group, n/m rows of U/V, r rank, k = min(n, m, r) singular
directions, F filters, h rows of the filters' projections, d_z the head's width.

ΔW_i = U_i V_iᵀ = Σ_k σ_k a_k b_kᵀ (its thin SVD, from the r×r core of the QR factors, so no n×m
matrix is formed). For each power p of `powers` the readout forms the filtered update

    F_ip = Σ_k σ̂_k^p a_k b_kᵀ,   σ̂_k = σ_k / ‖ΔW_i‖_F,

projects it, G_ip = W_ip F_ip W'_ipᵀ ∈ ℝ^{h×h}, and reads every G_ip linearly into the head.
F_ip is a function of ΔW_i alone (a generalised matrix function: the same for every SVD of ΔW_i,
including repeated singular values, whose directions are not unique), so it is GL(r)-invariant;
a zero singular value adds exactly 0, so zero-padding the rank changes nothing and the readout
takes any rank; ‖F_ip‖_F² = Σ_k σ̂_k^{2p} ≤ 1 for p ≥ 1 at every rank. p = 1 is ΔW_i / ‖ΔW_i‖_F;
larger p keeps the leading directions and fades the tail, whatever the rank. The update's overall
size is left out: it reaches the head through GL-net's spectral moments (log ‖ΔW_i‖_F² is the first).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lol_models.weights import LoraWeights

__all__ = ["SpectralFilterReadout", "filtered_updates", "singular_directions"]


def singular_directions(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD of ΔW = U Vᵀ: u (..., n, r), v (..., m, r) → a (..., n, k), σ (..., k), b (..., m, k),
    σ descending, ΔW = a diag(σ) bᵀ. Computed in float64 from U = Q_u R_u, V = Q_v R_v and the SVD of
    R_u R_vᵀ (at most r×r); returned in float64."""
    q_u, r_u = torch.linalg.qr(u.double())  # (..., n, k_u), (..., k_u, r)
    q_v, r_v = torch.linalg.qr(v.double())  # (..., m, k_v), (..., k_v, r)
    x, sigma, yh = torch.linalg.svd(r_u @ r_v.transpose(-1, -2), full_matrices=False)  # k = min(k_u, k_v)
    return q_u @ x, sigma, q_v @ yh.transpose(-1, -2)


def filtered_updates(u: Tensor, v: Tensor, powers: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """The factors of F_p = Σ_k σ̂_k^p a_k b_kᵀ for each p: u (..., n, r), v (..., m, r) →
    left (..., F, n, k), right (..., m, k) with F_p = left[..., p, :, :] @ rightᵀ, in u's dtype.
    A zero ΔW gives F_p = 0."""
    a, sigma, b = singular_directions(u, v)
    norm = sigma.pow(2).sum(-1, keepdim=True).sqrt()  # (..., 1) = ‖ΔW‖_F
    rel = torch.where(norm > 0, sigma / norm.clamp(min=torch.finfo(sigma.dtype).tiny), torch.zeros_like(sigma))
    weights = torch.stack([rel.pow(p) for p in powers], -2)  # (..., F, k)
    return (a.unsqueeze(-3) * weights.unsqueeze(-2)).to(u.dtype), b.to(u.dtype)


class SpectralFilterReadout(nn.Module):
    """Σ_i Σ_p Linear_ip(vec(W_ip F_ip W'_ipᵀ)) over every layer's filtered updates: LoraWeights → (B, d_z)."""

    def __init__(self, shapes: list[tuple[int, int, int]], powers: tuple[float, ...], h: int, d_z: int):
        """shapes: (L_g, n, m) per group."""
        super().__init__()
        self.powers = tuple(float(p) for p in powers)
        f, layers = len(self.powers), sum(lg for lg, _, _ in shapes)
        self.w_left = nn.ParameterList(nn.Parameter(torch.randn(lg, f, h, n)) for lg, n, _ in shapes)  # F_p has ‖·‖_F ≤ 1
        self.w_right = nn.ParameterList(nn.Parameter(torch.randn(lg, f, h, m)) for lg, _, m in shapes)
        self.readout = nn.ParameterList(nn.Parameter(torch.randn(lg, f, h * h, d_z) / (h * (f * layers) ** 0.5))
                                        for lg, _, _ in shapes)

    def forward(self, weights: LoraWeights) -> Tensor:
        """weights: groups (B, L_g, n, r) / (B, L_g, m, r), any r → (B, d_z)."""
        z = 0.0
        for j, g in enumerate(weights.groups):
            left, right = filtered_updates(g.u, g.v, self.powers)  # (B, L_g, F, n, k), (B, L_g, m, k)
            pl = torch.einsum("lfhn,blfnk->blfhk", self.w_left[j], left)  # (B, L_g, F, h, k)
            pr = torch.einsum("lfhm,blmk->blfhk", self.w_right[j], right)
            projected = (pl @ pr.transpose(-1, -2)).flatten(-2)  # (B, L_g, F, h·h): vec(W F_p W'ᵀ)
            z = z + torch.einsum("blfq,lfqd->bd", projected, self.readout[j])
        return z

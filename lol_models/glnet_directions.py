"""GL-net's per-direction readout: a rank-agnostic, scale-free view of each layer's update.

Shape legend: B batch, L_g layers in a group, n/m rows of U/V, r rank, k = min(n, m, r) singular
directions, h rows of the direction projection, d width of the direction features, d_z the head's width.

ΔW_i = U_i V_iᵀ = Σ_k σ_k a_k b_kᵀ (its thin SVD, found from the r×r core of the QR factors, so no
n×m matrix is formed). ΔW_i is GL(r)-invariant, so are its singular triplets (up to a joint sign
flip of a_k, b_k, which the readout ignores). Each direction k of layer i gives

    e_ik = GELU(A_i vec((W_i a_k)(W'_i b_k)ᵀ) + c_i log σ̂_k + β_i) ∈ ℝ^d,   σ̂_k = σ_k / ‖ΔW_i‖_F,

and the layer contributes (Σ_k σ̂_k e_ik) R_i to the head. The weights σ̂_k make a direction of zero
singular value add exactly 0 (zero-padding the rank changes nothing), keep the pooled sum bounded
at any rank (Σ_k σ̂_k² = 1), and leave the update's overall size out: that reaches the head through
GL-net's spectral moments (log ‖ΔW_i‖_F² is the first).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lol_models.weights import LoraWeights

__all__ = ["DirectionReadout", "singular_directions"]

LOG_FLOOR = -20.0  # log σ̂ of a (numerically) zero direction; its weight σ̂ is ~0 anyway


def singular_directions(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD of ΔW = U Vᵀ: u (..., n, r), v (..., m, r) → a (..., n, k), σ (..., k), b (..., m, k),
    σ descending, ΔW = a diag(σ) bᵀ. Computed in float64 from U = Q_u R_u, V = Q_v R_v and the SVD of
    R_u R_vᵀ (at most r×r); returned in u's dtype."""
    q_u, r_u = torch.linalg.qr(u.double())  # (..., n, k_u), (..., k_u, r)
    q_v, r_v = torch.linalg.qr(v.double())  # (..., m, k_v), (..., k_v, r)
    x, sigma, yh = torch.linalg.svd(r_u @ r_v.transpose(-1, -2), full_matrices=False)  # k = min(k_u, k_v)
    a = q_u @ x  # (..., n, k)
    b = q_v @ yh.transpose(-1, -2)  # (..., m, k)
    return a.to(u.dtype), sigma.to(u.dtype), b.to(u.dtype)


class DirectionReadout(nn.Module):
    """Σ_i (Σ_k σ̂_ik e_ik) R_i over every layer's singular directions: LoraWeights → (B, d_z)."""

    def __init__(self, shapes: list[tuple[int, int, int]], h: int, d: int, d_z: int):
        """shapes: (L_g, n, m) per group."""
        super().__init__()
        layers = sum(lg for lg, _, _ in shapes)
        self.w_a = nn.ParameterList(nn.Parameter(torch.randn(lg, h, n)) for lg, n, _ in shapes)  # unit a_k: no 1/√n
        self.w_b = nn.ParameterList(nn.Parameter(torch.randn(lg, h, m)) for lg, _, m in shapes)
        self.embed = nn.ParameterList(nn.Parameter(torch.randn(lg, h * h, d) / h) for lg, _, _ in shapes)
        self.log_weight = nn.ParameterList(nn.Parameter(torch.zeros(lg, d)) for lg, _, _ in shapes)
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(lg, d)) for lg, _, _ in shapes)
        self.out = nn.ParameterList(nn.Parameter(torch.randn(lg, d, d_z) / (d * layers) ** 0.5) for lg, _, _ in shapes)

    def forward(self, weights: LoraWeights) -> Tensor:
        """weights: groups (B, L_g, n, r) / (B, L_g, m, r), any r → (B, d_z)."""
        z = 0.0
        for j, g in enumerate(weights.groups):
            a, sigma, b = singular_directions(g.u, g.v)  # (B, L_g, n, k), (B, L_g, k), (B, L_g, m, k)
            norm = sigma.pow(2).sum(-1, keepdim=True).sqrt()  # (B, L_g, 1) = ‖ΔW_i‖_F
            weight = torch.where(norm > 0, sigma / norm.clamp(min=torch.finfo(sigma.dtype).tiny), torch.zeros_like(sigma))
            pa = torch.einsum("lhn,blnk->blkh", self.w_a[j], a)  # (B, L_g, k, h)
            pb = torch.einsum("lhm,blmk->blkh", self.w_b[j], b)
            terms = (pa.unsqueeze(-1) * pb.unsqueeze(-2)).flatten(-2)  # (B, L_g, k, h·h): vec((W a_k)(W' b_k)ᵀ)
            log_rel = weight.clamp(min=1e-30).log().clamp(min=LOG_FLOOR)  # (B, L_g, k)
            e = F.gelu(torch.einsum("blkq,lqd->blkd", terms, self.embed[j])
                       + log_rel.unsqueeze(-1) * self.log_weight[j][:, None] + self.bias[j][:, None])  # (B, L_g, k, d)
            pooled = (weight.unsqueeze(-1) * e).sum(2)  # (B, L_g, d)
            z = z + torch.einsum("bld,lde->be", pooled, self.out[j])
        return z

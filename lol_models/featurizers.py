"""Featurizers: LoraWeights → Tensor (B, F) (or per-layer tokens), the inputs of the MLP baselines.

Shape legend
    B batch, L_g layers in a group, n/m rows of U/V, r rank, F features.

| featurizer | symmetry it respects | cost per layer |
|---|---|---|
| flat_features      | none                                   | (n + m) r |
| singular_values    | GL(r) (each layer its own g_i)         | O((n + m) r²) via QR, never n×m |
| dense_features     | GL(r)                                  | n m |
| OAlign             | O(r)                                   | (n + m) r, an r×r SVD |
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lol_models.common import SettingsError
from lol_models.weights import Layout, LoraWeights

__all__ = ["OAlign", "SVDFeatures", "dense_features", "flat_features", "group_singular_values", "singular_values"]


def flat_features(weights: LoraWeights) -> Tensor:
    """Flattened U and V of every layer: Tensor (B, Σ_g L_g (n + m) r). Not invariant."""
    parts = []
    for g in weights.groups:
        parts += [g.u.flatten(1), g.v.flatten(1)]  # (B, L_g n r), (B, L_g m r)
    return torch.cat(parts, dim=1)


def group_singular_values(u: Tensor, v: Tensor, r_out: int) -> Tensor:
    """Singular values of U Vᵀ for stacked layers, via QR: never forms the n×m product.

    u: (B, L_g, n, r), v: (B, L_g, m, r) → (B, L_g, r_out), descending, zero-padded.
    U = Q_U R_U, V = Q_V R_V ⇒ U Vᵀ = Q_U (R_U R_Vᵀ) Q_Vᵀ, so σ(U Vᵀ) = σ(R_U R_Vᵀ) (an r×r matrix).
    """
    r_u = torch.linalg.qr(u, mode="r").R  # (B, L_g, min(n, r), r)
    r_v = torch.linalg.qr(v, mode="r").R  # (B, L_g, min(m, r), r)
    s = torch.linalg.svdvals(r_u @ r_v.transpose(-1, -2))  # (B, L_g, k)
    k = s.shape[-1]
    if k >= r_out:
        return s[..., :r_out]
    return nn.functional.pad(s, (0, r_out - k))


def singular_values(weights: LoraWeights, r_out: int | None = None) -> Tensor:
    """σ(U_i V_iᵀ) of every layer: Tensor (B, L, r_out) in group order. GL-invariant."""
    r_out = weights.rank if r_out is None else r_out
    return torch.cat([group_singular_values(g.u, g.v, r_out) for g in weights.groups], dim=1)


class SVDFeatures(nn.Module):
    """σ(U_i V_iᵀ) of every layer, flattened: LoraWeights → Tensor (B, L r_out). GL-invariant.

    log=True returns log(σ + 1e-8 σ_max + 1e-30), which is scale-free but still invariant.
    """

    def __init__(self, r_out: int, log: bool = False):
        super().__init__()
        self.r_out, self.log = r_out, log

    def forward(self, weights: LoraWeights) -> Tensor:
        s = singular_values(weights, self.r_out)  # (B, L, r_out)
        if self.log:
            s = torch.log(s + 1e-8 * s.amax(dim=-1, keepdim=True) + 1e-30)
        return s.flatten(1)  # (B, L r_out)


def dense_features(weights: LoraWeights) -> Tensor:
    """Flattened ΔW_i = U_i V_iᵀ of every layer: Tensor (B, Σ_g L_g n m). GL-invariant, quadratic."""
    return torch.cat([g.delta().flatten(1) for g in weights.groups], dim=1)


def check_dense_budget(layout: Layout, max_layer_elements: int, *, model: str = "mlp_dense") -> None:
    """ValueError naming the first layer whose n·m exceeds the budget."""
    for g in layout.groups:
        if g.n * g.m > max_layer_elements:
            raise SettingsError(
                f"{model}: layer {g.names[0]!r} (and {len(g.names) - 1} more of that shape) has ΔW of "
                f"{g.n}×{g.m} = {g.n * g.m:,} elements, over the budget max_layer_elements="
                f"{max_layer_elements:,}; raise the budget in the config or use glnet / mlp_svd"
            )


class OAlign(nn.Module):
    """Orthogonal Procrustes alignment of [U_i; V_i] to a seeded random template T_i.

    For each layer: M = [U; V]ᵀ T = Uᵀ T_u + Vᵀ T_v (r×r), M = P Σ Qᵀ, O = P Qᵀ, and the aligned
    factors [U O; V O] are flattened. Under (U g, V g) with g ∈ O(r): M ↦ gᵀ M, O ↦ gᵀ O, so
    [U; V] g gᵀ O is unchanged. (Not GL-invariant; ties in σ(M) make O ill-defined — measure zero.)
    """

    def __init__(self, layout: Layout, seed: int = 0):
        super().__init__()
        self.layout = layout
        gen = torch.Generator().manual_seed(seed)
        for j, g in enumerate(layout.groups):
            # one template per layer: (L_g, n, r) and (L_g, m, r)
            self.register_buffer(f"t_u{j}", torch.randn(g.num_layers, g.n, layout.rank, generator=gen))
            self.register_buffer(f"t_v{j}", torch.randn(g.num_layers, g.m, layout.rank, generator=gen))

    def forward(self, weights: LoraWeights) -> Tensor:
        """weights with rank == layout.rank → Tensor (B, Σ_g L_g (n + m) r)."""
        parts = []
        for j, g in enumerate(weights.groups):
            t_u, t_v = getattr(self, f"t_u{j}"), getattr(self, f"t_v{j}")
            m_ = torch.einsum("blnr,lns->blrs", g.u, t_u) + torch.einsum("blmr,lms->blrs", g.v, t_v)  # (B, L_g, r, r)
            p, _, qh = torch.linalg.svd(m_)
            o = p @ qh  # (B, L_g, r, r), orthogonal
            parts += [(g.u @ o).flatten(1), (g.v @ o).flatten(1)]
        return torch.cat(parts, dim=1)

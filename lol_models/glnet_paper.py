"""The authors' GL-net configuration (LoL, arXiv 2410.04207), as a baseline: `glnet_paper`.

Written from the paper's description and the facts of the authors' code as issue #21 states them,
not copied from that code.

Shape legend
    B batch, L layers, L_g layers in a group, n/m rows of U/V, h hidden rows, r rank, d head width,
    out output dimension.

One GL-equivariant linear layer, separately per input layer i: U_i ↦ W₁_i U_i, V_i ↦ W₂_i V_i
(W₁_i ∈ ℝ^{h×n_i}, W₂_i ∈ ℝ^{h×m_i} act on the feature dimension, shared by every rank column), then
the invariant P_i = (W₁_i U_i)(W₂_i V_i)ᵀ = W₁_i ΔW_i W₂_iᵀ ∈ ℝ^{h×h}. No gates, no second layer. Heads:

- `readout="full"` (attributes, classification): concat_i vec(P_i) (L·h²) → Linear → LayerNorm → ReLU → Linear.
- `readout="mean"` (CLIP score, regression): the mean entry of each P_i (L) → Linear → LayerNorm → ReLU → Linear.

The registry's task defaults pick "mean" for regression tasks and "full" for label tasks, as the
authors did. One addition of ours, on by default (`normalize_input`): each layer is scaled by a
training-set constant so ΔW_i has unit RMS entry — LoRA updates are ~1e-3, and at that scale
the first Linear's bias and LayerNorm's ε, not the weights, would decide the output. A positive
scalar per layer changes no invariance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lol_models.common import LoLModel, SettingsError, check_positive_ints, opt
from lol_models.glnet import GLLinear, frobenius_sq
from lol_models.weights import LayerGroup, Layout, LoraWeights

__all__ = ["GLNetPaper", "GLNetPaperConfig"]

READOUTS = ("full", "mean")


@dataclass(frozen=True)
class GLNetPaperConfig:
    """The authors' GL-net (`glnet_paper`)."""

    hidden: int = opt(16, "rows h of the one equivariant linear layer (P_i is h×h)")
    head: int = opt(64, "width d of the head's hidden layer (Linear → LayerNorm → ReLU → Linear)")
    readout: str = opt("full", '"full": the head reads every entry of every P_i (attributes); '
                               '"mean": the mean entry of each P_i (CLIP score)')
    normalize_input: bool = opt(True, "scale each layer so ΔW_i has unit RMS entry on the training set (ours)")

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive_ints(name, hidden=self.hidden, head=self.head)
        if self.readout not in READOUTS:
            raise SettingsError(f"{name}.readout must be one of {READOUTS}, got {self.readout!r}")


class GLNetPaper(LoLModel):
    """GLLinear → P_i = U_i V_iᵀ per layer → vec P (or mean P_i) → Linear → LayerNorm → ReLU → Linear."""

    pads_rank = False  # zero columns never reach P
    rank_agnostic = True  # nothing is sized by r

    def __init__(self, layout: Layout, out_dim: int, cfg: GLNetPaperConfig):
        super().__init__(layout, out_dim)
        self.cfg = cfg
        for j, g in enumerate(layout.groups):
            self.register_buffer(f"input_scale{j}", torch.ones(g.num_layers))  # (L_g,) applied to U_i and V_i
        self.equivariant = GLLinear([(g.num_layers, g.n, g.m) for g in layout.groups], cfg.hidden)  # (L_g, n, m)
        h, L = cfg.hidden, layout.num_layers
        features = L * h * h if cfg.readout == "full" else L
        self.head = nn.Sequential(nn.Linear(features, cfg.head), nn.LayerNorm(cfg.head), nn.ReLU(),
                                  nn.Linear(cfg.head, out_dim))

    def input_scales(self) -> list[Tensor]:
        """Per group Tensor (L_g,)."""
        return [getattr(self, f"input_scale{j}") for j in range(len(self.layout.groups))]

    @torch.no_grad()
    def fit_input_stats(self, weights: LoraWeights, chunk_size: int = 512) -> None:
        """Each layer's scale so the RMS entry of ΔW_i over the training set is 1 (with `normalize_input`)."""
        if not self.cfg.normalize_input:
            return
        self.layout.check(weights, what="training weights", check_rank=False)
        sums = [torch.zeros(g.num_layers, dtype=torch.float64) for g in weights.groups]
        for c in self.chunks(weights, chunk_size):
            for j, g in enumerate(c.groups):
                sums[j] += frobenius_sq(g.u.double(), g.v.double()).sum(0).cpu()  # (L_g,)
        for j, g in enumerate(weights.groups):
            rms = (sums[j] / (weights.batch_size * g.n * g.m)).sqrt()
            scale = torch.where(rms > 0, rms.rsqrt(), torch.ones_like(rms))  # on U and V: ΔW_i / rms
            getattr(self, f"input_scale{j}").copy_(scale)

    def invariants(self, weights: LoraWeights) -> list[Tensor]:
        """P_i = (W₁_i U_i)(W₂_i V_i)ᵀ per group: Tensors (B, L_g, h, h). GL-invariant."""
        x = self.prepare(weights)
        x = LoraWeights(tuple(LayerGroup(g.names, g.u * s[:, None, None], g.v * s[:, None, None])
                              for g, s in zip(x.groups, self.input_scales())))
        return [g.u @ g.v.transpose(-1, -2) for g in self.equivariant(x).groups]

    def forward(self, weights: LoraWeights) -> Tensor:
        """weights: LoraWeights of `layout` (any rank) → Tensor (B, out)."""
        ps = self.invariants(weights)
        if self.cfg.readout == "full":
            z = torch.cat([p.flatten(1) for p in ps], dim=1)  # (B, L·h·h), layers in group order
        else:
            z = torch.cat([p.mean(dim=(-1, -2)) for p in ps], dim=1)  # (B, L)
        return self.head(z)

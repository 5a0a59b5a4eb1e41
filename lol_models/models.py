"""Baseline LoL models: MLPs on featurized weights and a per-layer Transformer.

Shape legend
    B batch, L layers, L_g layers in a group, n/m rows of U/V, r rank, F features,
    d transformer width, out output dimension.

Models: `mlp` (flattened U, V; no invariance), `mlp_svd` (singular values of each U Vᵀ; GL-invariant),
`mlp_oalign` (Procrustes-aligned factors; O(r)-invariant), `mlp_dense` (flattened U Vᵀ; GL-invariant,
n·m per layer), `transformer` (one token per layer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lol_models.common import (
    MLP,
    LoLModel,
    SettingsError,
    Standardizer,
    check_positive_ints,
    check_probability,
    opt,
)
from lol_models.featurizers import (
    OAlign,
    SVDFeatures,
    check_dense_budget,
    dense_features,
    flat_features,
    group_singular_values,
)
from lol_models.weights import Layout, LoraWeights

__all__ = [
    "DenseConfig",
    "FeatureMLP",
    "LayerTransformer",
    "MLPConfig",
    "OAlignConfig",
    "SVDConfig",
    "TransformerConfig",
]


@dataclass(frozen=True)
class MLPConfig:
    """MLP on flattened U, V (`mlp`)."""

    hidden: tuple[int, ...] = opt((64, 64), "widths of the MLP's hidden layers")
    dropout: float = opt(0.0, "dropout after each hidden layer")

    def __post_init__(self) -> None:
        check_positive_ints(type(self).__name__, hidden=self.hidden)
        check_probability(type(self).__name__, dropout=self.dropout)


@dataclass(frozen=True)
class SVDConfig(MLPConfig):
    """MLP on the r singular values of every U_i V_iᵀ (`mlp_svd`)."""

    log: bool = opt(False, "feed log(σ + 1e-8·σ_max) instead of σ (scale-free spectra)")


@dataclass(frozen=True)
class OAlignConfig(MLPConfig):
    """MLP on factors aligned to a random template by orthogonal Procrustes (`mlp_oalign`)."""

    template_seed: int = opt(0, "seed of the random template every LoRA is aligned to")


@dataclass(frozen=True)
class DenseConfig(MLPConfig):
    """MLP on flattened ΔW_i = U_i V_iᵀ (`mlp_dense`)."""

    max_layer_elements: int = opt(1 << 16, "largest n·m of any single layer this model accepts")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(type(self).__name__, max_layer_elements=self.max_layer_elements)


class FeatureMLP(LoLModel):
    """featurize(weights) (B, F) → standardise with train statistics → MLP → (B, out)."""

    def __init__(self, layout: Layout, out_dim: int, featurize: Callable[[LoraWeights], Tensor],
                 feature_dim: int, hidden: tuple[int, ...], dropout: float):
        super().__init__(layout, out_dim)
        self.featurize = featurize
        self.norm = Standardizer((feature_dim,))
        self.mlp = MLP(feature_dim, hidden, out_dim, dropout)

    @torch.no_grad()
    def fit_input_stats(self, weights: LoraWeights, chunk_size: int = 512) -> None:
        self.norm.fit(self.featurize(self.prepare(c).to(self.norm.mean.dtype)) for c in self.chunks(weights, chunk_size))

    def forward(self, weights: LoraWeights) -> Tensor:
        """weights: LoraWeights of `layout` (rank ≤ layout.rank) → Tensor (B, out)."""
        x = self.featurize(self.prepare(weights))  # (B, F)
        return self.mlp(self.norm(x))


def build_mlp(layout: Layout, out_dim: int, cfg: MLPConfig) -> FeatureMLP:
    dim = sum(g.num_layers * (g.n + g.m) * layout.rank for g in layout.groups)
    return FeatureMLP(layout, out_dim, flat_features, dim, cfg.hidden, cfg.dropout)


def build_mlp_svd(layout: Layout, out_dim: int, cfg: SVDConfig) -> FeatureMLP:
    r = layout.rank
    model = FeatureMLP(layout, out_dim, SVDFeatures(r, cfg.log), layout.num_layers * r, cfg.hidden, cfg.dropout)
    model.pads_rank = False  # σ(U Vᵀ) is padded with zeros to r instead
    return model


def build_mlp_oalign(layout: Layout, out_dim: int, cfg: OAlignConfig) -> FeatureMLP:
    align = OAlign(layout, cfg.template_seed)
    dim = sum(g.num_layers * (g.n + g.m) * layout.rank for g in layout.groups)
    model = FeatureMLP(layout, out_dim, align, dim, cfg.hidden, cfg.dropout)
    return model  # `align` is a submodule (its templates are buffers) via `featurize`


def build_mlp_dense(layout: Layout, out_dim: int, cfg: DenseConfig) -> FeatureMLP:
    check_dense_budget(layout, cfg.max_layer_elements)
    dim = sum(g.num_layers * g.n * g.m for g in layout.groups)
    model = FeatureMLP(layout, out_dim, dense_features, dim, cfg.hidden, cfg.dropout)
    model.pads_rank = False
    return model


# ---- per-layer transformer ----------------------------------------------------------------


@dataclass(frozen=True)
class TransformerConfig:
    """One token per layer, a small nn.TransformerEncoder, mean pooling (`transformer`).

    Tokens: "svd" (default) — the r singular values of U_i V_iᵀ (standardised per layer), so the whole
    model is GL-invariant; "flat" — flattened [U_i; V_i] (not invariant). Either way each layer has its
    own linear projection to d (so layer identity is built in, acting as a positional embedding).
    """

    token: str = opt("svd", 'token features: "svd" (GL-invariant) or "flat" (raw factors)')
    d_model: int = opt(32, "token width d")
    nhead: int = opt(4, "attention heads (must divide d_model)")
    num_layers: int = opt(2, "encoder layers")
    dim_feedforward: int = opt(64, "feed-forward width in each encoder layer")
    dropout: float = opt(0.0, "dropout inside the encoder")

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.token not in ("svd", "flat"):
            raise SettingsError(f'{name}.token must be "svd" or "flat", got {self.token!r}')
        check_positive_ints(name, d_model=self.d_model, nhead=self.nhead, num_layers=self.num_layers,
                            dim_feedforward=self.dim_feedforward)
        if self.d_model % self.nhead:
            raise SettingsError(f"{name}.nhead={self.nhead} must divide d_model={self.d_model}")
        check_probability(name, dropout=self.dropout)


class LayerTransformer(LoLModel):
    """Tokens (B, L, d) from per-layer features → TransformerEncoder → mean over L → Linear → (B, out)."""

    def __init__(self, layout: Layout, out_dim: int, cfg: TransformerConfig):
        super().__init__(layout, out_dim)
        self.cfg = cfg
        self.pads_rank = True  # svd tokens: padding adds zero singular values, same as r_out padding
        self.norms = nn.ModuleList()
        self.proj_w = nn.ParameterList()
        self.proj_b = nn.ParameterList()
        d = cfg.d_model
        for g in layout.groups:
            f = self.token_dim(g.n, g.m)
            self.norms.append(Standardizer((g.num_layers, f)))
            self.proj_w.append(nn.Parameter(torch.randn(g.num_layers, f, d) / f**0.5))  # per-layer projection
            self.proj_b.append(nn.Parameter(torch.zeros(g.num_layers, d)))  # doubles as a layer embedding
        layer = nn.TransformerEncoderLayer(d, cfg.nhead, cfg.dim_feedforward, cfg.dropout, batch_first=True,
                                           activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, out_dim)

    def token_dim(self, n: int, m: int) -> int:
        return self.layout.rank if self.cfg.token == "svd" else (n + m) * self.layout.rank

    def group_tokens(self, weights: LoraWeights) -> list[Tensor]:
        """Per group Tensor (B, L_g, f): raw token features before standardisation."""
        if self.cfg.token == "svd":
            return [group_singular_values(g.u, g.v, self.layout.rank) for g in weights.groups]
        return [torch.cat([g.u.flatten(2), g.v.flatten(2)], dim=2) for g in weights.groups]  # (B, L_g, (n+m) r)

    @torch.no_grad()
    def fit_input_stats(self, weights: LoraWeights, chunk_size: int = 512) -> None:
        dtype = self.proj_b[0].dtype
        for j, norm in enumerate(self.norms):
            norm.fit(self.group_tokens(self.prepare(c).to(dtype))[j] for c in self.chunks(weights, chunk_size))

    def forward(self, weights: LoraWeights) -> Tensor:
        """weights: LoraWeights of `layout` → Tensor (B, out)."""
        feats = self.group_tokens(self.prepare(weights))
        tokens = [
            torch.einsum("blf,lfd->bld", norm(x), w) + b
            for x, norm, w, b in zip(feats, self.norms, self.proj_w, self.proj_b)
        ]
        h = self.encoder(torch.cat(tokens, dim=1))  # (B, L, d)
        return self.head(self.out_norm(h.mean(dim=1)))

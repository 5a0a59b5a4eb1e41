"""GL-net: a GL(r)-invariant network on LoRA weights, built from GL-equivariant layers.

Shape legend
    B batch, L layers, L_g layers in a group, n/m rows of U/V (input), h hidden rows,
    r rank, c cross-layer context width, d head width, out output dimension.

Symmetry: every layer i has its own g_i ∈ GL(r) acting as (U_i, V_i) ↦ (U_i g_i, V_i g_i⁻ᵀ).
Hidden states are themselves `LoraWeights` (each "layer" now has U_i, V_i ∈ ℝ^{h×r}), so every
equivariant piece maps LoraWeights → LoraWeights and commutes with that action:

- `GLLinear`   U_i ↦ W_i U_i, V_i ↦ W'_i V_i (W_i ∈ ℝ^{h×n_i}, separate per layer; no bias). Acting on the
               left commutes with acting on the right; U never mixes with V, nor layer i with j.
- `GLGate`     rows scaled by positive gates computed from invariants: d_i = diag(U_i V_iᵀ) ∈ ℝ^h
               (⟨u_k, v_k⟩ = ⟨u_k g, v_k g⁻ᵀ⟩) plus, optionally, a context pooled from every layer's d_j.
               Scaling rows commutes with right multiplication. Cost O(h r) per layer.
- `RowDropout` drops whole rows of U_i and of V_i (equivariant for the same reason).
- head         P_i = U_i V_iᵀ ∈ ℝ^{h×h} per layer (invariant), Σ_i Linear_i(vec P_i) [+ Linear'_i(vec P_i ⊙ P_i)]
               [+ Linear(spectral moments of the input ΔW_i)] [→ LayerNorm] → MLP → out.
- scale-free input (optional) each layer's U_i, V_i divided by ‖ΔW_i‖_F^½ (a GL-invariant scalar), so the stack sees
               the shape of ΔW_i, not its size (which the spectral moments carry).
- spectral filters (optional, `glnet_filters.py`) the head also reads W F_ip W'ᵀ, F_ip = Σ_k (σ_k/‖ΔW_i‖_F)^p a_k b_kᵀ
               of each input ΔW_i (its SVD Σ_k σ_k a_k b_kᵀ): rank-agnostic, scale-free, invariant.
- spectral moments (optional) log(Σ_k σ_k^{2p}) / p, p = 1..P, of each input layer's ΔW_i = U_i V_iᵀ, from
               the traces of powers of M_i = (U_iᵀU_i)(V_iᵀV_i) ∈ ℝ^{r×r}: g acts on M_i by similarity
               (M_i ↦ gᵀ M_i g⁻ᵀ), so the traces are invariant; rank-agnostic; cost O((n + m) r²).

Information crosses layers only through invariants (gate context, head). Cost is linear in n_i, m_i:
no n×m matrix is ever formed (ΔW's scale for input normalisation uses tr((UᵀU)(VᵀV)), r×r).
Zero-padding the rank is exact: padded columns stay zero through every layer and never reach P.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lol_models.common import (
    MLP,
    LoLModel,
    SettingsError,
    check_positive_ints,
    check_probability,
    opt,
)
from lol_models.glnet_filters import SpectralFilterReadout
from lol_models.weights import LayerGroup, Layout, LoraWeights

__all__ = ["GLGate", "GLLinear", "GLNet", "GLNetConfig", "RowDropout", "frobenius_sq", "spectral_log_moments"]


@dataclass(frozen=True)
class GLNetConfig:
    """GL-net (`glnet`)."""

    hidden: tuple[int, ...] = opt((16, 16), "rows h of each equivariant linear layer; gates follow all but the last")
    head: tuple[int, ...] = opt((64,), "widths of the invariant head: first = readout of Σ_i vec(P_i), then MLP")
    dropout: float = opt(0.0, "equivariant dropout: probability of dropping a whole row of U_i / V_i")
    head_dropout: float = opt(0.0, "dropout in the invariant MLP head")
    cross_layer: bool = opt(True, "gates also see a context pooled from every layer's invariants")
    context: int = opt(8, "width c of the cross-layer context")
    head_norm: bool = opt(False, "LayerNorm on the head's readout z before its nonlinearity, as the authors' head "
                                 "(Linear → LayerNorm → ReLU); in the tuning space")
    quadratic_readout: bool = opt(True, "the head also reads P_i ⊙ P_i (invariant; energies like ‖ΔW‖² become linear)")
    # Off by default: selected on validation over the tiny populations' six targets (better on five;
    # e.g. tiny-shapes clip_score val R² 0.499 vs 0.399, tiny-arc acc 0.669 vs 0.561; docs/results.md).
    normalize_input: bool = opt(False, "rescale each layer so ΔW_i has unit RMS entry on the training set")
    # 2: selected on validation over the tiny populations' tasks against 0 and 4 (better than 0 on four of six,
    # e.g. tiny-shapes clip_score val R² 0.552 vs 0.499, tiny-arc acc 0.810 vs 0.745; worse on tiny-shapes
    # attributes, AUC 0.626 vs 0.667; docs/results.md, bench/results/glnet-selection-spectral-moments.jsonl).
    spectral_moments: int = opt(2, "P: the head also reads log(Σ_k σ_k^2p) / p, p = 1..P, of each input layer's "
                                   "ΔW_i (GL-invariant, any rank), standardised on the training set; 0: off")

    # Off by default; for shifts in update size and rank (#21's rank experiment), chosen there on validation.
    scale_free: bool = opt(False, "divide each layer's ΔW_i by its own ‖ΔW_i‖_F before the equivariant stack (U_i and V_i "
                                  "by its square root): P_i then carries the update's shape; its size reaches the head "
                                  "through the spectral moments")
    spectral_filters: tuple[float, ...] = opt((), "powers p ≥ 1: the head also reads W F_ip W'ᵀ, F_ip = Σ_k (σ_k / ‖ΔW_i‖_F)^p "
                                                  "a_k b_kᵀ of each input layer's SVD (rank-agnostic, scale-free); (): off")

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive_ints(name, hidden=self.hidden, head=self.head, context=self.context)
        if not isinstance(self.spectral_filters, tuple) or not all(
                isinstance(p, (int, float)) and not isinstance(p, bool) and 1 <= p < float("inf") for p in self.spectral_filters):
            raise SettingsError(f"{name}.spectral_filters must be a tuple of powers p ≥ 1 (e.g. (1, 2, 4); () turns them off), "
                                f"got {self.spectral_filters!r}")
        if isinstance(self.spectral_moments, bool) or not isinstance(self.spectral_moments, int) or self.spectral_moments < 0:
            raise SettingsError(f"{name}.spectral_moments must be an integer ≥ 0 (0 turns them off), got {self.spectral_moments!r}")
        check_probability(name, dropout=self.dropout, head_dropout=self.head_dropout)


def frobenius_sq(u: Tensor, v: Tensor) -> Tensor:
    """‖U Vᵀ‖_F² = Σ (UᵀU) ⊙ (VᵀV) without forming U Vᵀ. u: (..., n, r), v: (..., m, r) → (...)."""
    return ((u.transpose(-1, -2) @ u) * (v.transpose(-1, -2) @ v)).sum((-1, -2))


SPECTRAL_CLIP = 10.0  # standardised moments are clipped: a layer zero on the whole training set has std ~0


def spectral_log_moments(u: Tensor, v: Tensor, powers: int) -> Tensor:
    """log(Σ_k σ_k^2p) / p of ΔW = U Vᵀ for p = 1..powers: u (..., n, r), v (..., m, r) → (..., powers).

    Σ_k σ_k^2p = tr(M^p) with M = (UᵀU)(VᵀV) (r×r), so ΔW is never formed. The r×r work runs in
    float64 on M / tr M (log tr M^p / p = log tr M + log tr((M / tr M)^p) / p), which neither
    underflows nor overflows and keeps float32 inputs with ill-conditioned factors accurate.
    A zero ΔW gives log(1e-30) rather than -inf.
    """
    m = (u.double().transpose(-1, -2) @ u.double()) @ (v.double().transpose(-1, -2) @ v.double())  # (..., r, r)
    trace = m.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=1e-30)  # (...,) = ‖ΔW‖_F²
    unit = m / trace[..., None, None]
    power, moments = unit, [trace.log()]
    for p in range(2, powers + 1):
        power = power @ unit
        moments.append(trace.log() + power.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=1e-300).log() / p)
    return torch.stack(moments[:powers], -1).to(u.dtype)


def _unit_frobenius(g: LayerGroup) -> LayerGroup:
    """The group with each layer's ΔW_i = U_i V_iᵀ scaled to ‖ΔW_i‖_F = 1 (U_i, V_i each by ‖ΔW_i‖_F^-½); zero stays zero.
    g: (B, L_g, n, r) / (B, L_g, m, r) → same shapes."""
    norm = frobenius_sq(g.u.double(), g.v.double()).clamp(min=0).sqrt()  # (B, L_g), float64: no cancellation
    scale = torch.where(norm > 0, norm.clamp(min=1e-300).rsqrt(), torch.ones_like(norm)).to(g.u.dtype)
    return LayerGroup(g.names, g.u * scale[..., None, None], g.v * scale[..., None, None])


def _group_shapes(layout: Layout) -> list[tuple[int, int, int]]:
    """(L_g, n, m) per group."""
    return [(g.num_layers, g.n, g.m) for g in layout.groups]


class GLLinear(nn.Module):
    """(U_i, V_i) ↦ (W_i U_i, W'_i V_i) per layer, n_i → h and m_i → h; vectorised per group."""

    def __init__(self, shapes: list[tuple[int, int, int]], h: int):
        super().__init__()
        self.h = h
        self.w_u = nn.ParameterList(nn.Parameter(torch.randn(lg, h, n) / n**0.5) for lg, n, _ in shapes)
        self.w_v = nn.ParameterList(nn.Parameter(torch.randn(lg, h, m) / m**0.5) for lg, _, m in shapes)

    def forward(self, x: LoraWeights) -> LoraWeights:
        """x: groups (B, L_g, n, r) / (B, L_g, m, r) → groups (B, L_g, h, r) / (B, L_g, h, r)."""
        return LoraWeights(tuple(
            LayerGroup(
                g.names,
                torch.einsum("lhn,blnr->blhr", wu, g.u),
                torch.einsum("lhm,blmr->blhr", wv, g.v),
            )
            for g, wu, wv in zip(x.groups, self.w_u, self.w_v)
        ))


class GLGate(nn.Module):
    """Row gates from invariants: U_i[k] ↦ σ(a_k d_ik + b_k + ctx_k) U_i[k] (V_i likewise, own a, b).

    d_i = diag(U_i V_iᵀ) ∈ ℝ^h is GL-invariant; ctx = Σ_j-pooled tanh(d_j A_j) mapped per layer to ℝ^h.
    """

    def __init__(self, group_sizes: list[int], h: int, cross_layer: bool, context: int):
        super().__init__()
        self.cross_layer = cross_layer
        self.a_u = nn.ParameterList(nn.Parameter(torch.ones(lg, h)) for lg in group_sizes)
        self.a_v = nn.ParameterList(nn.Parameter(torch.ones(lg, h)) for lg in group_sizes)
        self.b_u = nn.ParameterList(nn.Parameter(torch.zeros(lg, h)) for lg in group_sizes)
        self.b_v = nn.ParameterList(nn.Parameter(torch.zeros(lg, h)) for lg in group_sizes)
        if cross_layer:
            self.ctx_in = nn.ParameterList(nn.Parameter(torch.randn(lg, h, context) / h**0.5) for lg in group_sizes)
            self.ctx_u = nn.ParameterList(nn.Parameter(torch.zeros(lg, context, h)) for lg in group_sizes)
            self.ctx_v = nn.ParameterList(nn.Parameter(torch.zeros(lg, context, h)) for lg in group_sizes)

    def forward(self, x: LoraWeights) -> LoraWeights:
        """x: groups (B, L_g, h, r) → same shapes, rows rescaled."""
        diags = [(g.u * g.v).sum(-1) for g in x.groups]  # (B, L_g, h), invariant
        ctx = None
        if self.cross_layer:
            pooled = sum(torch.tanh(torch.einsum("blh,lhc->blc", d, w)).sum(1) for d, w in zip(diags, self.ctx_in))
            ctx = pooled / x.num_layers  # (B, c), mean over all layers
        out = []
        for j, (g, d) in enumerate(zip(x.groups, diags)):
            logit_u = self.a_u[j] * d + self.b_u[j]  # (B, L_g, h)
            logit_v = self.a_v[j] * d + self.b_v[j]
            if ctx is not None:
                logit_u = logit_u + torch.einsum("bc,lch->blh", ctx, self.ctx_u[j])
                logit_v = logit_v + torch.einsum("bc,lch->blh", ctx, self.ctx_v[j])
            out.append(LayerGroup(g.names, torch.sigmoid(logit_u).unsqueeze(-1) * g.u,
                                  torch.sigmoid(logit_v).unsqueeze(-1) * g.v))
        return LoraWeights(tuple(out))


class RowDropout(nn.Module):
    """Equivariant dropout: zero whole rows of every U_i and V_i (independent masks), rescale by 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: LoraWeights) -> LoraWeights:
        """x: groups (B, L_g, h, r) → same shapes."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p

        def drop(t: Tensor) -> Tensor:
            mask = torch.empty(*t.shape[:-1], 1, dtype=t.dtype, device=t.device).bernoulli_(keep)  # (B, L_g, h, 1)
            return t * mask / keep

        return x.map(drop)


class GLNet(LoLModel):
    """Input scaling → [GLLinear → GLGate → RowDropout]* → GLLinear → P_i = U_i V_iᵀ → head → (B, out)."""

    pads_rank = False  # padding is exact anyway
    rank_agnostic = True  # works for any r: nothing is sized by r

    def __init__(self, layout: Layout, out_dim: int, cfg: GLNetConfig):
        super().__init__(layout, out_dim)
        self.cfg = cfg
        sizes = [g.num_layers for g in layout.groups]
        # per-layer scale applied to both U_i and V_i (a scalar multiple of ΔW_i: invariant-safe)
        for j, lg in enumerate(sizes):
            self.register_buffer(f"input_scale{j}", torch.ones(lg))  # (L_g,)
        blocks: list[nn.Module] = []
        shapes = _group_shapes(layout)
        for h in cfg.hidden[:-1]:
            blocks += [GLLinear(shapes, h), GLGate(sizes, h, cfg.cross_layer, cfg.context), RowDropout(cfg.dropout)]
            shapes = [(lg, h, h) for lg in sizes]
        blocks.append(GLLinear(shapes, cfg.hidden[-1]))
        self.blocks = nn.Sequential(*blocks)
        h = cfg.hidden[-1]
        d = cfg.head[0]
        self.readout = nn.ParameterList(nn.Parameter(torch.randn(lg, h * h, d) / (h * (sum(sizes)) ** 0.5))
                                        for lg in sizes)
        self.readout_sq = nn.ParameterList(
            nn.Parameter(torch.randn(lg, h * h, d) / (h * (sum(sizes)) ** 0.5)) for lg in sizes
        ) if cfg.quadratic_readout else None
        self.readout_bias = nn.Parameter(torch.zeros(d))
        self.filters = SpectralFilterReadout(_group_shapes(layout), cfg.spectral_filters, h, d) if cfg.spectral_filters else None
        P = cfg.spectral_moments
        self.spectral = nn.Linear(sum(sizes) * P, d, bias=False) if P else None
        if P:  # (L·P,) training-set statistics
            self.register_buffer("spectral_mean", torch.zeros(sum(sizes) * P))
            self.register_buffer("spectral_std", torch.ones(sum(sizes) * P))
        self.head_norm = nn.LayerNorm(d) if cfg.head_norm else nn.Identity()  # on z (B, d)
        self.head = nn.Sequential(nn.GELU(), MLP(d, cfg.head[1:], out_dim, cfg.head_dropout))

    def input_scales(self) -> list[Tensor]:
        """Per group Tensor (L_g,): the factor applied to both U_i and V_i."""
        return [getattr(self, f"input_scale{j}") for j in range(len(self.layout.groups))]

    @torch.no_grad()
    def fit_input_stats(self, weights: LoraWeights, chunk_size: int = 512) -> None:
        """Training-set statistics: the spectral moments' mean and std (when on), and each layer's
        scale so the RMS entry of ΔW_i over the training set is 1 (with `normalize_input`)."""
        if self.spectral is not None:
            self.spectral_mean.zero_()  # raw moments first: spectral_features standardises with these
            self.spectral_std.fill_(1.0)
            moments = torch.cat([self.spectral_features(c) for c in self.chunks(weights, chunk_size)])  # (B, L·P)
            self.spectral_mean.copy_(moments.mean(0))
            self.spectral_std.copy_(moments.std(0).clamp(min=1e-6) if len(moments) > 1 else torch.ones_like(moments[0]))
        if not self.cfg.normalize_input:
            return
        self.layout.check(weights, what="training weights", check_rank=False)
        sums = [torch.zeros(g.num_layers, dtype=torch.float64) for g in weights.groups]
        for c in self.chunks(weights, chunk_size):
            for j, g in enumerate(c.groups):
                sums[j] += frobenius_sq(g.u.double(), g.v.double()).sum(0).cpu()  # (L_g,)
        for j, g in enumerate(weights.groups):
            rms = (sums[j] / (weights.batch_size * g.n * g.m)).sqrt()
            scale = torch.where(rms > 0, rms.rsqrt(), torch.ones_like(rms))  # applied to U and V: ΔW / rms
            getattr(self, f"input_scale{j}").copy_(scale)

    def equivariant_features(self, weights: LoraWeights) -> LoraWeights:
        """The hidden LoraWeights after the equivariant stack: groups (B, L_g, h, r)."""
        x = self.prepare(weights)
        x = LoraWeights(tuple(
            LayerGroup(g.names, g.u * s[:, None, None], g.v * s[:, None, None])
            for g, s in zip(x.groups, self.input_scales())
        ))
        if self.cfg.scale_free:
            x = LoraWeights(tuple(_unit_frobenius(g) for g in x.groups))
        return self.blocks(x)

    def spectral_features(self, weights: LoraWeights) -> Tensor:
        """Standardised spectral moments of every input layer: (B, L·P), layers in layout order."""
        x = self.prepare(weights)
        moments = torch.cat([spectral_log_moments(g.u, g.v, self.cfg.spectral_moments).flatten(1) for g in x.groups], -1)
        return ((moments - self.spectral_mean) / self.spectral_std).clamp(-SPECTRAL_CLIP, SPECTRAL_CLIP)

    def invariants(self, weights: LoraWeights) -> list[Tensor]:
        """P_i = (W U_i)(W' V_i)ᵀ per group: Tensors (B, L_g, h, h). GL-invariant."""
        return [g.u @ g.v.transpose(-1, -2) for g in self.equivariant_features(weights).groups]

    def forward(self, weights: LoraWeights) -> Tensor:
        """weights: LoraWeights of `layout` (any rank) → Tensor (B, out)."""
        z = self.readout_bias
        for j, p in enumerate(self.invariants(weights)):
            p = p.flatten(2)  # (B, L_g, h h)
            z = z + torch.einsum("blk,lkd->bd", p, self.readout[j])  # (B, d): Σ_i Linear_i(vec P_i)
            if self.readout_sq is not None:
                z = z + torch.einsum("blk,lkd->bd", p * p, self.readout_sq[j])
        if self.spectral is not None:
            z = z + self.spectral(self.spectral_features(weights))
        if self.filters is not None:
            z = z + self.filters(self.prepare(weights))
        return self.head(self.head_norm(z))

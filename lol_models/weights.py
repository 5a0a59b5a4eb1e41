"""Typed container for batches of LoRA weights, and their layout (the layers, their shapes and the
rank: what a model is built for, and what a published population's `layout.json` records).

Shape legend
    B    batch (number of LoRAs)
    L    layers in the whole LoRA;  L_g  layers in one shape group
    n    rows of ΔW (out features), U ∈ ℝ^{n×r}
    m    columns of ΔW (in features), V ∈ ℝ^{m×r}
    r    rank (common to every layer of a batch; lower ranks are zero-padded)

Per layer i a LoRA is the pair (U_i, V_i) with U_i = lora_B · (alpha / r) and V_i = lora_Aᵀ, so that
U_i V_iᵀ = ΔW_i exactly and LoRAs of different ranks are comparable. Layers of equal (n, m) are
stacked into a `LayerGroup` (in first-appearance order) so that models vectorise across them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["GroupLayout", "LayerGroup", "Layout", "LoraWeights", "collate"]


@dataclass(frozen=True)
class GroupLayout:
    """Shapes of one group of stacked layers: every layer in it has ΔW ∈ ℝ^{n×m}."""

    names: tuple[str, ...]
    n: int
    m: int

    @property
    def num_layers(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Layout:
    """What a model is built for: the layer groups (names, n, m) and the rank r.

    `rank` is the largest rank the model accepts. Rank-agnostic models (glnet, mlp_svd,
    mlp_dense) ignore it beyond the feature count; models on raw factors (mlp, mlp_oalign,
    transformer with flat tokens) zero-pad lower-rank inputs up to it.
    """

    groups: tuple[GroupLayout, ...]
    rank: int

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"Layout.rank must be ≥ 1, got {self.rank}")
        if not self.groups:
            raise ValueError("Layout.groups is empty: a LoRA needs at least one layer")

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(name for g in self.groups for name in g.names)

    @property
    def num_layers(self) -> int:
        return sum(g.num_layers for g in self.groups)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Layer name → (n, m), in group order."""
        return {name: (g.n, g.m) for g in self.groups for name in g.names}

    def same_layers(self, other: Layout) -> bool:
        """True when both describe the same layer names, grouping and (n, m); ranks may differ."""
        return [(g.names, g.n, g.m) for g in self.groups] == [
            (g.names, g.n, g.m) for g in other.groups
        ]

    def describe_difference(self, other: Layout) -> str:
        """A short human-readable account of how `other`'s layers differ from ours."""
        mine, theirs = self.shapes(), other.shapes()
        missing = [k for k in mine if k not in theirs]
        extra = [k for k in theirs if k not in mine]
        reshaped = [f"{k}: {mine[k]} vs {theirs[k]}" for k in mine if k in theirs and mine[k] != theirs[k]]
        parts = []
        if missing:
            parts.append(f"missing layers {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected layers {extra[:5]}{' …' if len(extra) > 5 else ''}")
        if reshaped:
            parts.append(f"different (n, m) {reshaped[:5]}{' …' if len(reshaped) > 5 else ''}")
        if not parts:
            parts.append(
                f"same layers but grouped/ordered differently: {[g.names for g in self.groups]} "
                f"vs {[g.names for g in other.groups]}"
            )
        return "; ".join(parts)

    def check(self, weights: LoraWeights, *, what: str = "weights", check_rank: bool = True) -> None:
        """Raise ValueError unless `weights` has these layers (and, if check_rank, a rank ≤ self.rank)."""
        other = weights.layout
        if not self.same_layers(other):
            raise ValueError(f"{what} do not match the model's layout: {self.describe_difference(other)}")
        if check_rank and other.rank > self.rank:
            raise ValueError(
                f"{what} have rank {other.rank}, above the layout's rank {self.rank}; "
                "build the model with Layout(..., rank=max rank) (lower ranks are zero-padded)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "groups": [{"names": list(g.names), "n": g.n, "m": g.m} for g in self.groups]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        return cls(
            groups=tuple(GroupLayout(tuple(g["names"]), int(g["n"]), int(g["m"])) for g in d["groups"]),
            rank=int(d["rank"]),
        )

    @classmethod
    def from_published(cls, layout: Mapping[str, Any]) -> Layout:
        """The layout of a published population's LoRAs (`layout.json`, see `lol_models.published`):
        its layers grouped by (n, m) as `LoraWeights.from_layers` groups them, rank = its r_max."""
        from lol_models.published import layer_shapes

        order: dict[tuple[int, int], list[str]] = {}
        for name, shape in layer_shapes(layout).items():
            order.setdefault(shape, []).append(name)
        return cls(tuple(GroupLayout(tuple(names), n, m) for (n, m), names in order.items()), int(layout["max_rank"]))


@dataclass(frozen=True, eq=False)
class LayerGroup:
    """Layers of equal (n, m), stacked.

    names: the L_g layer names;  u: Tensor (B, L_g, n, r);  v: Tensor (B, L_g, m, r).
    """

    names: tuple[str, ...]
    u: Tensor
    v: Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        if self.u.dim() != 4 or self.v.dim() != 4:
            raise ValueError(
                f"LayerGroup {self.names}: u and v must be (B, L_g, n, r) and (B, L_g, m, r), "
                f"got shapes {tuple(self.u.shape)} and {tuple(self.v.shape)}"
            )
        bu, lu, _, ru = self.u.shape
        bv, lv, _, rv = self.v.shape
        if (bu, lu, ru) != (bv, lv, rv):
            raise ValueError(
                f"LayerGroup {self.names}: u {tuple(self.u.shape)} and v {tuple(self.v.shape)} "
                "disagree on batch, layer count or rank"
            )
        if lu != len(self.names):
            raise ValueError(f"LayerGroup has {len(self.names)} names but {lu} stacked layers")

    @property
    def n(self) -> int:
        return self.u.shape[2]

    @property
    def m(self) -> int:
        return self.v.shape[2]

    @property
    def rank(self) -> int:
        return self.u.shape[3]

    @property
    def num_layers(self) -> int:
        return len(self.names)

    def delta(self) -> Tensor:
        """ΔW = U Vᵀ for every layer: Tensor (B, L_g, n, m). Quadratic memory; for tests and mlp_dense."""
        return self.u @ self.v.transpose(-1, -2)


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """A batch of LoRAs as a tuple of `LayerGroup`s sharing batch size B and rank r."""

    groups: tuple[LayerGroup, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        if not self.groups:
            raise ValueError("LoraWeights needs at least one layer group")
        b, r = self.groups[0].u.shape[0], self.groups[0].rank
        for g in self.groups:
            if g.u.shape[0] != b or g.rank != r:
                raise ValueError(
                    f"all groups must share batch size and rank: group {g.names[:2]}… has "
                    f"B={g.u.shape[0]}, r={g.rank}, the first has B={b}, r={r}"
                )
        names = self.layer_names
        if len(set(names)) != len(names):
            dup = sorted({x for x in names if names.count(x) > 1})
            raise ValueError(f"duplicate layer names {dup}")

    # ---- basic properties -------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.groups[0].u.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    @property
    def rank(self) -> int:
        return self.groups[0].rank

    @property
    def layer_names(self) -> tuple[str, ...]:
        """All layer names, group by group (the order models see them in)."""
        return tuple(name for g in self.groups for name in g.names)

    @property
    def num_layers(self) -> int:
        return sum(g.num_layers for g in self.groups)

    @property
    def layout(self) -> Layout:
        return Layout(tuple(GroupLayout(g.names, g.n, g.m) for g in self.groups), self.rank)

    @property
    def dtype(self) -> torch.dtype:
        return self.groups[0].u.dtype

    @property
    def device(self) -> torch.device:
        return self.groups[0].u.device

    def tensors(self) -> list[Tensor]:
        return [t for g in self.groups for t in (g.u, g.v)]

    def layer(self, name: str) -> tuple[Tensor, Tensor]:
        """(U (B, n, r), V (B, m, r)) of one layer by name."""
        for g in self.groups:
            if name in g.names:
                j = g.names.index(name)
                return g.u[:, j], g.v[:, j]
        raise KeyError(f"no layer {name!r}; layers are {list(self.layer_names)}")

    def finite_mask(self) -> Tensor:
        """Bool Tensor (B,): True where every entry of every U and V of that LoRA is finite."""
        ok = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        for t in self.tensors():
            ok &= torch.isfinite(t).flatten(1).all(dim=1)
        return ok

    # ---- transformations ----------------------------------------------------------------
    def map(self, fn: Callable[[Tensor], Tensor]) -> LoraWeights:
        """Apply `fn` to every U and V tensor (B, L_g, ·, r), keeping names."""
        return LoraWeights(tuple(LayerGroup(g.names, fn(g.u), fn(g.v)) for g in self.groups))

    def to(self, *args: Any, **kwargs: Any) -> LoraWeights:
        """Like `Tensor.to`: device and/or dtype."""
        return self.map(lambda t: t.to(*args, **kwargs))

    def index(self, batch_idx: int | slice | Sequence[int] | Tensor) -> LoraWeights:
        """Select LoRAs along the batch. An int keeps the batch dimension (B = 1)."""
        if isinstance(batch_idx, int):
            batch_idx = slice(batch_idx, batch_idx + 1) if batch_idx != -1 else slice(-1, None)
        elif not isinstance(batch_idx, (slice, Tensor)):
            batch_idx = torch.as_tensor(list(batch_idx), dtype=torch.long)
        if isinstance(batch_idx, Tensor):
            batch_idx = batch_idx.to(self.device)
        return self.map(lambda t: t[batch_idx])

    def pad_rank(self, r_max: int) -> LoraWeights:
        """Zero-pad U and V to rank `r_max` (new zero columns); every U Vᵀ is unchanged."""
        if r_max < self.rank:
            raise ValueError(f"pad_rank({r_max}) is below the current rank {self.rank}")
        if r_max == self.rank:
            return self
        return self.map(lambda t: torch.nn.functional.pad(t, (0, r_max - self.rank)))

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def from_layers(cls, names: Sequence[str], us: Sequence[Tensor], vs: Sequence[Tensor]) -> LoraWeights:
        """Build from per-layer factors, grouping layers of equal (n, m) in first-appearance order.

        names: L layer names;  us[i]: Tensor (B, n_i, r);  vs[i]: Tensor (B, m_i, r).
        """
        if not (len(names) == len(us) == len(vs)):
            raise ValueError(f"got {len(names)} names, {len(us)} U tensors and {len(vs)} V tensors")
        if not names:
            raise ValueError("from_layers needs at least one layer")
        order: dict[tuple[int, int], list[int]] = {}
        for i, (name, u, v) in enumerate(zip(names, us, vs)):
            if u.dim() != 3 or v.dim() != 3:
                raise ValueError(
                    f"layer {name!r}: U must be (B, n, r) and V (B, m, r), got {tuple(u.shape)} and {tuple(v.shape)}"
                )
            if u.shape[0] != v.shape[0] or u.shape[2] != v.shape[2]:
                raise ValueError(f"layer {name!r}: U {tuple(u.shape)} and V {tuple(v.shape)} disagree on B or r")
            order.setdefault((u.shape[1], v.shape[1]), []).append(i)
        groups = tuple(
            LayerGroup(
                tuple(names[i] for i in idx),
                torch.stack([us[i] for i in idx], dim=1),  # (B, L_g, n, r)
                torch.stack([vs[i] for i in idx], dim=1),  # (B, L_g, m, r)
            )
            for idx in order.values()
        )
        return cls(groups)

    @classmethod
    def from_peft(
        cls,
        lora_A: Mapping[str, Tensor],
        lora_B: Mapping[str, Tensor],
        alpha: float,
        rank: int,
        *,
        use_rslora: bool = False,
    ) -> LoraWeights:
        """From peft-style factors: lora_A[name]: (B, r, in), lora_B[name]: (B, out, r).

        U = lora_B · scaling (B, out, r), V = lora_Aᵀ (B, in, r), scaling = alpha / r
        (alpha / √r with rsLoRA), so U Vᵀ = ΔW. Layer order is lora_A's key order.
        """
        if set(lora_A) != set(lora_B):
            raise ValueError(
                f"lora_A and lora_B name different layers: only in A {sorted(set(lora_A) - set(lora_B))}, "
                f"only in B {sorted(set(lora_B) - set(lora_A))}"
            )
        if rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {rank}")
        scaling = alpha / (rank**0.5 if use_rslora else rank)
        names = list(lora_A)
        for name in names:
            a, b = lora_A[name], lora_B[name]
            if a.dim() != 3 or b.dim() != 3 or a.shape[1] != rank or b.shape[2] != rank:
                raise ValueError(
                    f"layer {name!r}: expected lora_A (B, {rank}, in) and lora_B (B, out, {rank}), "
                    f"got {tuple(a.shape)} and {tuple(b.shape)}"
                )
        us = [lora_B[k] * scaling for k in names]
        vs = [lora_A[k].transpose(1, 2) for k in names]
        return cls.from_layers(names, us, vs)


def collate(items: Sequence[LoraWeights]) -> LoraWeights:
    """Concatenate along the batch; mixed ranks are zero-padded to the largest.

    Every item must have the same layers (names, grouping, (n, m)); dtype/device of the first wins.
    """
    if not items:
        raise ValueError("collate needs at least one LoraWeights")
    first = items[0].layout
    for k, w in enumerate(items[1:], start=1):
        if not first.same_layers(w.layout):
            raise ValueError(f"item {k} has a different layout from item 0: {first.describe_difference(w.layout)}")
    r_max = max(w.rank for w in items)
    dtype, device = items[0].dtype, items[0].device
    padded = [w.pad_rank(r_max).to(device=device, dtype=dtype) for w in items]
    groups = tuple(
        LayerGroup(
            g0.names,
            torch.cat([p.groups[j].u for p in padded], dim=0),
            torch.cat([p.groups[j].v for p in padded], dim=0),
        )
        for j, g0 in enumerate(padded[0].groups)
    )
    return LoraWeights(groups)

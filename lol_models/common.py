"""Shared pieces of the LoL models: config helpers, the model base, input standardisation, MLPs.

Shape legend
    B batch, F features, L layers, r rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lol_models.weights import Layout, LoraWeights
from storage.errors import DomainError

__all__ = ["LoLModel", "MLP", "SettingsError", "Standardizer", "coerce_config", "describe_config", "opt"]

C = TypeVar("C")


class SettingsError(DomainError):
    """A setting a caller chose that the LoL models cannot use: an unknown model or config key, a value
    out of range, a model over its memory budget. Bad input (`lol` exits 2), unlike a shape mismatch
    between tensors, which is a bug (plain ValueError)."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a help string (shown by `describe_config`)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for config defaults")
    return dataclasses.field(default=default, metadata={"help": help})


def describe_config(cls: type) -> str:
    """One line per field: name, default, help."""
    return "\n".join(
        f"{f.name} = {f.default!r}: {f.metadata.get('help', '')}" for f in dataclasses.fields(cls)
    )


def coerce_config(cls: type[C], config: C | Mapping[str, Any] | None, *, model: str) -> C:
    """None → defaults; a mapping → cls(**mapping) (unknown keys rejected); an instance → itself."""
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if isinstance(config, Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise SettingsError(f"{model}: unknown config keys {unknown}; valid keys are {sorted(names)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        return cls(**values)
    raise ValueError(f"{model}: config must be a {cls.__name__}, a dict or None, got {type(config).__name__}")


def check_positive_ints(owner: str, **fields: Any) -> None:
    for name, value in fields.items():
        values = value if isinstance(value, tuple) else (value,)
        if not values or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in values):
            raise SettingsError(f"{owner}.{name} must be positive integer(s), got {value!r}")


def check_probability(owner: str, **fields: float) -> None:
    for name, value in fields.items():
        if not (0.0 <= value < 1.0):
            raise SettingsError(f"{owner}.{name} must be in [0, 1), got {value!r}")


class Standardizer(nn.Module):
    """x ↦ (x − mean) / std with train statistics kept as buffers of shape `feature_shape`.

    Features that never vary (std ≈ 0, e.g. padded singular values) get std 1.
    """

    def __init__(self, feature_shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(feature_shape))
        self.register_buffer("std", torch.ones(feature_shape))

    @torch.no_grad()
    def fit(self, chunks: Iterable[Tensor]) -> None:
        """chunks: Tensors (b, *feature_shape); accumulated in float64."""
        total, s1, s2 = 0, None, None
        for x in chunks:
            x = x.detach().to(torch.float64)
            s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
            s2 = (x * x).sum(0) if s2 is None else s2 + (x * x).sum(0)
            total += x.shape[0]
        if total == 0:
            raise ValueError("cannot fit input statistics on an empty training set")
        mean = s1 / total
        var = (s2 / total - mean * mean).clamp_min(0.0)
        std = var.sqrt()
        scale = std.abs().max().clamp_min(1e-30)
        std = torch.where(std > 1e-6 * scale, std, torch.ones_like(std))
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(std.to(self.std.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Sequential):
    """in_dim → hidden… → out_dim with GELU and dropout between layers."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int, dropout: float = 0.0):
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.GELU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        layers.append(nn.Linear(d, out_dim))
        super().__init__(*layers)


class LoLModel(nn.Module):
    """Base of every LoL predictor: forward(weights: LoraWeights) -> Tensor (B, out_dim).

    Subclasses may override `fit_input_stats` (called by training on the training set before the
    first step) to set input-normalisation buffers; it must not break the model's symmetry.
    """

    pads_rank: bool = True  # pad inputs of lower rank to layout.rank before `forward`
    rank_agnostic: bool = False  # accepts inputs of any rank (layout.rank is not a limit)

    def __init__(self, layout: Layout, out_dim: int):
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be ≥ 1, got {out_dim}")
        self.layout = layout
        self.out_dim = out_dim

    def prepare(self, weights: LoraWeights) -> LoraWeights:
        """Validate the layout (ValueError on mismatch) and pad the rank if this model needs it."""
        self.layout.check(weights, check_rank=not self.rank_agnostic)
        return weights.pad_rank(self.layout.rank) if self.pads_rank else weights

    def fit_input_stats(self, weights: LoraWeights, chunk_size: int = 512) -> None:  # noqa: B027
        """Default: nothing to fit."""

    @staticmethod
    def chunks(weights: LoraWeights, chunk_size: int) -> Iterable[LoraWeights]:
        for start in range(0, weights.batch_size, chunk_size):
            yield weights.index(slice(start, start + chunk_size))

"""Models chosen by name: `build_model(name, layout, out_dim, config)`.

config may be None (defaults), a dict of that model's config fields, or the config object itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lol_models.common import LoLModel, SettingsError, coerce_config, describe_config
from lol_models.glnet import GLNet, GLNetConfig
from lol_models.models import (
    DenseConfig,
    LayerTransformer,
    MLPConfig,
    OAlignConfig,
    SVDConfig,
    TransformerConfig,
    build_mlp,
    build_mlp_dense,
    build_mlp_oalign,
    build_mlp_svd,
)
from lol_models.names import PREDICTORS
from lol_models.weights import Layout

__all__ = ["MODELS", "ModelSpec", "available_models", "build_model", "register_model"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type
    build: Callable[[Layout, int, Any], LoLModel]
    symmetry: str  # "none", "O(r)", "GL(r)"
    help: str


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, config_cls: type, build: Callable[[Layout, int, Any], LoLModel], *,
                   symmetry: str, help: str) -> None:
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = ModelSpec(name, config_cls, build, symmetry, help)


register_model("mlp", MLPConfig, build_mlp, symmetry="none", help="MLP on flattened U, V")
register_model("mlp_svd", SVDConfig, build_mlp_svd, symmetry="GL(r)",
               help="MLP on the singular values of each U Vᵀ (QR, never n×m)")
register_model("mlp_oalign", OAlignConfig, build_mlp_oalign, symmetry="O(r)",
               help="MLP on factors Procrustes-aligned to a seeded random template")
register_model("mlp_dense", DenseConfig, build_mlp_dense, symmetry="GL(r)",
               help="MLP on flattened U Vᵀ (n·m per layer, budgeted)")
register_model("transformer", TransformerConfig, LayerTransformer, symmetry="GL(r) with token='svd', else none",
               help="one token per layer, TransformerEncoder, mean pool")
register_model("glnet", GLNetConfig, GLNet, symmetry="GL(r)",
               help="GL-equivariant linear layers, invariant row gates, invariant head")


assert tuple(MODELS) == PREDICTORS, "lol_models/names.py lists the built-in predictors, in registration order"


def available_models() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, layout: Layout, out_dim: int, config: Any | Mapping[str, Any] | None = None) -> LoLModel:
    """A fresh model `name` for inputs of `layout`, predicting `out_dim` numbers (B, out_dim)."""
    if name not in MODELS:
        raise SettingsError(f"unknown model {name!r}; available: {available_models()}")
    if not isinstance(layout, Layout):
        raise ValueError(f"layout must be a lol_models.Layout (e.g. weights.layout), got {type(layout).__name__}")
    spec = MODELS[name]
    cfg = coerce_config(spec.config_cls, config, model=name)
    return spec.build(layout, out_dim, cfg)


def model_help(name: str) -> str:
    spec = MODELS[name]
    return f"{name}: {spec.help} (invariant to {spec.symmetry})\n{describe_config(spec.config_cls)}"

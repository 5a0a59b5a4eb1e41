"""Models chosen by name: `build_model(name, layout, out_dim, config)`.

config may be None (defaults), a dict of that model's config fields, or the config object itself.
Each predictor is registered with its own search space (`lol_models.search.SearchSpace`, drawn from
under the tuning budget every predictor shares) and, where a model's authors configured it per task,
task defaults (`config_for`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lol_models.common import LoLModel, SettingsError, coerce_config, describe_config
from lol_models.glnet import GLNet, GLNetConfig
from lol_models.glnet_paper import GLNetPaper, GLNetPaperConfig
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
from lol_models.search import TRAIN_DEFAULTS, TRAIN_KEYS, SearchSpace
from lol_models.weights import Layout

__all__ = ["MODELS", "ModelSpec", "available_models", "build_model", "check_search", "config_for", "register_model", "space_for"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type
    build: Callable[[Layout, int, Any], LoLModel]
    symmetry: str  # "none", "O(r)", "GL(r)"
    help: str
    search: SearchSpace  # what the tuning budget draws from
    task_defaults: Mapping[str, Mapping[str, Any]]  # task kind → config overrides (before the search's)
    unit_cost: float = 1.0  # relative time of one protocol unit (selection + final seeds); parallel runs start the dearest first


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, config_cls: type, build: Callable[[Layout, int, Any], LoLModel], *,
                   symmetry: str, help: str, search: SearchSpace = SearchSpace(),
                   task_defaults: Mapping[str, Mapping[str, Any]] | None = None, unit_cost: float = 1.0) -> None:
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    for key, choices in search.model.items():  # every choice names a field and is a valid value
        for choice in choices:
            coerce_config(config_cls, {key: choice}, model=name)
    for fields in (task_defaults or {}).values():
        coerce_config(config_cls, dict(fields), model=name)
    MODELS[name] = ModelSpec(name, config_cls, build, symmetry, help, search, dict(task_defaults or {}), unit_cost)


# Training settings every predictor's space shares (the learn settings' values are the defaults' candidate).
TRAIN_SPACE = {"lr": (3e-4, 1e-3, 3e-3), "weight_decay": (1e-3, 1e-2, 1e-1)}
MLP_SPACE = {"hidden": ((64, 64), (128,), (32, 32), (128, 128)), "dropout": (0.0, 0.1, 0.3)}
# unit_cost: hundreds of seconds per unit on one core, the middle of what tiny-shapes at 1,000 LoRAs measured (docs/results.md):
# MLP+Dense 752–853 s, GL-net 833–839 s, Transformer 338–375 s, glnet_paper 125–341 s, the MLPs 99–319 s.

register_model("mlp", MLPConfig, build_mlp, symmetry="none", help="MLP on flattened U, V",
               search=SearchSpace(MLP_SPACE, TRAIN_SPACE),
               unit_cost=2)
register_model("mlp_svd", SVDConfig, build_mlp_svd, symmetry="GL(r)",
               help="MLP on the singular values of each U Vᵀ (QR, never n×m)",
               search=SearchSpace({**MLP_SPACE, "log": (False, True)}, TRAIN_SPACE),
               unit_cost=2)
register_model("mlp_oalign", OAlignConfig, build_mlp_oalign, symmetry="O(r)",
               help="MLP on factors Procrustes-aligned to a seeded random template",
               search=SearchSpace(MLP_SPACE, TRAIN_SPACE),
               unit_cost=2)
register_model("mlp_dense", DenseConfig, build_mlp_dense, symmetry="GL(r)",
               help="MLP on flattened U Vᵀ (n·m per layer, budgeted)",
               search=SearchSpace(MLP_SPACE, TRAIN_SPACE),
               unit_cost=8)
register_model("transformer", TransformerConfig, LayerTransformer, symmetry="GL(r) with token='svd', else none",
               help="one token per layer, TransformerEncoder, mean pool",
               search=SearchSpace({"d_model": (16, 32, 64), "num_layers": (1, 2, 3), "dropout": (0.0, 0.1)}, TRAIN_SPACE),
               unit_cost=3.5)
register_model("glnet", GLNetConfig, GLNet, symmetry="GL(r)",
               help="GL-equivariant linear layers, invariant row gates, invariant head",
               search=SearchSpace({"hidden": ((16, 16), (16,), (32,), (32, 32)), "head": ((64,), (128,), (64, 64)),
                                   "spectral_moments": (0, 2), "dropout": (0.0, 0.1), "head_norm": (False, True),
                                   "normalize_input": (False, True)}, TRAIN_SPACE),
               # Label tasks: the authors' head (one equivariant layer, every entry of P_i → LayerNorm) on inputs
               # normalised per layer. Chosen on validation only: on tiny-shapes' attributes (1,000 LoRAs) it reaches
               # ROC-AUC 0.837 (2 seeds) where the best of the 8 configs drawn around the regression defaults was 0.815
               # (`bench/selection/glnet_attributes_heads.py`); on tiny-arc's sources the drawn config with
               # head_norm and normalize_input won selection (0.926 vs the defaults' 0.696). Task defaults sit under every
               # candidate: the first config is this head; the other 7 draw the space's fields as before and keep
               # quadratic_readout off (not in the space).
               task_defaults={"multilabel": {"hidden": (32,), "head": (128,), "head_norm": True, "normalize_input": True,
                                             "spectral_moments": 0, "quadratic_readout": False}},
               unit_cost=8.4)
register_model("glnet_paper", GLNetPaperConfig, GLNetPaper, symmetry="GL(r)",
               help="the authors' GL-net: one equivariant linear layer, P_i = W₁ΔW_iW₂ᵀ, "
                    "Linear → LayerNorm → ReLU → Linear head",
               search=SearchSpace({"hidden": (8, 16, 32), "head": (32, 64, 128)}, TRAIN_SPACE),
               task_defaults={"regression": {"readout": "mean"}, "multilabel": {"readout": "full"}},
               unit_cost=2.5)


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


def config_for(name: str, task_kind: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config fields to build `name` with for a task of `task_kind`: its task defaults, then `overrides`."""
    if name not in MODELS:
        raise SettingsError(f"unknown model {name!r}; available: {available_models()}")
    return {**MODELS[name].task_defaults.get(task_kind, {}), **dict(overrides or {})}


def space_for(name: str, extra: Mapping[str, Sequence[Any]] | None = None) -> SearchSpace:
    """`name`'s search space, widened by `extra` (config field or training setting → its choices), e.g. a
    manifest's `learn.search`. A field of `extra` replaces the space's choices for it or adds it. Each choice must
    have its field's type (a tuple field takes lists, a bool field true/false, a number field numbers; YAML's
    `1e-3`, read as text, is taken as the number) and build a valid config on its own; `check_search` then builds
    every config a budget draws. The first config a budget tries is always the predictor's defaults."""
    spec = MODELS[name]  # KeyError for a name no manifest can give (they are checked against lol_models.names)
    model, train = dict(spec.search.model), dict(spec.search.train)
    defaults = {f.name: f.default for f in dataclasses.fields(spec.config_cls)}
    for key, choices in (extra or {}).items():
        if key not in defaults and key not in TRAIN_KEYS:
            raise SettingsError(f"learn.search.{name}: {key!r} is neither a config field of {name} ({sorted(defaults)}) "
                                f"nor a training setting ({list(TRAIN_KEYS)})")
        if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence) or not choices:
            raise SettingsError(f"learn.search.{name}.{key}: give a non-empty list of choices, got {choices!r}")
        default = TRAIN_DEFAULTS[key] if key in TRAIN_KEYS else defaults[key]
        values = tuple(None if c is None and key == "grad_clip" else _typed_choice(f"learn.search.{name}.{key}", default, _frozen(c))
                       for c in choices)  # grad_clip None: no clipping
        if len(set(values)) < len(values):
            raise SettingsError(f"learn.search.{name}.{key}: choices repeat, got {list(choices)!r}")
        if key in TRAIN_KEYS:
            train[key] = values
            continue
        for value in values:
            try:
                coerce_config(spec.config_cls, {key: value}, model=name)
            except (SettingsError, TypeError, ValueError) as exc:
                raise SettingsError(f"learn.search.{name}.{key}: the choice {value!r} is not valid: {exc}") from exc
        model[key] = values
    return SearchSpace(model, train)


def _typed_choice(owner: str, default: Any, value: Any) -> Any:
    """`value` as a field whose default is `default` holds it, or SettingsError saying what the field takes."""
    def refuse(wanted: str) -> SettingsError:
        return SettingsError(f"{owner}: {value!r} is not valid; the field takes {wanted} (its default is {default!r})")

    if value is None and default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise refuse("true or false")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                raise refuse("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise refuse("a finite number")
        if isinstance(default, int) and not isinstance(default, bool):
            if float(value) != int(value):
                raise refuse("a whole number")
            return int(value)
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, tuple):
            raise refuse("a list, e.g. [64, 64] (one choice) — the choices are a list of lists")
        return value
    if isinstance(default, str) and not isinstance(value, str):
        raise refuse("text")
    return value


def check_search(settings_search: Mapping[str, Mapping[str, Sequence[Any]]], budget: int,
                 build_pool: Callable[[str, str], Any]) -> None:
    """Refuse a bad `learn.search` before anything trains: every named predictor's widened space, then the whole pool
    of configs a budget draws from it for each task kind (`build_pool(predictor, kind)`, e.g. protocol.tuning_pool),
    so a choice that clashes with another field or a task default, or a space too small for the budget, is caught."""
    for predictor, fields in settings_search.items():
        space_for(predictor, fields)
        for kind in ("regression", "multilabel"):
            try:
                build_pool(predictor, kind)
            except SettingsError as exc:
                raise SettingsError(f"learn.search.{predictor}: a config the tuning budget ({budget}) draws for "
                                    f"{kind} tasks is not valid: {exc}") from exc


def _frozen(value: Any) -> Any:
    """Lists (as YAML gives them) → tuples, recursively, so choices hash and compare as configs hold them."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def model_help(name: str) -> str:
    spec = MODELS[name]
    return f"{name}: {spec.help} (invariant to {spec.symmetry})\n{describe_config(spec.config_cls)}"

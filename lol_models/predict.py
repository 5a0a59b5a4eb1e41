"""Applying trained predictors to LoRAs that were not in the published dataset.

A LoRA is given as a peft adapter (its adapter_config.json and its tensors). It is featurised
exactly as a published row is: its factors are written into the population's row layout
(`published.flatten`, zero-padding the rank to r_max) and read back as U = lora_B · alpha / r,
V = lora_Aᵀ (`data.factors_from_flat`) — so a stored LoRA and its published row give the
predictor the same input. A LoRA of rank above r_max is featurised at its own rank, and only for
predictors that take any rank (`rank_agnostic`, e.g. glnet); the others are built for r ≤ r_max.

`check_adapter` refuses, with one line naming what is wrong and what would be valid, a LoRA whose
target modules, module names, shapes or rank the predictor cannot read, and adapters that are not
plain LoRAs (DoRA, rsLoRA, per-module rank or alpha patterns). Checking the base the adapter names
is the caller's (the pipeline knows how bases are named).

Shapes: N LoRAs, T targets of a task, r rank, in/out sizes of a layer.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lol_models.data import factors_from_flat
from lol_models.predictors import PredictorError, SavedPredictor
from lol_models.published import (
    FormatError,
    check_factor_shapes,
    flatten,
    layer_shapes,
    make_layout,
    module_factors,
)
from lol_models.train import predict as forward
from lol_models.weights import LoraWeights

__all__ = ["Adapter", "Prediction", "adapter_from_tensors", "check_adapter", "featurise", "predict_adapters"]

NOT_PLAIN = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern")


@dataclass
class Adapter:
    """One LoRA as a peft adapter holds it."""

    name: str  # how outputs and errors call it (a folder, a job id)
    config: dict[str, Any]  # adapter_config.json
    factors: dict[str, tuple[np.ndarray, np.ndarray]]  # module -> (lora_A (r, in), lora_B (out, r)), sorted by name
    rank: int
    alpha: float


def _short(names: Sequence[str], k: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:k]) + (f" … ({len(names)} in all)" if len(names) > k else "")


def adapter_from_tensors(name: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> Adapter:
    """The Adapter of a peft folder's config and tensors; PredictorError unless it is a plain LoRA
    (peft_type LORA, no DoRA / rsLoRA / rank or alpha patterns) whose tensors have the config's rank."""
    config = dict(config)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise PredictorError(f"{name}: a {config.get('peft_type')} adapter; predictors read LoRA adapters (peft_type LORA)")
    unusual = [key for key in NOT_PLAIN if config.get(key)]
    if unusual:
        raise PredictorError(f"{name}: adapter_config.json sets {', '.join(unusual)}; predictors read plain LoRAs "
                             "(ΔW = lora_B·lora_A·alpha/r with one rank and alpha for every module)")
    try:
        factors = module_factors(tensors)
    except FormatError as exc:
        raise PredictorError(f"{name}: {exc}") from None
    if not factors:
        raise PredictorError(f"{name}: the adapter holds no lora_A / lora_B tensors")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    ranks = sorted({int(a.shape[0]) for a, _ in factors.values() if a.ndim == 2})
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise PredictorError(f"{name}: adapter_config.json has r = {rank!r}; a LoRA's rank is a whole number ≥ 1")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not np.isfinite(alpha):
        raise PredictorError(f"{name}: adapter_config.json has lora_alpha = {alpha!r}; expected a number")
    try:
        check_factor_shapes(factors, rank)
    except FormatError as exc:
        raise PredictorError(f"{name}: {exc} (adapter_config.json says r = {rank}; the tensors have rank {ranks})") from None
    bad = [m for m, (a, b) in factors.items() if not (np.isfinite(a).all() and np.isfinite(b).all())]
    if bad:
        raise PredictorError(f"{name}: NaN/Inf values in module(s) {_short(bad)}")
    return Adapter(name, config, factors, rank, float(alpha))


def check_adapter(adapter: Adapter, predictor: SavedPredictor) -> None:
    """PredictorError (one line: what is wrong, what would be valid) unless `predictor` can read `adapter`:
    the same target modules, exactly the population's modules with their (out, in) shapes, and a rank
    ≤ r_max, or any rank for rank-agnostic predictors."""
    name, population = adapter.name, ", ".join(predictor.facts.get("population") or []) or "its population"
    wanted = sorted(predictor.facts.get("target_modules") or [])
    targets = adapter.config.get("target_modules")  # a list, or peft's regex / "all-linear" (then modules decide)
    targets = sorted(map(str, targets)) if isinstance(targets, list) else None
    if wanted and targets is not None and targets != wanted:
        raise PredictorError(f"{name}: target modules {targets} differ from {population}'s {wanted}; "
                             f"{predictor.predictor} reads LoRAs on {wanted} only")
    expected = layer_shapes(predictor.published_layout)  # module -> (out, in)
    missing = [m for m in expected if m not in adapter.factors]
    extra = [m for m in adapter.factors if m not in expected]
    if missing or extra:
        parts = ([f"lacks {len(missing)} of its modules ({_short(missing)})"] if missing else []) + \
                ([f"has {len(extra)} it does not ({_short(extra)})"] if extra else [])
        raise PredictorError(f"{name}: the adapter {' and '.join(parts)}: it is not a LoRA of {population}'s base "
                             f"(expected the {len(expected)} modules {_short(list(expected))})")
    for module, (out_features, in_features) in expected.items():
        a, b = adapter.factors[module]
        if (b.shape[0], a.shape[1]) != (out_features, in_features):
            raise PredictorError(f"{name}: module {module} is {b.shape[0]}×{a.shape[1]} (out×in); {population}'s base "
                                 f"has {out_features}×{in_features} there: a different base or architecture")
    r_max = predictor.max_rank
    if adapter.rank > r_max and not predictor.rank_agnostic:
        raise PredictorError(f"{name}: rank {adapter.rank} is above {r_max}, the largest rank {predictor.predictor} "
                             f"reads (it was trained on ranks {predictor.facts.get('ranks')}, lower ranks are "
                             f"zero-padded); use a rank ≤ {r_max}, or a predictor that reads any rank (glnet)")


def featurise(adapter: Adapter, predictor: SavedPredictor) -> LoraWeights:
    """The predictor's input for one (checked) adapter: a batch of one, featurised as a published row."""
    layout = predictor.published_layout
    ordered = {block: adapter.factors[block] for block in layer_shapes(layout)}  # the layout's module order
    if adapter.rank > layout["max_rank"]:  # rank-agnostic predictors only (check_adapter)
        layout = make_layout(ordered, adapter.rank)
    row = flatten(ordered, layout)[None]  # (1, D) float32, as the published row
    alpha = torch.tensor([adapter.alpha], dtype=torch.float64)
    rank = torch.tensor([adapter.rank], dtype=torch.int64)
    return factors_from_flat(torch.from_numpy(row), layout, alpha, rank)


@dataclass
class Prediction:
    """What the predictors said about each adapter, and how long saying it took."""

    values: list[dict[str, float]]  # per adapter: label column -> value (regression: label units;
    #                                 multilabel: probability of 1)
    kinds: dict[str, str]  # label column -> "regression" | "multilabel"
    seconds: list[float]  # per adapter: featurising + forward of every predictor (median over repeats)
    warmup_seconds: float  # the first forward of each predictor (allocations), not counted above
    device: str
    torch_threads: int
    per_task_seconds: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def _output(predictor: SavedPredictor, weights: LoraWeights) -> Tensor:
    """(N, T) in label units (regression) or probabilities (multilabel)."""
    raw = forward(predictor.model, weights).double()
    if predictor.kind == "regression":
        return raw * predictor.target_std + predictor.target_mean
    return torch.sigmoid(raw)


def predict_adapters(predictors: Sequence[SavedPredictor], adapters: Sequence[Adapter], repeats: int = 3) -> Prediction:
    """Every predictor on every (checked) adapter, one adapter at a time, each timed on its own:
    featurise + forward, median of `repeats` runs after one warm-up forward per predictor."""
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    for predictor in predictors:
        for adapter in adapters:
            check_adapter(adapter, predictor)
    started = time.perf_counter()
    for predictor in predictors:
        _output(predictor, featurise(adapters[0], predictor))
    warmup = time.perf_counter() - started
    values, seconds, per_task = [], [], []
    for adapter in adapters:
        row, spent = {}, {}
        for predictor in predictors:
            times = []
            for _ in range(repeats):
                begun = time.perf_counter()
                out = _output(predictor, featurise(adapter, predictor))[0]  # (T,)
                times.append(time.perf_counter() - begun)
            spent[predictor.task] = statistics.median(times)
            row.update({column: float(out[t]) for t, column in enumerate(predictor.columns)})
        values.append(row)
        per_task.append(spent)
        seconds.append(sum(spent.values()))
    kinds = {column: p.kind for p in predictors for column in p.columns}
    device = str(next(iter(predictors[0].model.parameters())).device)
    return Prediction(values, kinds, seconds, warmup, device, torch.get_num_threads(), per_task)

"""Tuning budgets: each predictor's own search space and the configs drawn from it.

A `SearchSpace` (declared beside each predictor in `lol_models.registry`) lists choices per field of
the predictor's config (`model`) and per training setting (`train`: fields of `TrainConfig`, e.g. lr,
weight_decay). `candidates(space, budget, seed)` gives `budget` configs: the first is the predictor's
defaults (model defaults, the learn settings' training values), the others drawn uniformly without
replacement from the product of the choices, by `random.Random(seed)`. Every predictor gets the same
budget, so no predictor is tuned more than another; what is chosen is chosen on validation only
(`lol_models.protocol`). A light module: no torch.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lol_models.common import SettingsError

__all__ = ["Candidate", "SearchSpace", "candidates"]

TRAIN_KEYS = ("lr", "weight_decay", "batch_size", "grad_clip")
# their types, as lol_models.train.TrainConfig's defaults (grad_clip may also be None: no clipping);
# tests/test_lol_protocol.py checks they agree
TRAIN_DEFAULTS = {"lr": 1e-3, "weight_decay": 1e-2, "batch_size": 64, "grad_clip": 1.0}


@dataclass(frozen=True)
class SearchSpace:
    """Choices per model-config field (`model`) and per training setting (`train`, keys of TRAIN_KEYS)."""

    model: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    train: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.train) - set(TRAIN_KEYS))
        if unknown:
            raise SettingsError(f"SearchSpace.train: unknown training settings {unknown}; tunable: {list(TRAIN_KEYS)}")
        for part, choices in (("model", self.model), ("train", self.train)):
            empty = [k for k, v in choices.items() if not isinstance(v, tuple) or not v]
            if empty:
                raise SettingsError(f"SearchSpace.{part}: {empty} need a non-empty tuple of choices")

    @property
    def size(self) -> int:
        """How many distinct configs the space holds."""
        n = 1
        for choices in (*self.model.values(), *self.train.values()):
            n *= len(choices)
        return n


@dataclass(frozen=True)
class Candidate:
    """One config to try: overrides of the model's config and of the training settings ({}: defaults)."""

    model: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        return json.dumps({"model": dict(self.model), "train": dict(self.train)}, sort_keys=True, default=str)

    def as_dict(self) -> dict[str, Any]:
        return {"model": {k: list(v) if isinstance(v, tuple) else v for k, v in self.model.items()},
                "train": dict(self.train)}


def candidates(space: SearchSpace, budget: int, seed: int = 0) -> list[Candidate]:
    """`budget` distinct configs: the defaults first, then uniform draws without replacement from `space`."""
    if budget < 1:
        raise SettingsError(f"the tuning budget must be ≥ 1 config, got {budget}")
    if budget > 1 and space.size < budget - 1:
        raise SettingsError(f"a search space of {space.size} configs cannot fill a budget of {budget}; "
                            "widen the predictor's space or lower the budget")
    names = [("model", k) for k in space.model] + [("train", k) for k in space.train]
    choices = [space.model[k] if part == "model" else space.train[k] for part, k in names]
    grid = list(itertools.product(*choices))
    random.Random(seed).shuffle(grid)
    out = [Candidate()]
    for values in grid:
        if len(out) == budget:
            break
        model = {k: v for (part, k), v in zip(names, values) if part == "model"}
        train = {k: v for (part, k), v in zip(names, values) if part == "train"}
        out.append(Candidate(model, train))
    return out

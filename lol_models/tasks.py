"""The bottom layer of the LoL experiments: what a task is, which metrics rank it, the learn
settings, the splits of a published population, and how results are written as JSON.

Layers (each imports only those below it): `tasks` → `experiments` (the main table), `shift`
(train on one set, test on others) → `rank_generalisation`, `transfer` → `report_sections` → `report`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lol_models.data import LoraDataset, PulledDataError, pull
from lol_models.names import PREDICTORS
from lol_models.splits import protocol_splits
from lol_models.train import LabeledLoras

MAIN_METRIC = {"regression": "r2", "multilabel": "roc_auc"}
SECOND_METRIC = {"regression": "kendall_tau", "multilabel": "accuracy"}


@dataclass(frozen=True)
class LearnSettings:
    """What to train: the manifest's `learn` section, as plain values."""

    predictors: tuple[str, ...] = PREDICTORS
    targets: tuple[str, ...] = ()  # label columns or scorer names; empty: every task
    seeds: int = 5  # final trainings with the chosen config; test metrics are their mean
    epochs: int = 50
    batch_size: int = 64
    learning_rate: float = 1e-3
    tuning_budget: int = 8  # configs per predictor from its own search space (the first: its defaults)
    selection_seeds: int = 2  # trainings per tried config (validation score: their mean)
    min_epochs: int = 10  # the epoch rule: earliest epoch it may pick (capped at `epochs`) …
    smooth_epochs: int = 5  # … ranking epochs by the mean validation score of this many epochs ending there
    split: str = "protocol"  # "protocol" (by group name, lol_models.splits) or "published"
    # predictor → {config field or training setting: its choices}: widens that predictor's search space
    # (`lol_models.registry.space_for`); the tuning budget stays the same for every predictor
    search: Mapping[str, Mapping[str, tuple[Any, ...]]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The settings as the run and results JSON record them (tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))  # tuples (nested too) → lists


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "regression" | "multilabel"
    columns: tuple[str, ...]


def tasks_of(dataset: LoraDataset, wanted: Sequence[str] = ()) -> list[Task]:
    """Group label columns into tasks; `wanted` filters by column or scorer name."""
    by_scorer: dict[str, list[str]] = {}
    for column, info in sorted(dataset.label_info.items()):
        by_scorer.setdefault(info["scorer"], []).append(column)
    tasks = []
    for scorer, columns in by_scorer.items():
        binary = all(set(torch.unique(dataset.labels[c]).tolist()) <= {0, 1} for c in columns)
        if binary and scorer in ("attributes", "membership", "sources"):
            tasks.append(Task(scorer, "multilabel", tuple(columns)))
        else:
            tasks.extend(Task(column, "regression", (column,)) for column in columns)
    if wanted:
        known = {t.name for t in tasks} | {c for t in tasks for c in t.columns}
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise PulledDataError(f"unknown target(s) {unknown}; targets of this dataset: {', '.join(sorted(known))}")
        tasks = [t for t in tasks if t.name in wanted or any(c in wanted for c in t.columns)]
    return tasks


SPLIT_MODES = ("protocol", "published")


def load_splits(published: str | Path, split: str = "protocol",
                needed: tuple[str, ...] = ("train", "validation", "test")) -> dict[str, LoraDataset]:
    """train, validation and test of a published population (or only the `needed` ones).

    split: "protocol" (default) — every published row pooled and re-split by its group's name alone
    (`lol_models.splits.group_split`, the same split in every population sharing the group);
    "published" — the splits as published.
    """
    if split not in SPLIT_MODES:
        raise PulledDataError(f"split={split!r}: choose one of {', '.join(SPLIT_MODES)}")
    splits = {}
    for name in ("train", "validation", "test"):
        try:
            splits[name] = pull(published, split=name)
        except PulledDataError as exc:
            if "unknown split" not in str(exc):
                raise
    if split == "protocol":
        if not splits:
            raise PulledDataError(f"{published} holds none of the splits train, validation, test")
        return protocol_splits(splits, needed)
    missing = [s for s in needed if s not in splits]
    if missing:
        raise PulledDataError(f"{published} lacks split(s) {missing}; this needs {', '.join(needed)} "
                              "(set publish.splits in the manifest and publish again)")
    return {name: splits[name] for name in needed}


def labeled_for(dataset: LoraDataset, task: Task) -> LabeledLoras:
    """The (weights, targets) of `task`'s columns in `dataset`."""
    return LabeledLoras(dataset.weights, dataset.targets(task.columns))


def jsonable(value: Any) -> Any:
    """`json.dumps(default=…)`: tensors as lists, non-finite floats as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def predictor_order(name: str) -> int:
    """Sort key: the predictors in the order of the paper's tables, unknown names last."""
    order = ["mlp", "mlp_svd", "mlp_oalign", "mlp_dense", "transformer", "glnet_paper", "glnet"]
    return order.index(name) if name in order else len(order)

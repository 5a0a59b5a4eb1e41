"""The training protocol of `lol train`: the same tuning budget for every predictor, chosen on validation only.

For one predictor × task:

1. selection — `settings.tuning_budget` configs from the predictor's own search space, widened by the
   manifest's `learn.search` where it names the predictor (`lol_models.registry.space_for`,
   `lol_models.search.candidates`; the first is its defaults, its task defaults applied), each trained
   `settings.selection_seeds` times by `lol_models.train.fit`, which sees the training and validation
   splits only; a config's score is its mean validation main metric (R² or ROC-AUC) at the epoch the
   epoch rule picks. The best score wins (ties: the earlier config).
2. final — the chosen config trained `settings.seeds` times (seeds 0 … S−1; selection used seeds
   SELECTION_SEED, SELECTION_SEED + 1, …), epoch by the same rule.
3. predictions — each final model's outputs on the test LoRAs' *weights* (regression in the targets'
   units, multilabel as logits). No test label is read here: `lol evaluate`
   (`lol_models.evaluation`) scores them, once, with bootstrap CIs.

`select_config` takes no test split, so selection cannot compute a test metric
(`tests/test_lol_protocol.py` also checks no test label is read during `lol train`).

Shape legend: N LoRAs, T targets / K labels, S seeds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from lol_models.common import coerce_config
from lol_models.registry import MODELS, config_for, space_for
from lol_models.search import Candidate, candidates
from lol_models.tasks import MAIN_METRIC, LearnSettings
from lol_models.train import LabeledLoras, RunResult, TrainConfig, fit, predict
from lol_models.weights import LoraWeights

__all__ = ["SELECTION_SEED", "Selection", "Trained", "select_config", "train_config", "tune_and_train", "tuning_pool"]

SELECTION_SEED = 1000  # selection trainings use seeds 1000, 1001, …; final ones 0 … S−1


@dataclass
class Selection:
    """What selection tried and chose, validation scores only."""

    metric: str  # the validation metric configs are ranked by
    trials: list[dict[str, Any]]  # per config: {"candidate", "val_score", "per_seed": [{seed, best_epoch, val_score}]}
    chosen: int  # index into trials
    candidate: Candidate

    def as_dict(self) -> dict[str, Any]:
        return {"metric": f"validation {self.metric}", "budget": len(self.trials), "chosen": self.chosen,
                "trials": self.trials}


@dataclass
class Trained:
    """A predictor trained under the protocol: its selection, final runs and test predictions (no test labels)."""

    selection: Selection
    model_config: dict[str, Any]  # every field of the model's config, as built
    train_config: TrainConfig
    runs: list[RunResult]  # final seeds
    test_predictions: np.ndarray  # (S, N, T)


def train_config(settings: LearnSettings, kind: str, candidate: Candidate) -> TrainConfig:
    """The TrainConfig of a candidate: the learn settings, with the candidate's training overrides."""
    base = TrainConfig(task=kind, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.learning_rate,
                       min_epochs=settings.min_epochs, smooth=settings.smooth_epochs)
    return replace(base, **dict(candidate.train))


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def tuning_pool(predictor: str, kind: str, settings: LearnSettings) -> dict[str, Any]:
    """What selection would try for `predictor` on a `kind` task: every config of the pool, each as the full model
    config (defaults, task defaults and the candidate's choices) and the full TrainConfig. Two runs with equal pools
    tried the same configs; a change to a predictor's defaults, its search space or a training default changes it
    (so does a new config field, even one that is off by default)."""
    pool = candidates(space_for(predictor, settings.search.get(predictor)), settings.tuning_budget, seed=0)
    configs = []
    for candidate in pool:
        model = coerce_config(MODELS[predictor].config_cls, config_for(predictor, kind, candidate.model), model=predictor)
        configs.append({"model": dataclasses.asdict(model), "train": dataclasses.asdict(train_config(settings, kind, candidate))})
    return {"configs": configs}


def select_config(predictor: str, kind: str, train: LabeledLoras, validation: LabeledLoras,
                  settings: LearnSettings) -> Selection:
    """Try `settings.tuning_budget` configs of `predictor` on (train, validation); the best validation score wins.

    With a budget of 1 the defaults are chosen without training.
    """
    metric = MAIN_METRIC[kind]
    pool = candidates(space_for(predictor, settings.search.get(predictor)), settings.tuning_budget, seed=0)
    trials = []
    for candidate in pool if len(pool) > 1 else []:
        model_config = config_for(predictor, kind, candidate.model)
        cfg = train_config(settings, kind, candidate)
        per_seed = []
        for k in range(settings.selection_seeds):
            run = fit(predictor, train, validation, model_config=model_config, config=replace(cfg, seed=SELECTION_SEED + k))
            per_seed.append({"seed": SELECTION_SEED + k, "best_epoch": run.best_epoch, "val_score": run.val[metric]})
        scores = [s["val_score"] for s in per_seed]
        trials.append({"candidate": candidate.as_dict(), "val_score": float(np.mean(scores)), "per_seed": per_seed})
    if not trials:
        return Selection(metric, [{"candidate": pool[0].as_dict(), "val_score": None, "per_seed": []}], 0, pool[0])
    chosen = max(range(len(trials)), key=lambda i: (_finite(trials[i]["val_score"]), -i))
    return Selection(metric, trials, chosen, pool[chosen])


def tune_and_train(predictor: str, kind: str, train: LabeledLoras, validation: LabeledLoras,
                   test_weights: LoraWeights, settings: LearnSettings) -> Trained:
    """Selection on (train, validation), then `settings.seeds` final trainings and their test predictions."""
    selection = select_config(predictor, kind, train, validation, settings)
    model_config = config_for(predictor, kind, selection.candidate.model)
    cfg = train_config(settings, kind, selection.candidate)
    runs, predictions = [], []
    for seed in range(settings.seeds):
        run = fit(predictor, train, validation, model_config=model_config, config=replace(cfg, seed=seed))
        with torch.no_grad():
            out = predict(run.model, test_weights.pad_rank(max(test_weights.rank, train.weights.rank)),
                          cfg.eval_batch_size).double()  # (N, T)
        if kind == "regression":
            out = out * run.target_std.double().cpu() + run.target_mean.double().cpu()
        runs.append(run)
        predictions.append(out.numpy())
    full = dataclasses.asdict(coerce_config(MODELS[predictor].config_cls, model_config, model=predictor))
    return Trained(selection, full, cfg, runs, np.stack(predictions))

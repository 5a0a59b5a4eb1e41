"""Training and evaluation of LoL predictors: regression (MSE) and multilabel (BCE).

Shape legend
    N examples in a split, T regression targets / K labels, B minibatch.

- AdamW, minibatches shuffled by a seeded generator; the model is initialised under `torch.manual_seed(seed)`.
- Regression targets are standardised with the training split's mean and std (per target); predictions
  are mapped back before metrics, so metrics are in the targets' own units.
- The model's input statistics (`fit_input_stats`) come from the training split only.
- The epoch rule: epoch e's score is the mean validation score (`select_by`) of the `smooth` epochs ending
  at e (fewer at the start); the chosen epoch is the best-scoring e among e + 1 ≥ min(`min_epochs`, `epochs`),
  and the model keeps its weights of that epoch. Averaging over a window and a minimum number of epochs keep
  one lucky early epoch (after 3 optimizer steps) from being chosen by validation noise; `smooth=1, min_epochs=1`
  is the plain best-validation epoch.
- `fit` sees only the training and validation splits; `train_and_evaluate` = `fit`, then the test metrics
  of the chosen epoch.
- `run_seeds` repeats over seeds and reports mean ± std (sample std, ddof=1) of every test metric.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lol_models.common import LoLModel, SettingsError, opt
from lol_models.metrics import HIGHER_IS_BETTER, multilabel_metrics, regression_metrics
from lol_models.registry import build_model
from lol_models.weights import LoraWeights

__all__ = ["LabeledLoras", "RunResult", "SeedSummary", "TrainConfig", "evaluate", "fit", "predict",
           "run_seeds", "train_and_evaluate"]

TASKS = ("regression", "multilabel")
NAN_POLICIES = ("fail", "skip")


@dataclass(frozen=True)
class TrainConfig:
    """How to train one predictor."""

    task: str = opt("regression", '"regression" (MSE) or "multilabel" (BCE with logits)')
    epochs: int = opt(50, "passes over the training split")
    batch_size: int = opt(64, "minibatch size")
    lr: float = opt(1e-3, "AdamW learning rate")
    weight_decay: float = opt(1e-2, "AdamW weight decay")
    grad_clip: float | None = opt(1.0, "clip the gradient norm to this (None: no clipping)")
    seed: int = opt(0, "seed of model initialisation and minibatch order")
    select_by: str = opt("loss", 'validation score choosing the reported epoch: "loss" or a metric '
                                 '(r2, kendall_tau, mse; accuracy, roc_auc, bce)')
    patience: int | None = opt(None, "stop after this many eligible epochs without improvement of the smoothed validation score")
    min_epochs: int = opt(10, "the earliest epoch (1-based) the epoch rule may choose; capped at `epochs`")
    smooth: int = opt(5, "the epoch rule ranks epoch e by the mean validation score of epochs e−smooth+1 … e")
    nan_policy: str = opt("fail", '"fail": ValueError on non-finite weights/targets; "skip": drop those rows')
    device: str | None = opt(None, "device to train on (default: the training weights' device)")
    dtype: torch.dtype | None = opt(None, "parameter/input dtype (default: the training weights' dtype)")
    eval_batch_size: int = opt(1024, "batch size for prediction")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SettingsError(f"TrainConfig.task must be one of {TASKS}, got {self.task!r}")
        if self.nan_policy not in NAN_POLICIES:
            raise SettingsError(f"TrainConfig.nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "min_epochs", "smooth"):
            if getattr(self, name) < 1:
                raise SettingsError(f"TrainConfig.{name} must be ≥ 1, got {getattr(self, name)!r}")
        if self.lr <= 0:
            raise SettingsError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        valid = ("loss", "r2", "kendall_tau", "mse") if self.task == "regression" else \
            ("loss", "accuracy", "roc_auc", "bce")
        if self.select_by not in valid:
            raise SettingsError(f"TrainConfig.select_by must be one of {valid} for {self.task}, got {self.select_by!r}")


@dataclass
class LabeledLoras:
    """One split: weights (N LoRAs) and targets Tensor (N,) or (N, T)."""

    weights: LoraWeights
    targets: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.weights, LoraWeights):
            raise ValueError(f"weights must be LoraWeights, got {type(self.weights).__name__}")
        self.targets = torch.as_tensor(self.targets)
        if not self.targets.is_floating_point():
            self.targets = self.targets.float()  # bool / int labels
        if self.targets.dim() == 1:
            self.targets = self.targets[:, None]
        if self.targets.dim() != 2 or self.targets.shape[0] != self.weights.batch_size:
            raise ValueError(
                f"targets must be (N,) or (N, T) with N = {self.weights.batch_size} LoRAs, "
                f"got shape {tuple(self.targets.shape)}"
            )

    def __len__(self) -> int:
        return self.weights.batch_size

    def subset(self, idx: Tensor) -> LabeledLoras:
        return LabeledLoras(self.weights.index(idx), self.targets[idx.to(self.targets.device)])


@dataclass
class RunResult:
    """One trained predictor: metrics at the best validation epoch, and the history."""

    model_name: str
    seed: int
    task: str
    best_epoch: int
    val: dict[str, float]
    test: dict[str, float]
    history: list[dict[str, float]]
    skipped: dict[str, int]  # split → rows dropped for non-finite weights/targets (nan_policy="skip")
    target_mean: Tensor | None = field(default=None, repr=False)  # (T,) regression standardisation
    target_std: Tensor | None = field(default=None, repr=False)
    model: LoLModel | None = field(default=None, repr=False)  # weights of the best epoch


@dataclass
class SeedSummary:
    """Test metrics over seeds: mean and std (ddof=1; 0 for a single seed)."""

    model_name: str
    results: list[RunResult]
    mean: dict[str, float]
    std: dict[str, float]

    def format(self, keys: Sequence[str] | None = None, digits: int = 3) -> str:
        keys = [k for k in self.mean if "[" not in k] if keys is None else keys
        return ", ".join(f"{k} {self.mean[k]:.{digits}f} ± {self.std[k]:.{digits}f}" for k in keys)

    def __str__(self) -> str:
        return f"{self.model_name} ({len(self.results)} seeds): {self.format()}"


# ---- input validation -----------------------------------------------------------------------------


def _clean_splits(splits: Mapping[str, LabeledLoras], cfg: TrainConfig) -> tuple[dict[str, LabeledLoras], dict[str, int]]:
    """Check layouts agree, pad ranks, apply the NaN policy, check multilabel targets."""
    names = list(splits)
    ref_name, ref = names[0], splits[names[0]]
    for name in names:
        s = splits[name]
        if not isinstance(s, LabeledLoras):
            raise ValueError(f"{name} must be LabeledLoras(weights, targets), got {type(s).__name__}")
        if not ref.weights.layout.same_layers(s.weights.layout):
            raise ValueError(
                f"the {name} split's layers differ from the {ref_name} split's: "
                f"{ref.weights.layout.describe_difference(s.weights.layout)}"
            )
        if s.targets.shape[1] != ref.targets.shape[1]:
            raise ValueError(
                f"the {name} split has {s.targets.shape[1]} target columns, the {ref_name} split "
                f"{ref.targets.shape[1]}"
            )
    r_max = max(s.weights.rank for s in splits.values())
    out, skipped = {}, {}
    for name, s in splits.items():
        ok = s.weights.finite_mask().cpu() & torch.isfinite(s.targets).all(dim=1).cpu()
        bad = int((~ok).sum())
        if bad and cfg.nan_policy == "fail":
            rows = torch.nonzero(~ok).flatten()[:10].tolist()
            raise ValueError(
                f"{bad} of {len(s)} LoRAs in the {name} split have non-finite (NaN/inf) weights or targets "
                f"(rows {rows}{' …' if bad > 10 else ''}); pass nan_policy='skip' to drop them"
            )
        skipped[name] = bad
        if bad:
            s = s.subset(torch.nonzero(ok).flatten())
        if len(s) == 0:
            raise ValueError(f"the {name} split is empty{' after dropping non-finite rows' if bad else ''}")
        if cfg.task == "multilabel" and not torch.isin(s.targets, torch.tensor([0.0, 1.0], dtype=s.targets.dtype)).all():
            raise ValueError(f"multilabel targets of the {name} split must be 0 or 1")
        out[name] = LabeledLoras(s.weights.pad_rank(r_max), s.targets)
    return out, skipped


# ---- prediction and evaluation --------------------------------------------------------------------


@torch.no_grad()
def predict(model: LoLModel, weights: LoraWeights, batch_size: int = 1024) -> Tensor:
    """Raw model outputs Tensor (N, out) in eval mode (standardised units for regression)."""
    was_training = model.training
    model.eval()
    param = next(iter(model.parameters()))
    outs = [model(weights.index(slice(s, s + batch_size)).to(device=param.device, dtype=param.dtype)).cpu()
            for s in range(0, weights.batch_size, batch_size)]
    model.train(was_training)
    return torch.cat(outs, dim=0)


def evaluate(model: LoLModel, data: LabeledLoras, task: str, *, target_mean: Tensor | None = None,
             target_std: Tensor | None = None, batch_size: int = 1024) -> dict[str, float]:
    """Metrics of `model` on `data` plus "loss" (MSE on standardised targets, or BCE)."""
    out = predict(model, data.weights, batch_size).double()  # (N, T)
    y = data.targets.double().cpu()
    if task == "regression":
        mean = torch.zeros(y.shape[1], dtype=torch.float64) if target_mean is None else target_mean.double().cpu()
        std = torch.ones(y.shape[1], dtype=torch.float64) if target_std is None else target_std.double().cpu()
        metrics = regression_metrics(y.numpy(), (out * std + mean).numpy())
        metrics["loss"] = float(nn.functional.mse_loss(out, (y - mean) / std))
    else:
        metrics = multilabel_metrics(y.numpy(), out.numpy())
        metrics["loss"] = metrics["bce"]
    return metrics


def _score(metrics: Mapping[str, float], key: str) -> float:
    """Larger is better; NaN counts as worst."""
    v = metrics[key]
    if not math.isfinite(v):
        return -math.inf
    return v if HIGHER_IS_BETTER[key] else -v


# ---- training -------------------------------------------------------------------------------------


def fit(
    model_name: str,
    train: LabeledLoras,
    val: LabeledLoras,
    *,
    model_config: Any = None,
    config: TrainConfig | None = None,
) -> RunResult:
    """Train `model_name` on `train`, choose the epoch on `val` by the epoch rule; `test` is left empty.

    Sees no test split: what model selection runs on (`lol_models.protocol`).
    """
    cfg = config or TrainConfig()
    splits, skipped = _clean_splits({"train": train, "val": val}, cfg)
    return _fit(model_name, splits["train"], splits["val"], model_config, cfg, skipped)


def train_and_evaluate(
    model_name: str,
    train: LabeledLoras,
    val: LabeledLoras,
    test: LabeledLoras,
    *,
    model_config: Any = None,
    config: TrainConfig | None = None,
) -> RunResult:
    """Train `model_name` on `train`, pick the epoch by `val`, report `test` metrics at that epoch."""
    cfg = config or TrainConfig()
    splits, skipped = _clean_splits({"train": train, "val": val, "test": test}, cfg)
    result = _fit(model_name, splits["train"], splits["val"], model_config, cfg, skipped)
    result.test = evaluate(result.model, splits["test"], cfg.task, target_mean=result.target_mean,
                           target_std=result.target_std, batch_size=cfg.eval_batch_size)
    return result


def _fit(model_name: str, train: LabeledLoras, val: LabeledLoras, model_config: Any, cfg: TrainConfig,
         skipped: dict[str, int]) -> RunResult:
    """Training on cleaned splits (`_clean_splits`): the epoch loop and the epoch rule."""
    device = torch.device(cfg.device) if cfg.device else train.weights.device
    dtype = cfg.dtype or train.weights.dtype
    if not dtype.is_floating_point:
        raise ValueError(f"weights must be floating point, got {dtype}")

    y = train.targets.to(device=device, dtype=dtype)  # (N, T)
    if cfg.task == "regression":
        t_mean = y.mean(0)
        t_std = y.std(0, unbiased=False) if len(train) > 1 else torch.ones_like(t_mean)
        t_std = torch.where(t_std > 0, t_std, torch.ones_like(t_std))
        y_fit = (y - t_mean) / t_std
        loss_fn = nn.functional.mse_loss
    else:
        t_mean = t_std = None
        y_fit = y
        loss_fn = nn.functional.binary_cross_entropy_with_logits

    torch.manual_seed(cfg.seed)
    model = build_model(model_name, train.weights.layout, y.shape[1], model_config).to(device=device, dtype=dtype)
    train_w = train.weights.to(device=device, dtype=dtype)
    model.fit_input_stats(train_w)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)

    history: list[dict[str, float]] = []
    raw_scores: list[float] = []
    first_eligible = min(cfg.min_epochs, cfg.epochs) - 1  # 0-based
    best_score, best_epoch, best_state, best_val = -math.inf, -1, None, None
    since_best = 0
    n = len(train)
    for epoch in range(cfg.epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            idx_d = idx.to(device)
            loss = loss_fn(model(train_w.index(idx_d)), y_fit[idx_d])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        val_metrics = evaluate(model, val, cfg.task, target_mean=t_mean, target_std=t_std,
                               batch_size=cfg.eval_batch_size)
        raw_scores.append(_score(val_metrics, cfg.select_by))
        window = raw_scores[-cfg.smooth:]
        smoothed = sum(window) / len(window)  # -inf if any epoch in the window was undefined
        history.append({"epoch": epoch, "train_loss": total / n, "val_loss": val_metrics["loss"],
                        f"val_{cfg.select_by}": val_metrics[cfg.select_by], "val_smoothed_score": smoothed})
        if epoch < first_eligible:
            continue
        if smoothed > best_score or best_state is None:
            best_score, best_epoch, best_val = smoothed, epoch, val_metrics
            best_state = copy.deepcopy(model.state_dict())
            since_best = 0
        else:
            since_best += 1
            if cfg.patience is not None and since_best >= cfg.patience:
                break

    model.load_state_dict(best_state)
    return RunResult(model_name, cfg.seed, cfg.task, best_epoch, best_val, {}, history, skipped,
                     t_mean, t_std, model)


def run_seeds(
    model_name: str,
    train: LabeledLoras,
    val: LabeledLoras,
    test: LabeledLoras,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    model_config: Any = None,
    config: TrainConfig | None = None,
) -> SeedSummary:
    """`train_and_evaluate` once per seed; mean ± std of each test metric (NaNs ignored)."""
    if not seeds:
        raise ValueError("run_seeds needs at least one seed")
    cfg = config or TrainConfig()
    results = [train_and_evaluate(model_name, train, val, test, model_config=model_config,
                                  config=replace(cfg, seed=s)) for s in seeds]
    keys = [k for k in results[0].test if all(k in r.test for r in results)]
    mean, std = {}, {}
    for k in keys:
        vals = np.array([r.test[k] for r in results], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        mean[k] = float(vals.mean()) if vals.size else math.nan
        std[k] = float(vals.std(ddof=1)) if vals.size > 1 else (0.0 if vals.size else math.nan)
    return SeedSummary(model_name, results, mean, std)

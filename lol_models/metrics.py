"""Metrics for LoL predictors, delegating to scikit-learn and SciPy.

Shape legend
    N examples, T regression targets, K labels.

Regression: MSE, R² (sklearn `r2_score`, uniform average over targets), Kendall τ (scipy `kendalltau`,
τ-b, averaged over targets where defined), Spearman ρ (scipy `spearmanr`, likewise) — three different
metrics, each reported under its own name (the authors' code printed Spearman ρ under the name "R²"). Multilabel: per-label accuracy at threshold 0 on logits
(probability 0.5) and their mean; per-label ROC-AUC (sklearn `roc_auc_score`) where the label takes both
values in y_true, NaN otherwise, and their mean over defined labels.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.stats import kendalltau, spearmanr
from sklearn.metrics import r2_score, roc_auc_score

__all__ = ["HIGHER_IS_BETTER", "METRIC_NAMES", "multilabel_metrics", "nanmean", "regression_metrics"]

HIGHER_IS_BETTER = {"r2": True, "r2_train_var": True, "kendall_tau": True, "spearman_rho": True, "accuracy": True,
                    "roc_auc": True, "mse": False, "bce": False, "loss": False}

# What each metric key means, for tables and reports: name metrics exactly.
METRIC_NAMES = {
    "r2": "R² (1 − SS_res / SS_tot of the test set)",
    "r2_train_var": "R² against the training-set variance (1 − MSE / Var_train(y))",
    "kendall_tau": "Kendall τ-b",
    "spearman_rho": "Spearman ρ",
    "mse": "MSE",
    "roc_auc": "ROC-AUC (mean over labels defined in the test set)",
    "accuracy": "accuracy (mean over labels, threshold p = 0.5)",
    "bce": "binary cross-entropy",
}


def nanmean(values) -> float:
    """Mean of the finite values; NaN when there are none (no warning)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def _as_2d(a, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (N,) or (N, T), got shape {arr.shape}")
    return arr


def regression_metrics(y_true, y_pred) -> dict[str, float]:
    """y_true, y_pred: (N,) or (N, T) → {"mse", "r2", "kendall_tau", "spearman_rho", and per target
    "r2[t]", "kendall_tau[t]", "spearman_rho[t]" if T > 1}.

    A target constant in y_true (or predictions constant) has τ = ρ = NaN and is left out of the mean.
    """
    yt, yp = _as_2d(y_true, "y_true"), _as_2d(y_pred, "y_pred")
    if yt.shape != yp.shape:
        raise ValueError(f"y_true {yt.shape} and y_pred {yp.shape} differ in shape")
    if yt.shape[0] < 2:
        raise ValueError(f"need at least 2 examples for R² and Kendall τ, got {yt.shape[0]}")
    r2s = [float(r2_score(yt[:, t], yp[:, t])) for t in range(yt.shape[1])]
    taus, rhos = [], []
    for t in range(yt.shape[1]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on constant input, returns NaN
            taus.append(float(kendalltau(yt[:, t], yp[:, t]).statistic))
            rhos.append(float(spearmanr(yt[:, t], yp[:, t]).statistic))
    out = {
        "mse": float(np.mean((yt - yp) ** 2)),
        "r2": float(r2_score(yt, yp, multioutput="uniform_average")),
        "kendall_tau": nanmean(taus),
        "spearman_rho": nanmean(rhos),
    }
    if yt.shape[1] > 1:
        out.update({f"r2[{t}]": v for t, v in enumerate(r2s)})
        out.update({f"kendall_tau[{t}]": v for t, v in enumerate(taus)})
        out.update({f"spearman_rho[{t}]": v for t, v in enumerate(rhos)})
    return out


def multilabel_metrics(y_true, logits, *, threshold: float = 0.0) -> dict[str, float]:
    """y_true: (N, K) in {0, 1}; logits: (N, K) → accuracy, roc_auc, bce and per label "accuracy[k]", "roc_auc[k]".

    Labels constant in y_true get roc_auc[k] = NaN; "roc_auc" averages the rest and "roc_auc_defined"
    counts them (roc_auc is NaN when no label is defined).
    """
    yt, s = _as_2d(y_true, "y_true"), _as_2d(logits, "logits")
    if yt.shape != s.shape:
        raise ValueError(f"y_true {yt.shape} and logits {s.shape} differ in shape")
    if not np.isin(yt, (0.0, 1.0)).all():
        raise ValueError("multilabel y_true must contain only 0 and 1")
    pred = (s > threshold).astype(np.float64)
    accs = (pred == yt).mean(axis=0)
    aucs = []
    for k in range(yt.shape[1]):
        both = 0 < yt[:, k].sum() < yt.shape[0]
        aucs.append(float(roc_auc_score(yt[:, k], s[:, k])) if both else math.nan)
    # numerically stable BCE with logits
    bce = np.mean(np.maximum(s, 0) - s * yt + np.log1p(np.exp(-np.abs(s))))
    out = {
        "accuracy": float(accs.mean()),
        "roc_auc": nanmean(aucs),
        "roc_auc_defined": float(sum(math.isfinite(a) for a in aucs)),
        "bce": float(bce),
    }
    out.update({f"accuracy[{k}]": float(a) for k, a in enumerate(accs)})
    out.update({f"roc_auc[{k}]": a for k, a in enumerate(aucs)})
    return out

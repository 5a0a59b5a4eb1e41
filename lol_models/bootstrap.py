"""Paired bootstrap over test LoRAs: a 95% CI for every test metric, and for differences of predictors.

Shape legend
    N test LoRAs, T regression targets / K labels, S seeds, B bootstrap resamples.

A resample draws N of the test LoRAs with replacement. It is held as counts w ∈ ℕ^N (Σ_k w_k = N,
how often LoRA k was drawn), and every metric is computed on the weighted sample, vectorised over
the B resamples — identical to computing it on the resampled rows (`tests/test_lol_bootstrap.py`
checks that against scikit-learn and SciPy on explicit resamples, duplicates and ties included).

*By group* (`groups=`): LoRAs of one group share their training data and often their labels, so they
are not independent draws. A group resample draws G of the G test groups with replacement and counts
each LoRA as often as its group was drawn (a cluster bootstrap); its intervals are the honest ones when
test LoRAs come from few groups.

*Paired*: the same B resamples score every predictor, so a difference (GL-net − baseline) is taken
resample by resample and its CI reflects how the two predictors differ on the same test LoRAs.

A predictor's statistic is its test metric averaged over its S seeds (the table's point estimate);
on each resample it is that seed mean recomputed on the resample. The 95% CI is the percentile
interval (2.5th and 97.5th percentiles of the B values; resamples where the metric is undefined,
e.g. a label with one class, are left out and counted). Resamples come from
`numpy.random.default_rng(seed)`, so a CI is reproducible.

Metrics (names as in `lol_models.metrics.METRIC_NAMES`): regression "r2", "r2_train_var" (when the
training-set variance is given), "kendall_tau" (τ-b), "spearman_rho"; multilabel "roc_auc" and
"accuracy" (means over labels). Cost O(B·N²) per metric and seed (pairwise comparisons).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["CI_LEVEL", "RESAMPLES", "bootstrap_table", "group_resample_counts", "metric_samples", "resample_counts"]

RESAMPLES = 2000
CI_LEVEL = 0.95


def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(B, N) float counts of B bootstrap resamples of N items; row 0 … B−1, each summing to N."""
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 test LoRAs, got {n}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def group_resample_counts(groups: Sequence[str], resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(B, N) float counts of a cluster bootstrap over the N items' `groups`: each resample draws G of the G
    distinct groups (sorted by name) with replacement, and an item counts as often as its group was drawn.
    With one item per group (names sorting as the items do) it is `resample_counts(N)` exactly."""
    names, group_of = np.unique(np.asarray(list(groups), dtype=str), return_inverse=True)  # group_of (N,)
    if names.size < 2:
        raise ValueError(f"a group bootstrap needs at least 2 groups, got {names.size}")
    rng = np.random.default_rng(seed)
    drawn = rng.multinomial(names.size, np.full(names.size, 1.0 / names.size), size=resamples)  # (B, G)
    return drawn[:, group_of].astype(np.float64)


# ---- weighted metrics: y, p (N,) one column, w (B, N) → (B,) ------------------------------------


def _pair_sum(w: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Σ_{k,l} w_k m_kl w_l per resample: w (B, N), m (N, N) → (B,)."""
    return np.einsum("bk,bk->b", w @ m, w)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def weighted_r2(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """1 − SS_res / SS_tot of each resample (NaN where the resampled y is constant)."""
    n = w.sum(1)
    mean = w @ y / n
    ss_tot = (w * (y[None, :] - mean[:, None]) ** 2).sum(1)
    ss_res = w @ (y - p) ** 2
    constant = ss_tot <= 1e-12 * (w @ y**2)
    return 1.0 - _safe_div(ss_res, np.where(constant, 0.0, ss_tot))


def weighted_r2_reference(y: np.ndarray, p: np.ndarray, w: np.ndarray, variance: float) -> np.ndarray:
    """1 − MSE / `variance` of each resample: R² against a fixed (training-set) variance."""
    return 1.0 - (w @ (y - p) ** 2) / w.sum(1) / variance


def weighted_kendall_tau(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Kendall τ-b of each resample: (n_c − n_d) / sqrt((n0 − n1)(n0 − n2)), ties counted as SciPy does.

    Pairs of two copies of one LoRA are tied in both; pairs of LoRAs k ≠ l occur w_k w_l times.
    """
    sy, sp = np.sign(y[:, None] - y[None, :]), np.sign(p[:, None] - p[None, :])  # (N, N)
    n = w.sum(1)
    n0 = n * (n - 1) / 2
    concordance = _pair_sum(w, sy * sp) / 2  # the diagonal is 0
    ties_y = (_pair_sum(w, (sy == 0).astype(np.float64)) - n) / 2  # diagonal: Σ w_k², minus Σ w_k → C(w_k, 2)
    ties_p = (_pair_sum(w, (sp == 0).astype(np.float64)) - n) / 2
    return _safe_div(concordance, np.sqrt(np.clip((n0 - ties_y) * (n0 - ties_p), 0.0, None)))


def _weighted_midranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B, N): the mid-rank (1-based, ties averaged) each LoRA's value has in each resample."""
    below = (x[None, :] < x[:, None]).astype(np.float64)  # [k, l] = x_l < x_k
    equal = (x[None, :] == x[:, None]).astype(np.float64)
    return w @ below.T + (w @ equal.T + 1.0) / 2.0


def weighted_spearman_rho(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Spearman ρ of each resample: Pearson correlation of the resample's mid-ranks."""
    ry, rp = _weighted_midranks(y, w), _weighted_midranks(p, w)
    n = w.sum(1, keepdims=True)
    cy = ry - (w * ry).sum(1, keepdims=True) / n
    cp = rp - (w * rp).sum(1, keepdims=True) / n
    cov = (w * cy * cp).sum(1)
    var = (w * cy**2).sum(1) * (w * cp**2).sum(1)
    return _safe_div(cov, np.sqrt(var) * (var > 0))


def weighted_roc_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC-AUC of each resample (y in {0, 1}, s scores): P(s_pos > s_neg) + ½ P(tie). NaN with one class."""
    pos, neg = y == 1, y == 0
    above = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])  # (N_pos, N_neg)
    wp, wn = w[:, pos], w[:, neg]
    wins = np.einsum("bk,bk->b", wp @ above, wn)
    return _safe_div(wins, wp.sum(1) * wn.sum(1))


def weighted_accuracy(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Share of resampled LoRAs whose label is predicted right (logit > 0 ⇔ p > 0.5)."""
    return w @ ((s > 0).astype(np.float64) == y) / w.sum(1)


# ---- one predictor: seeds × metrics --------------------------------------------------------------


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
        return np.nanmean(a, axis=axis)


def metric_samples(kind: str, y: np.ndarray, predictions: np.ndarray, w: np.ndarray,
                   train_variance: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """Per metric (B,): the seed-mean test metric of one predictor on each resample.

    kind: "regression" or "multilabel"; y (N, T) targets or 0/1 labels; predictions (S, N, T) (regression
    values in the targets' units, or logits); w (B, N) counts (a row of ones gives the full test set);
    train_variance (T,) the training split's target variance (adds "r2_train_var").
    Multi-column metrics are means over targets / labels (labels undefined on a resample left out).
    """
    y = np.asarray(y, dtype=np.float64)
    preds = np.asarray(predictions, dtype=np.float64)
    if y.ndim != 2 or preds.ndim != 3 or preds.shape[1:] != y.shape:
        raise ValueError(f"y must be (N, T) and predictions (S, N, T); got {y.shape} and {preds.shape}")
    if w.shape[1] != y.shape[0]:
        raise ValueError(f"counts are over {w.shape[1]} LoRAs, the test set has {y.shape[0]}")
    columns = range(y.shape[1])
    if kind == "regression":
        fns = {"r2": weighted_r2, "kendall_tau": weighted_kendall_tau, "spearman_rho": weighted_spearman_rho}
        if train_variance is not None:
            var = np.asarray(train_variance, dtype=np.float64).reshape(-1)
            if var.shape != (y.shape[1],):
                raise ValueError(f"train_variance must have one value per target ({y.shape[1]}), got {var.shape}")
            fns["r2_train_var"] = lambda yc, pc, wc, t: weighted_r2_reference(yc, pc, wc, float(var[t]))
    elif kind == "multilabel":
        fns = {"roc_auc": weighted_roc_auc, "accuracy": weighted_accuracy}
    else:
        raise ValueError(f'kind must be "regression" or "multilabel", got {kind!r}')
    out = {}
    for name, fn in fns.items():
        call = fn if name == "r2_train_var" else (lambda yc, pc, wc, t, fn=fn: fn(yc, pc, wc))
        per_seed = [_nanmean(np.stack([call(y[:, t], preds[s, :, t], w, t) for t in columns]), 0)
                    for s in range(preds.shape[0])]  # each (B,): mean over targets / defined labels
        out[name] = _nanmean(np.stack(per_seed), 0)  # (B,): mean over seeds
    return out


def _interval(samples: np.ndarray, point: float) -> dict[str, float | int]:
    finite = samples[np.isfinite(samples)]
    alpha = (1.0 - CI_LEVEL) / 2
    low, high = (np.quantile(finite, [alpha, 1.0 - alpha]) if finite.size else (np.nan, np.nan))
    return {"value": float(point), "low": float(low), "high": float(high), "undefined": int(samples.size - finite.size)}


def bootstrap_table(kind: str, y: np.ndarray, predictions: Mapping[str, np.ndarray], *, reference: str | None = None,
                    train_variance: Sequence[float] | None = None, resamples: int = RESAMPLES,
                    seed: int = 0, groups: Sequence[str] | None = None) -> dict[str, dict]:
    """CIs of every predictor's test metrics, and of `reference` − each other predictor, on paired resamples.

    y (N, T); predictions: predictor → (S, N, T) (its seeds may differ in number); groups: the N LoRAs'
    group names, to resample whole groups (None: resample LoRAs). Returns
    {"ci": {predictor: {metric: {value, low, high, undefined}}},
     "difference": {other: {metric: {value, low, high, undefined}}}  (reference − other; empty without reference),
     "resamples", "seed", "level", "n", "unit" ("LoRA" or "group"), "groups" (distinct groups; None by LoRA)}.
    """
    y = np.asarray(y, dtype=np.float64)
    if groups is not None and len(groups) != y.shape[0]:
        raise ValueError(f"groups name {len(groups)} LoRAs, the test set has {y.shape[0]}")
    w = resample_counts(y.shape[0], resamples, seed) if groups is None else group_resample_counts(groups, resamples, seed)
    full = np.ones((1, y.shape[0]))
    points = {name: {k: float(v[0]) for k, v in metric_samples(kind, y, p, full, train_variance).items()}
              for name, p in predictions.items()}
    samples = {name: metric_samples(kind, y, p, w, train_variance) for name, p in predictions.items()}
    ci = {name: {k: _interval(v, points[name][k]) for k, v in samples[name].items()} for name in predictions}
    difference = {}
    if reference is not None and reference in predictions:
        for other in predictions:
            if other != reference:
                difference[other] = {k: _interval(samples[reference][k] - samples[other][k],
                                                  points[reference][k] - points[other][k])
                                     for k in samples[reference]}
    return {"ci": ci, "difference": difference, "reference": reference, "resamples": resamples, "seed": seed,
            "level": CI_LEVEL, "n": int(y.shape[0]), "unit": "LoRA" if groups is None else "group",
            "groups": None if groups is None else len(set(groups))}

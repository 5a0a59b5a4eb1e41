"""The paired bootstrap: weighted metrics equal SciPy / scikit-learn on explicit resamples, CIs pair predictors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr
from sklearn.metrics import r2_score, roc_auc_score

from lol_models.bootstrap import (
    bootstrap_table,
    metric_samples,
    resample_counts,
    weighted_accuracy,
    weighted_kendall_tau,
    weighted_r2,
    weighted_roc_auc,
    weighted_spearman_rho,
)
from lol_models.metrics import multilabel_metrics, regression_metrics

ATOL = 1e-10  # float64 sums over 40 items; measured: ≤ 9e-16 over 200 resamples


def data(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.round(rng.normal(size=n), 1)  # rounding makes ties
    p = np.round(y + rng.normal(scale=0.8, size=n), 1)
    labels = (rng.random(n) < 0.4).astype(np.float64)
    logits = np.round(labels + rng.normal(size=n), 1) - 0.5
    return y, p, labels, logits


def explicit(counts: np.ndarray) -> np.ndarray:
    """The row indices a counts vector stands for."""
    return np.repeat(np.arange(counts.size), counts.astype(int))


def test_weighted_metrics_equal_the_libraries_on_resampled_rows():
    y, p, labels, logits = data()
    w = resample_counts(y.size, resamples=12, seed=3)
    assert (w.sum(1) == y.size).all() and (w.max(1) > 1).all()  # duplicates in every resample
    got = {"r2": weighted_r2(y, p, w), "tau": weighted_kendall_tau(y, p, w), "rho": weighted_spearman_rho(y, p, w),
           "auc": weighted_roc_auc(labels, logits, w), "acc": weighted_accuracy(labels, logits, w)}
    for b, counts in enumerate(w):
        i = explicit(counts)
        assert got["r2"][b] == pytest.approx(r2_score(y[i], p[i]), abs=ATOL)
        assert got["tau"][b] == pytest.approx(kendalltau(y[i], p[i]).statistic, abs=ATOL)
        assert got["rho"][b] == pytest.approx(spearmanr(y[i], p[i]).statistic, abs=ATOL)
        assert got["auc"][b] == pytest.approx(roc_auc_score(labels[i], logits[i]), abs=ATOL)
        assert got["acc"][b] == pytest.approx(np.mean((logits[i] > 0) == labels[i]), abs=ATOL)


def test_the_full_test_set_gives_the_metrics_of_lol_models_metrics():
    y, p, labels, logits = data(seed=1)
    full = np.ones((1, y.size))
    reg = metric_samples("regression", y[:, None], p[None, :, None], full, train_variance=[4.0])
    ref = regression_metrics(y, p)
    for key in ("r2", "kendall_tau", "spearman_rho"):
        assert reg[key][0] == pytest.approx(ref[key], abs=ATOL)
    assert reg["r2_train_var"][0] == pytest.approx(1 - ref["mse"] / 4.0, abs=ATOL)
    two = np.stack([labels, 1 - labels], 1)
    scores = np.stack([logits, -logits + 0.3], 1)
    ml = metric_samples("multilabel", two, scores[None], full)
    ref = multilabel_metrics(two, scores)
    assert ml["roc_auc"][0] == pytest.approx(ref["roc_auc"], abs=ATOL)
    assert ml["accuracy"][0] == pytest.approx(ref["accuracy"], abs=ATOL)


def test_a_label_with_one_class_in_a_resample_is_left_out_not_zero():
    labels = np.array([1.0, 0, 0, 0, 0, 0])
    w = np.array([[0.0, 2, 1, 1, 1, 1], [1.0, 1, 1, 1, 1, 1]])
    auc = weighted_roc_auc(labels, np.arange(6.0), w)
    assert np.isnan(auc[0]) and auc[1] == 0.0


def test_ci_contains_the_point_pairs_the_predictors_and_is_reproducible():
    y, p, _, _ = data(n=60, seed=2)
    rng = np.random.default_rng(5)
    good = np.stack([p, p + rng.normal(scale=0.05, size=p.size)])[:, :, None]  # (S=2, N, 1)
    noisy = good + rng.normal(scale=1.5, size=good.shape)
    preds = {"glnet": good, "mlp": noisy, "twin": good.copy()}
    table = bootstrap_table("regression", y[:, None], preds, reference="glnet", train_variance=[float(y.var())],
                            resamples=500, seed=0)
    for name in preds:
        for metric, cell in table["ci"][name].items():
            assert cell["low"] <= cell["value"] <= cell["high"], (name, metric, cell)
    # the same predictor twice: every paired difference is exactly 0
    assert all(c["low"] == c["high"] == 0.0 for c in table["difference"]["twin"].values())
    # a much noisier predictor: the difference excludes 0
    assert table["difference"]["mlp"]["r2"]["low"] > 0
    again = bootstrap_table("regression", y[:, None], preds, reference="glnet", resamples=500, seed=0)
    assert again["ci"]["mlp"]["kendall_tau"] == table["ci"]["mlp"]["kendall_tau"]
    assert "r2_train_var" not in again["ci"]["mlp"] and table["n"] == 60

"""The paired bootstrap: weighted metrics equal SciPy / scikit-learn on explicit resamples, CIs pair predictors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr
from sklearn.metrics import r2_score, roc_auc_score

from lol_models.bootstrap import (
    bootstrap_table,
    group_resample_counts,
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


def test_a_group_resample_draws_whole_groups_and_its_metrics_equal_the_libraries_on_its_rows():
    y, p, labels, logits = data()
    groups = [f"g{k // 4:02d}" for k in range(y.size)]  # 10 groups of 4 LoRAs
    w = group_resample_counts(groups, resamples=12, seed=5)
    by_group = w.reshape(12, 10, 4)
    assert (by_group == by_group[:, :, :1]).all()  # a group's LoRAs are drawn together
    assert (by_group[:, :, 0].sum(1) == 10).all() and (w.sum(1) == 40).all()
    r2, tau, auc = weighted_r2(y, p, w), weighted_kendall_tau(y, p, w), weighted_roc_auc(labels, logits, w)
    for b, counts in enumerate(w):
        i = explicit(counts)
        assert r2[b] == pytest.approx(r2_score(y[i], p[i]), abs=ATOL)
        assert tau[b] == pytest.approx(kendalltau(y[i], p[i]).statistic, abs=ATOL)
        assert auc[b] == pytest.approx(roc_auc_score(labels[i], logits[i]), abs=ATOL)


def test_one_lora_per_group_is_the_lora_bootstrap_and_shared_groups_widen_the_interval():
    y, p, _, _ = data(n=60, seed=2)
    singletons = [f"{k:03d}" for k in range(y.size)]
    assert np.array_equal(group_resample_counts(singletons, 50, seed=1), resample_counts(y.size, 50, seed=1))
    with pytest.raises(ValueError, match="at least 2 groups"):
        group_resample_counts(["same"] * 5)
    # 6 groups of 10 LoRAs, targets and one predictor's errors shared within a group: not independent draws
    rng = np.random.default_rng(0)
    y = np.repeat(rng.normal(size=6), 10) + rng.normal(scale=0.2, size=60)
    a = y + np.repeat(rng.normal(scale=0.7, size=6), 10) + rng.normal(scale=0.1, size=60)
    b = y + rng.normal(scale=0.7, size=60)
    predictions = {"glnet": a[None, :, None], "other": b[None, :, None]}
    by_lora = bootstrap_table("regression", y[:, None], predictions, reference="glnet", resamples=1000)
    by_group = bootstrap_table("regression", y[:, None], predictions, reference="glnet", resamples=1000,
                               groups=[f"g{k // 10}" for k in range(60)])
    assert (by_lora["unit"], by_lora["groups"], by_group["unit"], by_group["groups"]) == ("LoRA", None, "group", 6)
    lora, group = by_lora["difference"]["other"]["kendall_tau"], by_group["difference"]["other"]["kendall_tau"]
    assert lora["value"] == group["value"]  # the same point estimate
    assert group["high"] - group["low"] > 1.5 * (lora["high"] - lora["low"])  # measured: 0.915 against 0.392

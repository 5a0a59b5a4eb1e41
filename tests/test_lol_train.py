"""Training, evaluation and metrics of the LoL predictors (tiny models, a few steps)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau
from sklearn.metrics import r2_score, roc_auc_score

from lol_models.metrics import multilabel_metrics, regression_metrics
from lol_models.registry import available_models, build_model
from lol_models.synthetic import random_lora_weights
from lol_models.train import LabeledLoras, TrainConfig, fit, run_seeds, train_and_evaluate
from lol_models.weights import GroupLayout, Layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = {
    "mlp": {"hidden": (16,)},
    "mlp_svd": {"hidden": (16,)},
    "mlp_oalign": {"hidden": (16,)},
    "mlp_dense": {"hidden": (16,)},
    "transformer": {"d_model": 8, "nhead": 2, "num_layers": 1, "dim_feedforward": 16},
    "transformer_flat": {"token": "flat", "d_model": 8, "nhead": 2, "num_layers": 1, "dim_feedforward": 16},
    "glnet": {"hidden": (6, 4), "head": (16,), "context": 3},
    "glnet_paper": {"hidden": 6, "head": 16},
}


def split(n: int, seed: int, *, rank: int = 2, labels: int = 0) -> LabeledLoras:
    """Tiny population; regression target = ‖ΔW_a‖_F (or `labels` binary labels from layer norms)."""
    gen = torch.Generator().manual_seed(seed)
    w = random_lora_weights(n, rank, generator=gen, dtype=torch.float32)
    norms = torch.cat([g.delta().flatten(2).norm(dim=2) for g in w.groups], dim=1)  # (B, L)
    if labels:
        y = (norms[:, :labels] > norms[:, :labels].median(dim=0).values).float()
        return LabeledLoras(w, y)
    return LabeledLoras(w, norms[:, 0])


def test_registry_lists_every_model_and_rejects_bad_names_and_keys():
    assert set(available_models()) == {"mlp", "mlp_svd", "mlp_oalign", "mlp_dense", "transformer", "glnet", "glnet_paper"}
    layout = random_lora_weights(1, 2).layout
    with pytest.raises(ValueError, match="unknown model 'gl_net'; available"):
        build_model("gl_net", layout, 1)
    with pytest.raises(ValueError, match=r"unknown config keys \['hiden'\]"):
        build_model("glnet", layout, 1, {"hiden": (4,)})
    with pytest.raises(ValueError, match="GLNetConfig.dropout must be in"):
        build_model("glnet", layout, 1, {"dropout": 1.5})


def test_dense_refuses_layers_over_its_budget():
    big = Layout((GroupLayout(("small",), 4, 4), GroupLayout(("up_proj",), 300, 200)), rank=4)
    with pytest.raises(ValueError, match=r"'up_proj'.*300×200 = 60,000 elements.*max_layer_elements=1,000"):
        build_model("mlp_dense", big, 1, {"max_layer_elements": 1000})
    build_model("mlp_dense", big, 1, {"max_layer_elements": 60_000})


@pytest.mark.parametrize("name", sorted(TINY))
def test_each_model_trains_and_its_loss_falls(name):
    data = split(32, 0)
    y = (data.targets - data.targets.mean()) / data.targets.std()
    torch.manual_seed(0)
    model = build_model(name.removesuffix("_flat"), data.weights.layout, 1, TINY[name])
    model.fit_input_stats(data.weights)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(model(data.weights), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def test_regression_metrics_match_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    yt = rng.normal(size=(40, 2))
    yp = yt + rng.normal(scale=0.5, size=(40, 2))
    m = regression_metrics(yt, yp)
    assert m["r2"] == pytest.approx(r2_score(yt, yp))
    taus = [kendalltau(yt[:, t], yp[:, t]).statistic for t in range(2)]
    assert m["kendall_tau"] == pytest.approx(np.mean(taus))
    assert m["r2[1]"] == pytest.approx(r2_score(yt[:, 1], yp[:, 1]))
    assert m["mse"] == pytest.approx(np.mean((yt - yp) ** 2))
    const = regression_metrics(yt[:, 0], np.ones(40))  # constant predictions: τ undefined, no crash
    assert math.isnan(const["kendall_tau"]) and math.isfinite(const["r2"])


def test_multilabel_metrics_match_sklearn_and_skip_constant_labels():
    rng = np.random.default_rng(1)
    yt = rng.integers(0, 2, size=(30, 3)).astype(float)
    yt[:, 2] = 1.0  # constant in this split
    logits = rng.normal(size=(30, 3)) + (2 * yt - 1)
    m = multilabel_metrics(yt, logits)
    accs = ((logits > 0) == yt).mean(axis=0)
    aucs = [roc_auc_score(yt[:, k], logits[:, k]) for k in range(2)]
    assert m["accuracy"] == pytest.approx(accs.mean()) and m["accuracy[2]"] == pytest.approx(accs[2])
    assert m["roc_auc"] == pytest.approx(np.mean(aucs)) and m["roc_auc[0]"] == pytest.approx(aucs[0])
    assert math.isnan(m["roc_auc[2]"]) and m["roc_auc_defined"] == 2
    p = 1 / (1 + np.exp(-logits))
    assert m["bce"] == pytest.approx(-np.mean(yt * np.log(p) + (1 - yt) * np.log(1 - p)))
    assert math.isnan(multilabel_metrics(np.ones((4, 1)), np.zeros((4, 1)))["roc_auc"])


def test_train_and_evaluate_reports_the_best_validation_epoch():
    tr, va, te = split(48, 1), split(16, 2), split(16, 3)
    # mixed ranks across splits are padded; targets far from 0 test the standardisation round trip
    tr = LabeledLoras(tr.weights, tr.targets + 1000.0)
    va = LabeledLoras(split(16, 2, rank=1).weights, va.targets + 1000.0)
    te = LabeledLoras(te.weights, te.targets + 1000.0)
    cfg = TrainConfig(epochs=6, batch_size=16, lr=1e-2, min_epochs=1, smooth=1)  # the plain best-validation epoch
    res = train_and_evaluate("glnet", tr, va, te, model_config=TINY["glnet"], config=cfg)
    val_losses = [h["val_loss"] for h in res.history]
    assert res.best_epoch == int(np.argmin(val_losses)) and res.val["loss"] == min(val_losses)
    assert set(res.test) >= {"r2", "kendall_tau", "mse", "loss"} and res.skipped == {"train": 0, "val": 0, "test": 0}
    assert float(res.target_mean) == pytest.approx(float(tr.targets.mean()), rel=1e-6)
    assert res.test["mse"] < 10 * float(te.targets.var())  # predictions are back in target units


def test_the_epoch_rule_smooths_the_validation_curve_and_waits_min_epochs():
    tr, va = split(48, 1), split(16, 2)
    cfg = TrainConfig(epochs=12, batch_size=16, lr=3e-2, min_epochs=4, smooth=3)
    res = fit("mlp", tr, va, model_config=TINY["mlp"], config=cfg)
    losses = np.array([h["val_loss"] for h in res.history])
    smoothed = [-losses[max(0, e - 2):e + 1].mean() for e in range(12)]
    assert res.best_epoch == 3 + int(np.argmax(smoothed[3:]))  # epochs 0-2 are never chosen
    assert res.val["loss"] == losses[res.best_epoch] and res.test == {}
    assert [h["val_smoothed_score"] for h in res.history] == pytest.approx(smoothed, rel=1e-12)
    short = fit("mlp", tr, va, model_config=TINY["mlp"], config=TrainConfig(epochs=2, min_epochs=10))
    assert short.best_epoch == 1  # min_epochs is capped at epochs: the last epoch


def test_multilabel_training_handles_a_label_constant_in_test():
    tr, va, te = split(40, 4, labels=2), split(16, 5, labels=2), split(16, 6, labels=2)
    te.targets[:, 1] = 0.0
    cfg = TrainConfig(task="multilabel", epochs=3, batch_size=20, select_by="roc_auc")
    res = train_and_evaluate("mlp_svd", tr, va, te, model_config=TINY["mlp_svd"], config=cfg)
    assert res.test["roc_auc_defined"] == 1 and math.isnan(res.test["roc_auc[1]"])
    assert 0 <= res.test["accuracy"] <= 1
    with pytest.raises(ValueError, match="must be 0 or 1"):
        train_and_evaluate("mlp", LabeledLoras(tr.weights, tr.targets * 2), va, te, config=cfg)


def test_nan_weights_fail_clearly_or_are_skipped_and_counted():
    tr, va, te = split(24, 7), split(8, 8), split(8, 9)
    tr.weights.groups[1].u[[3, 5], 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"2 of 24 LoRAs in the train split .*\(rows \[3, 5\]\); pass nan_policy='skip'"):
        train_and_evaluate("mlp", tr, va, te, config=TrainConfig(epochs=1))
    res = train_and_evaluate("mlp", tr, va, te, model_config=TINY["mlp"],
                             config=TrainConfig(epochs=1, nan_policy="skip"))
    assert res.skipped == {"train": 2, "val": 0, "test": 0} and math.isfinite(res.test["r2"])


def test_mismatched_layouts_are_a_clear_error():
    tr, va = split(8, 10), split(8, 11)
    other = LabeledLoras(random_lora_weights(8, 2, {"a": (8, 6), "b": (5, 8)}, dtype=torch.float32),
                         torch.zeros(8))
    with pytest.raises(ValueError, match=r"test split's layers differ.*missing layers \['c', 'd'\].*b: \(5, 7\) vs \(5, 8\)"):
        train_and_evaluate("mlp", tr, va, other, config=TrainConfig(epochs=1))
    model = build_model("glnet", tr.weights.layout, 1)
    with pytest.raises(ValueError, match="do not match the model's layout"):
        model(other.weights)


def test_run_seeds_reports_mean_and_std_over_seeds():
    tr, va, te = split(24, 12), split(8, 13), split(8, 14)
    summary = run_seeds("mlp_svd", tr, va, te, seeds=(0, 1), model_config=TINY["mlp_svd"],
                        config=TrainConfig(epochs=2, batch_size=8))
    r2s = [r.test["r2"] for r in summary.results]
    assert [r.seed for r in summary.results] == [0, 1]
    assert summary.mean["r2"] == pytest.approx(np.mean(r2s)) and summary.std["r2"] == pytest.approx(np.std(r2s, ddof=1))
    assert "r2" in str(summary) and "±" in str(summary)

"""A GL-invariant synthetic task: y = ‖U_a V_aᵀ‖_F with an independent random g_i ∈ GL(r) applied to every
layer of every input. GL-net must learn it; an MLP on the flattened factors must not."""

from __future__ import annotations

import pytest

from lol_models.synthetic import frobenius_task
from lol_models.train import LabeledLoras, TrainConfig, train_and_evaluate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CONFIG = TrainConfig(epochs=40, batch_size=64, lr=1e-2, weight_decay=0.1)


def splits():
    return [LabeledLoras(*frobenius_task(n, rank=2, seed=s, max_cond=10.0)) for n, s in ((1024, 0), (128, 1), (256, 2))]


def test_glnet_learns_an_invariant_label_that_a_flat_mlp_cannot():
    tr, va, te = splits()
    gl = train_and_evaluate("glnet", tr, va, te, model_config={"hidden": (8,), "head": (32,)}, config=CONFIG)
    flat = train_and_evaluate("mlp", tr, va, te, model_config={"hidden": (64, 64)}, config=CONFIG)
    print(f"test R²: glnet {gl.test['r2']:.3f} (τ {gl.test['kendall_tau']:.3f}), "
          f"mlp {flat.test['r2']:.3f} (τ {flat.test['kendall_tau']:.3f})")
    assert gl.test["r2"] > 0.9, gl.test
    assert flat.test["r2"] < 0.3, flat.test
    assert gl.test["r2"] > flat.test["r2"] + 0.5


def test_scale_free_glnet_reads_the_updates_size_from_its_spectral_moments_only():
    """With `scale_free` the equivariant stack sees ΔW_i / ‖ΔW_i‖_F, and the spectral filters are scale-free too: the label
    ‖ΔW_a‖_F is learnable through the spectral moments (log ‖ΔW_i‖_F² is the first) and not without them."""
    tr, va, te = splits()
    config = {"hidden": (8,), "head": (32,), "scale_free": True, "spectral_filters": (1, 2)}
    with_moments = train_and_evaluate("glnet", tr, va, te, model_config=config, config=CONFIG)
    without = train_and_evaluate("glnet", tr, va, te, model_config={**config, "spectral_moments": 0}, config=CONFIG)
    print(f"test R²: with moments {with_moments.test['r2']:.3f}, without {without.test['r2']:.3f}")  # 0.968, -0.328 here
    assert with_moments.test["r2"] > 0.9, with_moments.test
    assert without.test["r2"] < 0.3, without.test

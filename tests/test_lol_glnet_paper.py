"""The authors' GL-net configuration (`glnet_paper`): its invariant, its heads, its task defaults."""

from __future__ import annotations

import pytest
import torch

from lol_models.registry import MODELS, build_model, config_for
from lol_models.symmetry import gl_act, random_gl_like
from lol_models.synthetic import random_lora_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_p_is_w1_delta_w_w2_transposed_per_layer():
    torch.manual_seed(0)
    x = random_lora_weights(3, 2, generator=torch.Generator().manual_seed(0))
    model = build_model("glnet_paper", x.layout, 2, {"hidden": 4, "normalize_input": False}).double()
    ps = model.invariants(x)
    for j, (group, p) in enumerate(zip(x.groups, ps)):
        w1, w2 = model.equivariant.w_u[j], model.equivariant.w_v[j]  # (L_g, h, n), (L_g, h, m)
        expected = torch.einsum("lhn,blnm,lkm->blhk", w1, group.delta(), w2)
        torch.testing.assert_close(p, expected, rtol=1e-10, atol=1e-12)
    assert ps[0].shape == (3, x.layout.groups[0].num_layers, 4, 4)


@pytest.mark.parametrize("readout", ["full", "mean"])
def test_both_heads_are_gl_invariant_with_ill_conditioned_g(readout):
    gen = torch.Generator().manual_seed(1)
    x = random_lora_weights(5, 3, generator=gen)
    gx = gl_act(x, random_gl_like(x, max_cond=1e3, scale_range=10.0, generator=gen))
    torch.manual_seed(1)
    model = build_model("glnet_paper", x.layout, 3, {"hidden": 5, "head": 8, "readout": readout}).double()
    model.fit_input_stats(x)
    with torch.no_grad():
        a, b = model(x), model(gx)
    assert a.shape == (5, 3)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-8  # float64; measured ≤ 1e-12
    first = x.groups[0]
    changed = type(x)((type(first)(first.names, first.u * 1.5, first.v), *x.groups[1:]))  # outside the group
    with torch.no_grad():
        assert float((model(changed) - a).abs().max()) > 1e-4


def test_the_head_layers_are_the_authors_and_the_task_picks_the_readout():
    layout = random_lora_weights(1, 2).layout
    full = build_model("glnet_paper", layout, 6, config_for("glnet_paper", "multilabel"))
    mean = build_model("glnet_paper", layout, 1, config_for("glnet_paper", "regression", {"hidden": 8}))
    assert [type(m).__name__ for m in full.head] == ["Linear", "LayerNorm", "ReLU", "Linear"]
    assert full.head[0].in_features == layout.num_layers * 16 * 16 and full.head[-1].out_features == 6
    assert mean.head[0].in_features == layout.num_layers and mean.cfg.hidden == 8
    assert MODELS["glnet_paper"].search.size >= 8 and MODELS["glnet_paper"].symmetry == "GL(r)"

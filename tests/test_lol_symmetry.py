"""Symmetry properties of the LoL models, in float64.

Each layer gets its own random g_i ∈ GL(r) (condition number 1, 10 or 1e3, random overall scale);
invariant models must give the same outputs within 1e-4 relative, and must change when the input
changes outside the group. Helpers are check_*, never test_*.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lol_models.common import SettingsError
from lol_models.glnet import (
    GLGate,
    GLLinear,
    GLNet,
    GLNetConfig,
    RowDropout,
    _group_shapes,
    spectral_log_moments,
)
from lol_models.glnet_filters import SpectralFilterReadout, filtered_updates, singular_directions
from lol_models.registry import build_model
from lol_models.symmetry import gl_act, random_gl, random_gl_like, random_orthogonal_like
from lol_models.synthetic import random_lora_weights
from lol_models.weights import Layout, LoraWeights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


RTOL = 1e-4
B = 4

# model name → config; all GL-invariant except where the group is O(r)
GL_INVARIANT = {
    "mlp_svd": {"hidden": (16,)},
    "mlp_dense": {"hidden": (16,)},
    "glnet": {"hidden": (6, 5, 4), "head": (16, 8), "dropout": 0.2, "context": 3, "spectral_moments": 3, "head_norm": True},
    "transformer": {"token": "svd", "d_model": 8, "nhead": 2, "num_layers": 1, "dim_feedforward": 16},
    "glnet_paper": {"hidden": 5, "head": 8},
    # rank-shift options: scale-free input and the spectral-filter readout (lol_models/glnet_filters.py)
    "glnet+filters": {"hidden": (6, 4), "head": (16,), "context": 3, "spectral_moments": 2, "scale_free": True,
                      "spectral_filters": (1, 2, 4)},
}

PROPERTY = settings(max_examples=8, deadline=None, derandomize=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / a.abs().max().detach().clamp_min(1e-12))


def build(name: str, weights: LoraWeights, seed: int, config=None, layout: Layout | None = None):
    torch.manual_seed(seed)
    model = build_model(name.split("+")[0], layout or weights.layout, 3, config).double()
    model.fit_input_stats(weights)
    return model.eval()


def check_invariant(model, x: LoraWeights, gx: LoraWeights, rtol: float = RTOL) -> None:
    with torch.no_grad():
        a, b = model(x), model(gx)
    assert a.shape == (x.batch_size, model.out_dim)
    err = rel_err(a, b)
    assert err < rtol, f"{type(model).__name__}: relative change {err:.2e} under the group action"


def check_sensitive(model, x: LoraWeights, changed: LoraWeights, min_rel: float = 1e-3) -> None:
    with torch.no_grad():
        a, b = model(x), model(changed)
    err = rel_err(a, b)
    assert err > min_rel, f"{type(model).__name__}: output moved only {err:.2e} for a change outside the group"


def check_equivariant(layer, x: LoraWeights, gs, rtol: float = 1e-8, seed: int = 0) -> None:
    """layer(x · g) == layer(x) · g for every group's U and V (same dropout draw on both sides)."""
    torch.manual_seed(seed)
    lhs = layer(gl_act(x, gs))
    torch.manual_seed(seed)
    rhs = gl_act(layer(x), gs)
    for gl, gr in zip(lhs.groups, rhs.groups):
        for a, b in ((gl.u, gr.u), (gl.v, gr.v)):
            err = rel_err(b, a)
            assert err < rtol, f"{type(layer).__name__} not equivariant: relative error {err:.2e}"


def perturb_u_only(x: LoraWeights, layer_index: int, seed: int) -> LoraWeights:
    """Change U of one layer (ΔW of that layer changes: not a group move)."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    seen = 0
    for grp in x.groups:
        u = grp.u.clone()
        if seen <= layer_index < seen + grp.num_layers:
            j = layer_index - seen
            u[:, j] = u[:, j] + 0.5 * u[:, j].std() * torch.randn(u[:, j].shape, generator=g, dtype=u.dtype)
        seen += grp.num_layers
        groups.append(type(grp)(grp.names, u, grp.v))
    return LoraWeights(tuple(groups))


cases = st.tuples(st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 3, 4]), st.sampled_from([1.0, 10.0, 1e3]))


@pytest.mark.parametrize("name", sorted(GL_INVARIANT))
@PROPERTY
@given(case=cases)
def test_gl_invariant_models_ignore_independent_g_per_layer(name, case):
    seed, rank, cond = case
    gen = torch.Generator().manual_seed(seed)
    x = random_lora_weights(B, rank, generator=gen)
    gx = gl_act(x, random_gl_like(x, max_cond=cond, scale_range=10.0, generator=gen))
    check_invariant(build(name, x, seed, GL_INVARIANT[name]), x, gx)


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), rank=st.sampled_from([1, 2, 3]))
def test_oalign_is_orthogonally_invariant_but_not_gl_invariant(seed, rank):
    gen = torch.Generator().manual_seed(seed)
    x = random_lora_weights(B, rank, generator=gen)
    model = build("mlp_oalign", x, seed, {"hidden": (16,)})
    check_invariant(model, x, gl_act(x, random_orthogonal_like(x, generator=gen)))
    if rank > 1:  # a non-orthogonal g moves it (a scalar g = c·I would not be in O(r) either)
        check_sensitive(model, x, gl_act(x, random_gl_like(x, max_cond=10.0, generator=gen)))


@pytest.mark.parametrize("name", ["mlp", "transformer_flat"])
def test_non_invariant_models_do_move_under_gl(name):
    gen = torch.Generator().manual_seed(0)
    x = random_lora_weights(B, 3, generator=gen)
    config = {"token": "flat", "d_model": 8, "nhead": 2, "num_layers": 1} if name == "transformer_flat" else None
    model = build(name.split("_")[0], x, 0, config)
    check_sensitive(model, x, gl_act(x, random_gl_like(x, max_cond=10.0, generator=gen)))


@pytest.mark.parametrize("name", sorted(GL_INVARIANT) + ["mlp_oalign"])
def test_every_layer_matters_outside_the_group(name):
    gen = torch.Generator().manual_seed(1)
    x = random_lora_weights(B, 3, generator=gen)
    model = build(name, x, 1, GL_INVARIANT.get(name, {"hidden": (16,)}))
    for i in range(x.num_layers):
        check_sensitive(model, x, perturb_u_only(x, i, seed=i))
    doubled = LoraWeights(tuple(type(g)(g.names, 2 * g.u, g.v) for g in x.groups))  # ΔW → 2ΔW
    check_sensitive(model, x, doubled)


@pytest.mark.parametrize("name", ["glnet", "glnet+filters", "glnet_paper", "mlp_svd", "mlp_dense", "transformer"])
def test_zero_padding_the_rank_changes_nothing(name):
    gen = torch.Generator().manual_seed(2)
    x = random_lora_weights(B, 2, generator=gen)
    padded = x.pad_rank(5)
    model = build(name, padded, 2, GL_INVARIANT[name], layout=padded.layout)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded), rtol=1e-10, atol=1e-12)
        if name.startswith("glnet"):  # rank-agnostic: a model built for rank 2 takes rank 5 inputs too
            small = build(name, x, 2, GL_INVARIANT[name])
            torch.testing.assert_close(small(x), small(padded), rtol=1e-10, atol=1e-12)


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), cond=st.sampled_from([1.0, 1e3]))
def test_glnet_layers_are_equivariant(seed, cond):
    gen = torch.Generator().manual_seed(seed)
    x = random_lora_weights(B, 3, generator=gen)
    gs = random_gl_like(x, max_cond=cond, generator=gen)
    torch.manual_seed(seed)
    sizes = [g.num_layers for g in x.groups]
    linear = GLLinear(_group_shapes(x.layout), 5).double()
    check_equivariant(linear, x, gs)
    hidden = linear(x)
    for cross in (False, True):
        gate = GLGate(sizes, 5, cross_layer=cross, context=3).double()
        with torch.no_grad():  # move off the initial values so every term is active
            for p in gate.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        check_equivariant(gate, hidden, gs)
    drop = RowDropout(0.5).train()
    check_equivariant(drop, hidden, gs, seed=seed)
    net = GLNet(x.layout, 2, GLNetConfig(hidden=(6, 5), dropout=0.3, context=3)).double().train()
    check_equivariant(net.equivariant_features, x, gs, seed=seed)


def test_random_gl_has_the_requested_condition_number():
    g = random_gl((50,), 4, max_cond=1e3, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(g)
    torch.testing.assert_close(s[:, 0] / s[:, -1], torch.full((50,), 1e3, dtype=torch.float64))


def test_spectral_log_moments_are_the_power_sums_of_the_singular_values():
    gen = torch.Generator().manual_seed(3)
    u, v = torch.randn(5, 7, 3, generator=gen, dtype=torch.float64), torch.randn(5, 9, 3, generator=gen, dtype=torch.float64)
    sigma = torch.linalg.svdvals(u @ v.transpose(-1, -2))  # (5, 7): the dense way, for reference
    expected = torch.stack([(sigma ** (2 * p)).sum(-1).log() / p for p in (1, 2, 3)], -1)
    torch.testing.assert_close(spectral_log_moments(u, v, 3), expected)
    zero = spectral_log_moments(torch.zeros(2, 4, 3), torch.zeros(2, 6, 3), 2)
    assert torch.isfinite(zero).all()


def test_spectral_log_moments_stay_invariant_in_float32_with_ill_conditioned_factors():
    gen = torch.Generator().manual_seed(4)
    x = random_lora_weights(16, 4, generator=gen)
    gx = gl_act(x, random_gl_like(x, max_cond=1e3, generator=gen))
    for g, h in zip(x.groups, gx.groups):
        exact = spectral_log_moments(g.u.double(), g.v.double(), 4)
        torch.testing.assert_close(spectral_log_moments(h.u.float(), h.v.float(), 4).double(), exact, rtol=0, atol=1e-3)


def test_singular_directions_rebuild_the_update_in_descending_order():
    gen = torch.Generator().manual_seed(5)
    u, v = torch.randn(3, 2, 7, 4, generator=gen, dtype=torch.float64), torch.randn(3, 2, 5, 4, generator=gen, dtype=torch.float64)
    a, sigma, b = singular_directions(u, v)
    assert a.shape == (3, 2, 7, 4) and sigma.shape == (3, 2, 4) and b.shape == (3, 2, 5, 4)
    torch.testing.assert_close(a @ torch.diag_embed(sigma) @ b.transpose(-1, -2), u @ v.transpose(-1, -2))
    torch.testing.assert_close(sigma, torch.linalg.svdvals(u @ v.transpose(-1, -2))[..., :4])  # rank 4: the 5th is 0
    assert bool((sigma[..., :-1] >= sigma[..., 1:]).all())


def test_scale_free_glnet_sees_a_layers_size_only_through_its_spectral_moments():
    gen = torch.Generator().manual_seed(6)
    x = random_lora_weights(B, 3, generator=gen)
    doubled = LoraWeights(tuple(type(g)(g.names, 2 * g.u, g.v) for g in x.groups))  # every ΔW_i → 2ΔW_i
    config = {**GL_INVARIANT["glnet+filters"], "spectral_moments": 0}
    blind = build("glnet", x, 6, config)
    with torch.no_grad():
        torch.testing.assert_close(blind(x), blind(doubled), rtol=1e-10, atol=1e-12)
    check_sensitive(build("glnet", x, 6, GL_INVARIANT["glnet+filters"]), x, doubled)


def test_scale_free_glnet_stays_invariant_in_float32_with_ill_conditioned_factors():
    """‖ΔW_i‖_F is computed in float64: in float32 the Gram products cancel under g of condition number 1e3."""
    gen = torch.Generator().manual_seed(7)
    x = random_lora_weights(16, 4, generator=gen)
    gx = gl_act(x, random_gl_like(x, max_cond=1e3, generator=gen))
    config = {"hidden": (6,), "head": (16,), "spectral_moments": 0, "scale_free": True}
    model = build("glnet", x, 7, config).float()
    with torch.no_grad():
        exact = build("glnet", x, 7, config)(x)  # the same weights in float64
        assert rel_err(exact, model(gx.to(torch.float32)).double()) < 1e-4


def repeated_singular_values(n_loras: int, rank: int, seed: int) -> LoraWeights:
    """Every layer's ΔW_i = 2 Q Q'ᵀ with orthonormal Q, Q': all its singular values equal (2), so its singular
    directions are not unique."""
    gen = torch.Generator().manual_seed(seed)
    x = random_lora_weights(n_loras, rank, generator=gen)
    return LoraWeights(tuple(type(g)(g.names, 2 * torch.linalg.qr(g.u).Q, torch.linalg.qr(g.v).Q) for g in x.groups))


def test_spectral_filters_are_invariant_with_repeated_singular_values():
    """F_p = Σ_k σ̂_k^p a_k b_kᵀ is a function of ΔW alone, whichever basis the SVD returns for a repeated σ."""
    x = repeated_singular_values(B, 2, seed=8)
    gx = gl_act(x, random_gl_like(x, max_cond=10.0, generator=torch.Generator().manual_seed(9)))
    for g, h in zip(x.groups, gx.groups):
        left, right = filtered_updates(g.u, g.v, (1.0, 3.0))
        moved_left, moved_right = filtered_updates(h.u, h.v, (1.0, 3.0))
        filtered = left @ right.unsqueeze(-3).transpose(-1, -2)  # (B, L_g, F, n, m)
        torch.testing.assert_close(moved_left @ moved_right.unsqueeze(-3).transpose(-1, -2), filtered)
        expected = g.u @ g.v.transpose(-1, -2) / (2 * 2**0.5)  # ΔW / ‖ΔW‖_F; σ̂ = 1/√2 on both directions
        torch.testing.assert_close(filtered[..., 0, :, :], expected)
        torch.testing.assert_close(filtered[..., 1, :, :], expected / 2)  # σ̂³ = σ̂ / 2
    check_invariant(build("glnet", x, 8, GL_INVARIANT["glnet+filters"]), x, gx, rtol=1e-8)


def test_the_filter_readout_reads_the_directions_not_only_the_spectrum():
    """Rotating the left singular vectors (U → R U, R orthogonal) keeps every σ_k but moves the readout; scaling
    ΔW does not; a rank-2 LoRA padded to rank 6 gives the same output."""
    gen = torch.Generator().manual_seed(10)
    x = random_lora_weights(B, 2, generator=gen)
    torch.manual_seed(10)
    readout = SpectralFilterReadout([(g.num_layers, g.n, g.m) for g in x.layout.groups], (1.0, 2.0), 4, 8).double()
    rotated = LoraWeights(tuple(type(g)(g.names, torch.linalg.qr(torch.randn(g.n, g.n, generator=gen, dtype=torch.float64)).Q @ g.u, g.v)
                                for g in x.groups))
    scaled = LoraWeights(tuple(type(g)(g.names, 5 * g.u, g.v) for g in x.groups))
    with torch.no_grad():
        base = readout(x)
        assert base.shape == (B, 8) and rel_err(base, readout(rotated)) > 1e-2
        torch.testing.assert_close(readout(scaled), base)
        torch.testing.assert_close(readout(x.pad_rank(6)), base, rtol=1e-10, atol=1e-12)


def test_glnet_refuses_spectral_filter_powers_below_one():
    with pytest.raises(SettingsError, match=r"spectral_filters must be a tuple of powers p ≥ 1"):
        GLNetConfig(spectral_filters=(0.5,))

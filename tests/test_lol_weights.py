"""LoraWeights: grouping, peft conversion, rank padding, collation, indexing, errors."""

from __future__ import annotations

import pytest
import torch

from lol_models.synthetic import random_lora_weights
from lol_models.weights import GroupLayout, Layout, LoraWeights, collate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_from_layers_groups_by_shape_in_first_appearance_order():
    g = _gen()
    shapes = [("q", 4, 3), ("k", 2, 3), ("v", 4, 3), ("o", 2, 3), ("x", 5, 5)]
    us = [torch.randn(2, n, 3, generator=g) for _, n, _ in shapes]
    vs = [torch.randn(2, m, 3, generator=g) for _, _, m in shapes]
    w = LoraWeights.from_layers([s[0] for s in shapes], us, vs)
    assert [grp.names for grp in w.groups] == [("q", "v"), ("k", "o"), ("x",)]
    assert w.layer_names == ("q", "v", "k", "o", "x")
    assert w.batch_size == 2 and w.rank == 3 and w.num_layers == 5
    assert tuple(w.groups[0].u.shape) == (2, 2, 4, 3) and tuple(w.groups[0].v.shape) == (2, 2, 3, 3)
    u, v = w.layer("o")
    assert torch.equal(u, us[3]) and torch.equal(v, vs[3])
    assert w.layout == Layout((GroupLayout(("q", "v"), 4, 3), GroupLayout(("k", "o"), 2, 3),
                               GroupLayout(("x",), 5, 5)), 3)
    assert Layout.from_dict(w.layout.to_dict()) == w.layout


def test_from_peft_reproduces_delta_w():
    g = _gen(1)
    B, r, alpha = 3, 4, 8.0
    lora_a = {"l0": torch.randn(B, r, 6, generator=g), "l1": torch.randn(B, r, 5, generator=g)}
    lora_b = {"l0": torch.randn(B, 7, r, generator=g), "l1": torch.randn(B, 2, r, generator=g)}
    w = LoraWeights.from_peft(lora_a, lora_b, alpha=alpha, rank=r)
    for name in lora_a:
        u, v = w.layer(name)
        torch.testing.assert_close(u @ v.transpose(1, 2), lora_b[name] @ lora_a[name] * (alpha / r))
    with pytest.raises(ValueError, match="only in A"):
        LoraWeights.from_peft({**lora_a, "extra": lora_a["l0"]}, lora_b, alpha=alpha, rank=r)
    with pytest.raises(ValueError, match="expected lora_A"):
        LoraWeights.from_peft(lora_a, lora_b, alpha=alpha, rank=r + 1)


def test_pad_rank_keeps_every_delta_w():
    w = random_lora_weights(3, 2, generator=_gen(2))
    p = w.pad_rank(5)
    assert p.rank == 5 and p.layout.same_layers(w.layout)
    for a, b in zip(w.groups, p.groups):
        torch.testing.assert_close(a.delta(), b.delta())
        assert torch.count_nonzero(b.u[..., 2:]) == 0
    assert w.pad_rank(2) is w
    with pytest.raises(ValueError, match="below the current rank"):
        w.pad_rank(1)


def test_collate_pads_mixed_ranks_and_concatenates():
    a = random_lora_weights(2, 2, generator=_gen(3))
    b = random_lora_weights(3, 4, generator=_gen(4))
    c = collate([a, b])
    assert c.batch_size == 5 and c.rank == 4
    for ga, gb, gc in zip(a.groups, b.groups, c.groups):
        torch.testing.assert_close(gc.delta()[:2], ga.delta())
        torch.testing.assert_close(gc.delta()[2:], gb.delta())
    other = random_lora_weights(2, 2, {"a": (8, 6), "zz": (3, 3)}, generator=_gen(5))
    with pytest.raises(ValueError, match="missing layers"):
        collate([a, other])


def test_index_map_to_and_finite_mask():
    w = random_lora_weights(6, 3, generator=_gen(6))
    sub = w.index([4, 1])
    torch.testing.assert_close(sub.groups[0].u, w.groups[0].u[[4, 1]])
    assert w.index(2).batch_size == 1 and w.index(slice(1, 4)).batch_size == 3
    assert w.index(torch.tensor([0, 5])).batch_size == 2
    assert w.to(torch.float32).dtype == torch.float32
    doubled = w.map(lambda t: 2 * t)
    torch.testing.assert_close(doubled.groups[1].delta(), 4 * w.groups[1].delta())
    bad = w.map(lambda t: t.clone())
    bad.groups[1].v[3, 0, 0, 0] = float("nan")
    assert bad.finite_mask().tolist() == [True, True, True, False, True, True]


def test_container_validation_errors():
    g = _gen(7)
    with pytest.raises(ValueError, match="disagree on B or r"):
        LoraWeights.from_layers(["a"], [torch.randn(2, 3, 2, generator=g)], [torch.randn(2, 4, 3, generator=g)])
    with pytest.raises(ValueError, match="duplicate layer names"):
        LoraWeights.from_layers(["a", "a"], [torch.randn(2, 3, 2)] * 2, [torch.randn(2, 4, 2)] * 2)
    w = random_lora_weights(2, 3, generator=g)
    small = Layout(w.layout.groups, rank=2)
    with pytest.raises(ValueError, match="rank 3, above the layout's rank 2"):
        small.check(w)

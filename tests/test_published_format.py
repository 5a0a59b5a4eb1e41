"""The published format (`lol_models.published`): peft names as peft writes them, rows and layouts.

The writer and the reader both go through this module; these tests pin what it promises on its
own, on tiny shapes: peft's own saved keys parse back to the factors, a row holds each LoRA's
factors exactly (lower ranks zero-padded), and a layout read back is the layout models are built for.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from published_format import BIG, NORM, gl_population, write_published

from lol_models import published
from lol_models.published import (
    FormatError,
    adapter_tensors,
    check_layout,
    flatten,
    make_layout,
    module_factors,
    peft_key,
    unflatten,
)
from lol_models.weights import Layout

SHAPES = {"down.proj": (3, 5), "up.proj": (6, 3)}  # module: (in, out)


def _factors(rank: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal((rank, n_in)).astype(np.float32), rng.standard_normal((n_out, rank)).astype(np.float32))
            for name, (n_in, n_out) in sorted(SHAPES.items())}


def test_file_names_and_keys_are_peft_s():
    """The adapter file names are peft's constants, and the keys peft saves parse back to its factors."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import constants
    from peft.utils.save_and_load import get_peft_model_state_dict

    assert (published.ADAPTER_WEIGHTS, published.ADAPTER_PICKLE, published.ADAPTER_CONFIG) == (
        constants.SAFETENSORS_WEIGHTS_NAME, constants.WEIGHTS_NAME, constants.CONFIG_NAME)
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("down", torch.nn.ModuleDict({"proj": torch.nn.Linear(3, 5)}))
    base.add_module("up", torch.nn.ModuleDict({"proj": torch.nn.Linear(5, 6)}))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights="gaussian"))
    saved = get_peft_model_state_dict(model)  # what save_pretrained writes
    factors = module_factors(saved)
    assert list(factors) == ["down.proj", "up.proj"]
    layer = model.base_model.model.up.proj
    assert torch.equal(factors["up.proj"][0], layer.lora_A["default"].weight)
    assert torch.equal(factors["up.proj"][1], layer.lora_B["default"].weight)
    assert adapter_tensors(factors).keys() == saved.keys() and peft_key("up.proj", "B") in saved


def test_keys_that_are_not_lora_factors_are_refused():
    a, b = np.zeros((2, 3)), np.zeros((4, 2))
    with pytest.raises(FormatError, match="unexpected tensor 'base_model.model.m.bias'"):
        module_factors({peft_key("m", "A"): a, peft_key("m", "B"): b, "base_model.model.m.bias": b})
    with pytest.raises(FormatError, match=r"without both lora_A and lora_B: \['m'\]"):
        module_factors({peft_key("m", "A"): a})
    assert list(module_factors({"m.lora_A.weight": a, "m.lora_B.weight": b})) == ["m"]  # prefix optional


def test_a_row_holds_each_rank_s_factors_exactly():
    layout = check_layout(make_layout(_factors(4), 4))
    assert layout["size"] == 4 * sum(n_in + n_out for n_in, n_out in SHAPES.values())
    for rank in (1, 2, 4):
        factors = _factors(rank, seed=rank)
        row = flatten(factors, layout)
        back = unflatten(row, layout, rank)
        assert all(np.array_equal(back[n][0], a) and np.array_equal(back[n][1], b) for n, (a, b) in factors.items())
        padded = unflatten(row, layout, 4)
        assert all(np.array_equal(padded[n][1] @ padded[n][0], b @ a) for n, (a, b) in factors.items())  # B·A unchanged


def test_a_lora_of_other_modules_or_shapes_does_not_fit_the_layout():
    layout = make_layout(_factors(2), 2)
    with pytest.raises(FormatError, match="differ from the population's layout"):
        flatten({"other": _factors(2)["up.proj"]}, layout)
    wrong = {**_factors(2), "up.proj": (np.zeros((2, 4), np.float32), np.zeros((6, 2), np.float32))}
    with pytest.raises(FormatError, match="differ from the layout"):
        flatten(wrong, layout)


def test_a_published_layout_is_the_layout_models_are_built_for(tmp_path):
    from lol_models.data import pull

    factors, rows = gl_population(ranks=(2, 3), n_per_rank=4, seed=0)
    folder = write_published(tmp_path / "published", factors, rows, {**NORM, **BIG})
    layout = json.loads((folder / "layout.json").read_text())
    pulled = pull(folder, "train")
    assert pulled.weights.layout == Layout.from_published(layout)
    assert Layout.from_published(layout).rank == 3 == layout["max_rank"]

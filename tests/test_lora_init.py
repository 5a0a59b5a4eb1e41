"""`hyperparameters.lora_init` and `lora.alpha_per_rank` reach peft as the manifest says."""

from __future__ import annotations

import json

import torch
from conftest import ROOT

from pipeline.cohort.peft_io import init_factors
from pipeline.finetune.causal_lm import CausalLMTrainer
from pipeline.finetune.diffusion import DiffusionTrainer
from pipeline.jobs import job_at
from pipeline.manifest import Manifest

TINY = ROOT / "manifests" / "tiny-shapes.yaml"


def job(**overrides):
    return job_at(Manifest.from_yaml(TINY, overrides=[f"{k}={json.dumps(v)}" for k, v in overrides.items()]), 0)


def test_each_trainer_keeps_its_default_and_the_manifest_overrides_it():
    assert DiffusionTrainer("cpu").lora_config(job()).init_lora_weights == "gaussian"
    assert DiffusionTrainer("cpu").lora_config(job(**{"hyperparameters.lora_init": "peft_default"})).init_lora_weights is True
    assert CausalLMTrainer("cpu").lora_config(job()).init_lora_weights is True
    assert CausalLMTrainer("cpu").lora_config(job(**{"hyperparameters.lora_init": "gaussian"})).init_lora_weights == "gaussian"


def test_the_two_initialisations_differ_as_peft_defines_them():
    """gaussian: A ~ N(0, 1/r) (std 1/r); peft's default: Kaiming-uniform A (bound √(1/in) for a = √5). B = 0 in both."""
    model = torch.nn.Sequential()
    model.add_module("to_q", torch.nn.Linear(256, 256))
    rank = 8
    spec = {"lora.rank": rank, "lora.target_modules": ["to_q"]}
    gaussian = DiffusionTrainer("cpu").lora_config(job(**spec))
    default = DiffusionTrainer("cpu").lora_config(job(**spec, **{"hyperparameters.lora_init": "peft_default"}))
    _, g = init_factors(model, gaussian, 0)
    _, d = init_factors(model, default, 0)
    a_g, a_d = g["to_q"].A, d["to_q"].A  # (r, in)
    assert abs(a_g.std().item() - 1 / rank) < 0.15 / rank
    assert a_d.abs().max().item() <= (1 / 256) ** 0.5 + 1e-6 and abs(a_d.std().item() - (1 / 256) ** 0.5 / 3 ** 0.5) < 0.01
    assert not g["to_q"].B.any() and not d["to_q"].B.any()


def test_alpha_per_rank_reaches_the_peft_scale():
    for rank in (1, 4, 32):
        config = DiffusionTrainer("cpu").lora_config(job(**{"lora.alpha": None, "lora.alpha_per_rank": 2, "lora.rank": rank}))
        assert config.r == rank and config.lora_alpha == 2.0 * rank

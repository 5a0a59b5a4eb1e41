"""The DreamBooth-style LoRA trainer on an SD-shaped pipeline: real training, real peft files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, check_finetune_cli_resumes
from peft import PeftModel
from safetensors.torch import load_file

from pipeline.finetune.diffusion import DiffusionTrainer
from pipeline.finetune.runner import finetune_population
from pipeline.manifest import Manifest
from storage import Store


def manifest(base, *extra) -> Manifest:
    return Manifest.from_yaml(ROOT / "manifests" / "tiny-shapes.yaml",
                              overrides=[f"base.ref={base}", "count=2", "hyperparameters.steps=2",
                                         "hyperparameters.batch_size=2", *extra])


def test_trains_peft_adapters_that_load_and_change_the_unet(random_sd, tmp_path):
    from diffusers import UNet2DConditionModel

    store = Store(str(tmp_path / "store"))
    m = manifest(random_sd)
    summary = finetune_population(m, store, DiffusionTrainer)
    assert len(summary.trained) == 2 and not summary.failed
    population = store.population("tiny-shapes")
    job_id = summary.trained[0]
    adapter_dir = store.local_path(population.job_rel(job_id, "adapter"))
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    a_keys = sorted(k for k in weights if k.endswith("lora_A.weight"))
    assert a_keys and all(("to_q" in k or "to_v" in k) for k in weights)
    assert all(weights[k].shape[0] == 4 for k in a_keys)  # rank 4: A is (r, in)
    assert all(weights[k.replace("lora_A", "lora_B")].shape[1] == 4 for k in a_keys)  # B is (out, r)
    record = population.record(job_id)
    assert record["metrics"]["optimizer_steps"] == 2 and record["metrics"]["num_images"] == 20

    unet = UNet2DConditionModel.from_pretrained(random_sd, subfolder="unet")
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = unet(x, t, text).sample
        adapted = PeftModel.from_pretrained(unet, adapter_dir)
        after = adapted(x, t, text).sample
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("cohort_size", [1, 2])  # one job at a time (`run`) and a cohort (`train_cohort`)
def test_saved_adapters_name_the_manifests_base(random_sd, tmp_path, cohort_size):
    """peft leaves base_model_name_or_path empty for a diffusers UNet; both save paths name the manifest's base,
    which `lol predict` checks (tests/test_predict_export.py)."""
    store = Store(str(tmp_path / "store"))
    summary = finetune_population(manifest(random_sd, "hyperparameters.steps=1"), store, DiffusionTrainer,
                                  cohort_size=cohort_size)
    assert len(summary.trained) == 2
    for job_id in summary.trained:
        folder = store.local_path(store.population("tiny-shapes").job_rel(job_id, "adapter"))
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(random_sd) and config["r"] == 4


def test_missing_target_module_fails_before_training_and_lists_candidates(random_sd, tmp_path):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(ValueError, match=r"do not exist in the UNet; candidates: .*to_k"):
        finetune_population(manifest(random_sd, "lora.target_modules=[to_qq]"), store, DiffusionTrainer)
    assert store.population("tiny-shapes").job_ids() == []


def test_non_finite_loss_fails_the_job_and_the_population_goes_on(random_sd, tmp_path):
    store = Store(str(tmp_path / "store"))
    summary = finetune_population(manifest(random_sd, "hyperparameters.learning_rate={choice: [1.0e+30, 1.0e-4]}", "count=4",
                                           "hyperparameters.steps=3"), store, DiffusionTrainer)
    assert summary.trained and set(summary.failed.values()) == {"non-finite loss"}


def test_a_base_that_is_not_a_diffusion_pipeline_is_refused(tmp_path):
    not_a_pipeline = tmp_path / "empty"
    not_a_pipeline.mkdir()
    with pytest.raises(ValueError, match="not a StableDiffusionPipeline-compatible"):
        finetune_population(manifest(not_a_pipeline), Store(str(tmp_path / "store")), DiffusionTrainer)


def test_lol_finetune_runs_resumes_and_summarises(random_sd, tmp_path, run_cli):
    args = ("finetune", ROOT / "manifests" / "tiny-shapes.yaml", f"base.ref={random_sd}", "count=3",
            "hyperparameters.steps=1", "hyperparameters.batch_size=1", "--store", tmp_path / "store", "--limit", "2")
    check_finetune_cli_resumes(run_cli, args)

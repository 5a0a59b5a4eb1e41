"""The job runner: trains what is missing, records failures, skips done and claimed jobs.

The trainer here is real (peft LoRA on a small torch MLP fitted to a seeded regression), so
the runner is exercised end to end without the minutes a diffusion base would take.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from conftest import ROOT
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from pipeline.finetune.runner import NonFiniteLoss, finetune_population
from pipeline.jobs import Job
from pipeline.manifest import Manifest
from storage import Store

OVERRIDES = ["count=6", "hyperparameters.steps=5", "lora.target_modules=[fc1, fc2]",
             "hyperparameters.learning_rate={choice: [0.01, 1.0e+30]}"]


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class MLPTrainer:
    setups = 0

    def setup(self, manifest: Manifest, store: Store) -> None:
        MLPTrainer.setups += 1

    def run(self, job: Job, out_dir: Path) -> dict:
        spec = job.spec
        torch.manual_seed(spec.seed)
        model = get_peft_model(MLP(), LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules)))
        x = torch.randn(32, 8)
        y = x.sum(dim=1, keepdim=True)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=spec.hyperparameters["learning_rate"])
        for step in range(spec.hyperparameters["steps"]):
            loss = ((model(x) - y) ** 2).mean()
            if not math.isfinite(loss.item()):
                raise NonFiniteLoss(f"loss {loss.item()} at step {step}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.save_pretrained(out_dir / "adapter")
        return {"final_loss": loss.item()}


def manifest() -> Manifest:
    return Manifest.from_yaml(ROOT / "manifests" / "tiny-shapes.yaml", overrides=OVERRIDES)


def test_runner_trains_records_failures_and_resumes(tmp_path):
    store = Store(str(tmp_path / "store"))
    m = manifest()
    MLPTrainer.setups = 0
    outcomes = []
    summary = finetune_population(m, store, MLPTrainer, on_job=lambda job, outcome: outcomes.append(outcome))
    exploding = {j for j, reason in summary.failed.items()}
    assert summary.planned == 6 and len(summary.trained) + len(summary.failed) == 6
    assert set(summary.failed.values()) == {"non-finite loss"} and summary.trained
    assert MLPTrainer.setups == 1  # the base is set up once for all jobs

    population = store.population(m.population.name)
    for job_id in summary.trained:
        assert population.is_done(job_id, verify=True)
        weights = load_file(str(population.store.local_path(population.job_rel(job_id, "adapter/adapter_model.safetensors"))))
        assert any(k.endswith("fc1.lora_A.weight") for k in weights) and all(torch.isfinite(v).all() for v in weights.values())
        adapter = PeftModel.from_pretrained(MLP(), population.store.local_path(population.job_rel(job_id, "adapter")))
        assert adapter(torch.zeros(1, 8)).shape == (1, 1)
    for job_id in exploding:
        assert population.failure(job_id)["reason"] == "non-finite loss"

    again = finetune_population(m, store, MLPTrainer)
    assert again.skipped == len(summary.trained) and set(again.failed) == exploding  # failures are retried
    assert population.failure(next(iter(exploding)))["attempts"] == 2


def test_a_job_claimed_by_another_worker_is_left_alone(tmp_path):
    store = Store(str(tmp_path / "store"))
    m = manifest()
    population = store.population(m.population.name)
    from pipeline.jobs import expand

    first = next(expand(m))
    population.claim(first.job_id, "someone-else", lease_s=600)
    summary = finetune_population(m, store, MLPTrainer, limit=2)
    assert summary.busy == 1 and first.job_id not in summary.trained and first.job_id not in summary.failed


def test_shards_split_the_work(tmp_path):
    store = Store(str(tmp_path / "store"))
    a = finetune_population(manifest(), store, MLPTrainer, shard_spec="1/2")
    b = finetune_population(manifest(), store, MLPTrainer, shard_spec="2/2")
    done_a, done_b = set(a.trained) | set(a.failed), set(b.trained) | set(b.failed)
    assert len(done_a) == 3 and len(done_b) == 3 and not done_a & done_b

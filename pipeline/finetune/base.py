"""What the diffusion and causal-LM trainers share: the job's data, its peft config, a cohort of
jobs trained in the same passes, and the metrics every record carries.

A trainer subclasses `LoraTrainer` and says only what is its model kind's own:

- `trained_model`: the module the LoRA layers go on (the UNet, the causal LM), a property;
- `lora_init()`: `LoraConfig` arguments beyond rank, alpha, dropout and targets;
- `train(examples, config, hyperparameters, seed, out_dir)`: one job alone;
- `new_member(task, slot)`: a cohort member with the job's data stream (raises if it cannot start);
- `cohort_losses(active, routing)`: one forward pass of the active members, (losses, ended);
- `precision(hyperparameters)`: accelerate's mixed precision for a job on this device;
- `member_metrics(member, seconds)`: the record's metrics of a member trained in a cohort.
"""

from __future__ import annotations

import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import runtime
from pipeline.data import select_job_examples, source_examples, source_provenance
from pipeline.data.base import DataSourceError
from pipeline.finetune.cohort import (
    CohortTask,
    Member,
    cohort_autocast,
    common_targets,
    member_factors,
    train_members,
)
from pipeline.jobs import Job
from pipeline.manifest import Manifest

LORA_INIT_WEIGHTS = {"gaussian": "gaussian", "peft_default": True}  # manifest name -> peft's init_lora_weights


class LoraTrainer:
    """Trains one LoRA per job, or a cohort of them, on a base loaded once (see the module docstring)."""

    versions_of: tuple[str, ...] = ("torch", "peft", "accelerate")  # libraries whose versions each record names

    def __init__(self, device: str | torch.device | None = None):
        self.device = runtime.compute_device(device)
        self.data_provenance: dict[str, Any] | None = None
        self.base: tuple[str, str | None] | None = None  # (ref, revision) saved adapters name; set by `setup`

    # ------------------------------------------------------------------ hooks

    @property
    def trained_model(self) -> torch.nn.Module:
        raise NotImplementedError

    @trained_model.setter
    def trained_model(self, model: torch.nn.Module) -> None:
        raise NotImplementedError

    def lora_init(self) -> dict[str, Any]:
        return {}

    def train(self, examples, config, hyperparameters: dict[str, Any], seed: int, out_dir: Path) -> dict[str, Any]:
        raise NotImplementedError

    def new_member(self, task: CohortTask, slot: int) -> Member:
        raise NotImplementedError

    def cohort_losses(self, active: Sequence[Member], routing) -> tuple[list[torch.Tensor], list[bool]]:
        raise NotImplementedError

    def precision(self, hyperparameters: dict[str, Any]) -> str:
        return "no"

    def member_metrics(self, member: Member, seconds: float) -> dict[str, Any]:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    def load_examples(self, manifest: Manifest):
        """The manifest's examples (checked against its subsets), before the base loads; records name the data."""
        examples = source_examples(manifest)
        if not examples:
            raise DataSourceError(f"data split {manifest.data.split!r} of {manifest.data.source!r} is empty")
        self.data_provenance = source_provenance(manifest)
        return examples

    def job_examples(self, job: Job):
        return select_job_examples(self.examples, job.spec.data, job.spec.seed)

    def lora_config(self, job: Job):
        """The job's peft `LoraConfig`; `hyperparameters.lora_init` overrides the trainer's initialisation."""
        from peft import LoraConfig

        spec = job.spec
        options = self.lora_init()
        if (init := spec.hyperparameters.get("lora_init")) is not None:
            options["init_lora_weights"] = LORA_INIT_WEIGHTS[init]
        return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.lora_dropout,
                          target_modules=list(spec.target_modules), **options)

    def run(self, job: Job, out_dir: Path) -> dict[str, Any]:
        return self.train(self.job_examples(job), self.lora_config(job), job.spec.hyperparameters, job.spec.seed, out_dir)

    def cohort_task(self, job: Job, out_dir: Path) -> CohortTask:
        return CohortTask(job.job_id, self.lora_config(job), self.job_examples(job), job.spec.hyperparameters,
                          job.spec.seed, out_dir)

    def train_cohort(self, tasks: Sequence[CohortTask]) -> dict[str, dict[str, Any] | Exception]:
        """Train several LoRAs in the same forward passes (`pipeline.finetune.cohort`).

        Returns {task key: metrics, or the exception that failed it}; each adapter is saved to
        its `out_dir/adapter` as the job alone would save it.
        """
        from pipeline.cohort.layers import cohort_layers
        from pipeline.cohort.peft_io import init_factors, save_adapter

        targets = common_targets(tasks)
        autocast = cohort_autocast({self.precision(t.hyperparameters) for t in tasks})
        outcomes: dict[str, dict[str, Any] | Exception] = {}
        members, initial = [], {}
        for slot, task in enumerate(tasks):
            try:
                member = self.new_member(task, slot)
                self.trained_model, initial[task.key] = init_factors(self.trained_model, task.config, task.seed)
            except Exception as exc:  # a job that cannot start fails alone
                outcomes[task.key] = exc
                continue
            members.append(member)
        with cohort_layers(self.trained_model, targets) as (routing, layers):
            for member in members:
                for name, layer in layers.items():
                    layer.add_slot(member.slot, initial[member.key][name], dropout=float(member.config.lora_dropout))
            model = self.trained_model
            model.train()
            seconds, self.member_bytes = train_members(model, members, layers,
                                                       lambda active: self.cohort_losses(active, routing), autocast)
            model.eval()
            trained = {m.key: member_factors(m, layers) for m in members if m.failure is None}
        for member in members:
            if member.failure is not None:
                outcomes[member.key] = member.failure
                continue
            self.trained_model = save_adapter(self.trained_model, member.config, trained[member.key],
                                              member.out_dir / "adapter", self.base).eval()
            outcomes[member.key] = {**self.member_metrics(member, seconds / len(members)),
                                    "cohort": {"size": len(tasks), "slot": member.slot, "seconds": round(seconds, 3)}}
        return outcomes

    def common_metrics(self, losses: list[float], steps: int, seconds: float) -> dict[str, Any]:
        """The metrics every record carries: losses, steps, time, memory, versions, the data it was trained on."""
        return {
            "final_loss": losses[-1], "mean_loss": float(np.mean(losses)), "optimizer_steps": steps,
            "micro_steps": len(losses), "train_seconds": round(seconds, 3), "steps_per_second": round(len(losses) / seconds, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if self.device.type == "cuda" else None,
            "versions": runtime.versions(*self.versions_of),
            **({"data": self.data_provenance} if self.data_provenance else {}),
        }


__all__ = ["LoraTrainer"]

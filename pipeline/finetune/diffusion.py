"""DreamBooth-style LoRA finetuning of the UNet of any StableDiffusionPipeline-compatible base.

The noise-prediction loss of diffusers' DreamBooth LoRA recipe: encode the job's images with
the frozen VAE, add noise at a random timestep, and regress the UNet's prediction (ε, v or
x0, whatever the scheduler's `prediction_type` says) conditioned on the instance prompt.
LoRA layers come from peft (`LoraConfig`); accelerate handles the device, mixed precision
(on GPU) and gradient accumulation. The pipeline is loaded once in `setup` and every job
wraps the same frozen UNet, then unloads its LoRA layers again.

Shapes: N training images, B batch, C latent channels, h×w latent size, S text tokens,
E text width.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import runtime
from pipeline.bases import BaseModelError
from pipeline.bases.loading import load_diffusion_pipeline
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
from pipeline.finetune.runner import NonFiniteLoss
from pipeline.finetune.targets import check_target_modules
from pipeline.jobs import Job
from pipeline.manifest import Manifest
from storage import Store


def images_tensor(examples, resolution: int) -> torch.Tensor:
    """(N, 3, resolution, resolution) float32 in [-1, 1]."""
    from PIL import Image

    arrays = [np.asarray(e.load_image().resize((resolution, resolution), Image.BICUBIC), dtype=np.float32) for e in examples]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


class DiffusionTrainer:
    """Trains one LoRA per job on a base loaded once."""

    def __init__(self, device: str | torch.device | None = None):
        self.device = runtime.compute_device(device)

    def setup(self, manifest: Manifest, store: Store) -> None:
        self.examples = source_examples(manifest)  # bad or missing data fails before the base loads
        if not self.examples:
            raise DataSourceError(f"data split {manifest.data.split!r} of {manifest.data.source!r} is empty")
        self.data_provenance = source_provenance(manifest)
        self.use_pipeline(load_diffusion_pipeline(manifest.base.model_dump(), store), manifest.lora.target_modules)

    def use_pipeline(self, pipe, target_modules: list[str] | tuple[str, ...]) -> None:
        """Train on an already loaded `StableDiffusionPipeline` (frozen here, moved to the device)."""
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self._prompt_cache: dict[str, torch.Tensor] = {}
        check_target_modules(self.pipe.unet, target_modules, where="the UNet")
        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            module.requires_grad_(False)
            module.to(self.device)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.native_resolution = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    @torch.no_grad()
    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        """(1, S, E) text-encoder states of the instance prompt."""
        tokens = self.pipe.tokenizer(prompt, padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.pipe.text_encoder(tokens)[0]

    @torch.no_grad()
    def _latent_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE posterior, each (N, C, h, w), computed once per job."""
        dist = self.pipe.vae.encode(pixels.to(self.device, self.pipe.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def _target(self, latents, noise, timesteps) -> torch.Tensor:
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if kind == "sample":
            return latents
        raise BaseModelError(f"the base's noise scheduler predicts {kind!r}; supported prediction_type: epsilon, v_prediction, sample")

    def run(self, job: Job, out_dir: Path) -> dict[str, Any]:
        examples = select_job_examples(self.examples, job.spec.data, job.spec.seed)
        return self.train(examples, self.lora_config(job), job.spec.hyperparameters, job.spec.seed, out_dir)

    def lora_config(self, job: Job):
        from peft import LoraConfig

        spec = job.spec
        return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.lora_dropout,
                          target_modules=list(spec.target_modules), init_lora_weights="gaussian")

    def cohort_task(self, job: Job, out_dir: Path) -> CohortTask:
        return CohortTask(job.job_id, self.lora_config(job), select_job_examples(self.examples, job.spec.data, job.spec.seed),
                          job.spec.hyperparameters, job.spec.seed, out_dir)

    def stream(self, examples, hp: dict[str, Any], seed: int) -> DiffusionStream:
        """The job's training batches: its images encoded once, its prompt, its seeded draws."""
        if not examples:
            raise DataSourceError("a LoRA needs at least one training image; the job's data group is empty")
        resolution = int(hp.get("resolution", self.native_resolution))
        mean, std = self._latent_moments(images_tensor(examples, resolution))
        return DiffusionStream(self, mean, std, self._prompt_states(str(hp.get("instance_prompt", ""))),
                               int(hp.get("batch_size", 1)), torch.Generator(device="cpu").manual_seed(seed))

    def _prompt_states(self, prompt: str) -> torch.Tensor:
        """(1, S, E), cached per prompt (a population has a handful of instance prompts)."""
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = self._encode_prompt(prompt)
        return self._prompt_cache[prompt]

    def train(self, examples, config, hp: dict[str, Any], seed: int, out_dir: Path) -> dict[str, Any]:
        """Train one LoRA (`config`, a peft `LoraConfig`) on `examples`; save it to `out_dir/adapter`."""
        from accelerate import Accelerator
        from peft import get_peft_model

        steps, accumulation = int(hp["steps"]), int(hp.get("gradient_accumulation", 1))
        data = self.stream(examples, hp, seed)
        torch.manual_seed(seed)  # LoRA init
        peft_unet = get_peft_model(self.pipe.unet, config)
        model = peft_unet
        try:
            precision = str(hp.get("mixed_precision", "no")) if self.device.type == "cuda" else "no"
            accelerator = Accelerator(gradient_accumulation_steps=accumulation, mixed_precision=precision,
                                      cpu=self.device.type == "cpu")
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=float(hp["learning_rate"]), weight_decay=float(hp.get("weight_decay", 1e-2)))
            model, optimizer = accelerator.prepare(model, optimizer)
            model.train()
            losses, started = [], time.perf_counter()
            for micro_step in range(steps * accumulation):
                with accelerator.accumulate(model):
                    noisy, timesteps, states, target = data.draw()
                    prediction = model(noisy, timesteps, states).sample
                    loss = F.mse_loss(prediction.float(), target.float())
                    if not math.isfinite(loss.item()):
                        raise NonFiniteLoss(f"loss {loss.item()} at micro-step {micro_step}")
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                losses.append(loss.item())
            seconds = time.perf_counter() - started
            accelerator.unwrap_model(model).save_pretrained(out_dir / "adapter")
        finally:
            self.pipe.unet = peft_unet.unload()  # the frozen base UNet again, without LoRA layers
        return self._metrics(losses, steps, seconds, len(examples))

    def train_cohort(self, tasks: Sequence[CohortTask]) -> dict[str, dict[str, Any] | Exception]:
        """Train several LoRAs in the same UNet passes (`pipeline.finetune.cohort`).

        Returns {task key: metrics, or the exception that failed it}; each adapter is saved to
        its `out_dir/adapter` as the job alone would save it.
        """
        from pipeline.cohort.layers import cohort_layers
        from pipeline.cohort.peft_io import init_factors, save_adapter

        targets = common_targets(tasks)
        on_gpu = self.device.type == "cuda"
        autocast = cohort_autocast({str(t.hyperparameters.get("mixed_precision", "no")) if on_gpu else "no" for t in tasks})
        outcomes: dict[str, dict[str, Any] | Exception] = {}
        members, initial = [], {}
        for slot, task in enumerate(tasks):
            try:
                hp = task.hyperparameters
                data = self.stream(task.examples, hp, task.seed)
                self.pipe.unet, initial[task.key] = init_factors(self.pipe.unet, task.config, task.seed)
            except Exception as exc:  # a job that cannot start fails alone
                outcomes[task.key] = exc
                continue
            members.append(Member(task.key, slot, task.config, data, int(hp.get("gradient_accumulation", 1)), int(hp["steps"]),
                                  float(hp["learning_rate"]), float(hp.get("weight_decay", 1e-2)), task.out_dir))
        with cohort_layers(self.pipe.unet, targets) as (routing, layers):
            for member in members:
                for name, layer in layers.items():
                    layer.add_slot(member.slot, initial[member.key][name], dropout=float(member.config.lora_dropout))

            def forward_losses(active: Sequence[Member]) -> tuple[list[torch.Tensor], list[bool]]:
                draws = [m.data.draw() for m in active]
                routing.set_blocks([m.slot for m in active], [len(d[0]) for d in draws])
                noisy, timesteps, states, _ = (torch.cat(part) for part in zip(*draws))
                prediction = self.pipe.unet(noisy, timesteps, states).sample.float()
                losses, row = [], 0
                for noisy_m, _, _, target in draws:
                    losses.append(F.mse_loss(prediction[row:row + len(noisy_m)], target.float()))
                    row += len(noisy_m)
                return losses, [False] * len(active)

            self.pipe.unet.train()
            seconds, self.member_bytes = train_members(self.pipe.unet, members, layers, forward_losses, autocast)
            self.pipe.unet.eval()
            trained = {m.key: member_factors(m, layers) for m in members if m.failure is None}
        for member in members:
            if member.failure is not None:
                outcomes[member.key] = member.failure
                continue
            self.pipe.unet = save_adapter(self.pipe.unet, member.config, trained[member.key], member.out_dir / "adapter")
            outcomes[member.key] = {**self._metrics(member.losses, member.steps, seconds / len(members), member.data.num_images),
                                    "cohort": {"size": len(tasks), "slot": member.slot, "seconds": round(seconds, 3)}}
        return outcomes

    def _metrics(self, losses: list[float], steps: int, seconds: float, num_images: int) -> dict[str, Any]:
        return {
            "final_loss": losses[-1], "mean_loss": float(np.mean(losses)), "optimizer_steps": steps,
            "micro_steps": len(losses), "train_seconds": round(seconds, 3), "steps_per_second": round(len(losses) / seconds, 3),
            "num_images": num_images, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if self.device.type == "cuda" else None,
            "versions": runtime.versions("torch", "diffusers", "peft", "accelerate"),
            **({"data": self.data_provenance} if getattr(self, "data_provenance", None) else {}),
        }


class DiffusionStream:
    """One job's training draws, in the order a job alone makes them (its seeded generator).

    Each `draw()` returns the UNet's inputs and regression target for one micro-step:
    noisy latents (B, C, h, w), timesteps (B,), prompt states (B, S, E), target (B, C, h, w).
    """

    def __init__(self, trainer: DiffusionTrainer, mean: torch.Tensor, std: torch.Tensor, prompt_states: torch.Tensor,
                 batch: int, generator: torch.Generator):
        self.trainer, self.mean, self.std, self.prompt_states = trainer, mean, std, prompt_states
        self.batch, self.generator = batch, generator
        self.scaling = getattr(trainer.pipe.vae.config, "scaling_factor", 1.0)
        self.num_images = len(mean)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        device, scheduler, batch = self.trainer.device, self.trainer.noise_scheduler, self.batch
        index = torch.randint(self.num_images, (batch,), generator=self.generator)
        eps = torch.randn(self.mean[index].shape, generator=self.generator).to(device)
        latents = (self.mean[index] + self.std[index] * eps) * self.scaling  # (B, C, h, w)
        noise = torch.randn(latents.shape, generator=self.generator).to(device)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (batch,), generator=self.generator).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        return noisy, timesteps, self.prompt_states.expand(batch, -1, -1), self.trainer._target(latents, noise, timesteps)

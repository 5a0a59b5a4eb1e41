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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.bases import BaseModelError
from pipeline.bases.loading import load_diffusion_pipeline
from pipeline.cohort.peft_io import save_naming_base
from pipeline.data.base import DataSourceError
from pipeline.finetune.base import LoraTrainer
from pipeline.finetune.cohort import CohortTask, Member
from pipeline.finetune.runner import NonFiniteLoss
from pipeline.finetune.targets import check_target_modules
from pipeline.manifest import Manifest
from storage import Store


def images_tensor(examples, resolution: int) -> torch.Tensor:
    """(N, 3, resolution, resolution) float32 in [-1, 1]."""
    from PIL import Image

    arrays = [np.asarray(e.load_image().resize((resolution, resolution), Image.BICUBIC), dtype=np.float32) for e in examples]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


class DiffusionTrainer(LoraTrainer):
    """Trains one LoRA per job (or a cohort of them) on the UNet of a pipeline loaded once."""

    versions_of = ("torch", "diffusers", "peft", "accelerate")

    def setup(self, manifest: Manifest, store: Store) -> None:
        self.examples = self.load_examples(manifest)  # bad or missing data fails before the base loads
        self.base = (manifest.base.ref, manifest.base.revision)
        self.use_pipeline(load_diffusion_pipeline(manifest.base.model_dump(), store), manifest.lora.target_modules)

    @property
    def trained_model(self) -> torch.nn.Module:
        return self.pipe.unet

    @trained_model.setter
    def trained_model(self, model: torch.nn.Module) -> None:
        self.pipe.unet = model

    def lora_init(self) -> dict[str, Any]:
        return {"init_lora_weights": "gaussian"}

    def precision(self, hp: dict[str, Any]) -> str:
        return str(hp.get("mixed_precision", "no")) if self.device.type == "cuda" else "no"

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
            accelerator = Accelerator(gradient_accumulation_steps=accumulation, mixed_precision=self.precision(hp),
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
            save_naming_base(accelerator.unwrap_model(model), out_dir / "adapter", self.base)
        finally:
            self.pipe.unet = peft_unet.unload()  # the frozen base UNet again, without LoRA layers
        return self._metrics(losses, steps, seconds, len(examples))

    def new_member(self, task: CohortTask, slot: int) -> Member:
        hp = task.hyperparameters
        return Member(task.key, slot, task.config, self.stream(task.examples, hp, task.seed), int(hp.get("gradient_accumulation", 1)),
                      int(hp["steps"]), float(hp["learning_rate"]), float(hp.get("weight_decay", 1e-2)), task.out_dir)

    def cohort_losses(self, active: Sequence[Member], routing) -> tuple[list[torch.Tensor], list[bool]]:
        """One UNet pass over every active member's draw; each member's loss on its own rows."""
        draws = [m.data.draw() for m in active]
        routing.set_blocks([m.slot for m in active], [len(d[0]) for d in draws])
        noisy, timesteps, states, _ = (torch.cat(part) for part in zip(*draws))
        prediction = self.pipe.unet(noisy, timesteps, states).sample.float()
        losses, row = [], 0
        for noisy_m, _, _, target in draws:
            losses.append(F.mse_loss(prediction[row:row + len(noisy_m)], target.float()))
            row += len(noisy_m)
        return losses, [False] * len(active)

    def member_metrics(self, member: Member, seconds: float) -> dict[str, Any]:
        return self._metrics(member.losses, member.steps, seconds, member.data.num_images)

    def _metrics(self, losses: list[float], steps: int, seconds: float, num_images: int) -> dict[str, Any]:
        return {**self.common_metrics(losses, steps, seconds), "num_images": num_images}


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

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.bases.loading import load_diffusion_pipeline
from pipeline.data import get_source
from pipeline.data.subsets import job_examples
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
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def setup(self, manifest: Manifest, store: Store) -> None:
        self.use_pipeline(load_diffusion_pipeline(manifest.base.model_dump(), store), manifest.lora.target_modules)
        source = get_source(manifest.data.source)
        self.examples = source.examples(manifest.data.split)
        if not self.examples:
            raise ValueError(f"data split {manifest.data.split!r} of {manifest.data.source!r} is empty")

    def use_pipeline(self, pipe, target_modules: list[str] | tuple[str, ...]) -> None:
        """Train on an already loaded `StableDiffusionPipeline` (frozen here, moved to the device)."""
        from diffusers import DDPMScheduler

        self.pipe = pipe
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
        dist = self.pipe.vae.encode(pixels.to(self.device)).latent_dist
        return dist.mean, dist.std

    def _target(self, latents, noise, timesteps) -> torch.Tensor:
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if kind == "sample":
            return latents
        raise ValueError(f"unsupported prediction_type {kind!r}")

    def run(self, job: Job, out_dir: Path) -> dict[str, Any]:
        from peft import LoraConfig

        spec = job.spec
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.lora_dropout,
                            target_modules=list(spec.target_modules), init_lora_weights="gaussian")
        examples = job_examples(self.examples, spec.data, spec.seed)
        return self.train(examples, config, spec.hyperparameters, spec.seed, out_dir)

    def train(self, examples, config, hp: dict[str, Any], seed: int, out_dir: Path) -> dict[str, Any]:
        """Train one LoRA (`config`, a peft `LoraConfig`) on `examples`; save it to `out_dir/adapter`."""
        from accelerate import Accelerator
        from peft import get_peft_model

        if not examples:
            raise ValueError("a LoRA needs at least one training image; the job's data group is empty")
        steps, accumulation = int(hp["steps"]), int(hp.get("gradient_accumulation", 1))
        batch = int(hp.get("batch_size", 1))
        resolution = int(hp.get("resolution", self.native_resolution))
        mean, std = self._latent_moments(images_tensor(examples, resolution))
        prompt_states = self._encode_prompt(str(hp.get("instance_prompt", "")))
        scaling = getattr(self.pipe.vae.config, "scaling_factor", 1.0)

        torch.manual_seed(seed)  # LoRA init
        generator = torch.Generator(device="cpu").manual_seed(seed)  # data order and noise
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
                    index = torch.randint(len(examples), (batch,), generator=generator)
                    eps = torch.randn(mean[index].shape, generator=generator).to(self.device)
                    latents = (mean[index] + std[index] * eps) * scaling  # (B, C, h, w)
                    noise = torch.randn(latents.shape, generator=generator).to(self.device)
                    timesteps = torch.randint(self.noise_scheduler.config.num_train_timesteps, (batch,), generator=generator).to(self.device)
                    noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
                    prediction = model(noisy, timesteps, prompt_states.expand(batch, -1, -1)).sample
                    loss = F.mse_loss(prediction.float(), self._target(latents, noise, timesteps).float())
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
        return {
            "final_loss": losses[-1], "mean_loss": float(np.mean(losses)), "optimizer_steps": steps,
            "micro_steps": len(losses), "train_seconds": round(seconds, 3), "steps_per_second": round(len(losses) / seconds, 3),
            "num_images": len(examples), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if self.device.type == "cuda" else None,
            "versions": _versions(),
        }


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "diffusers", "peft", "accelerate")}

"""`clip_score`: how well a LoRA-adapted diffusion model still follows prompts.

For a fixed prompt list, seed, number of steps and guidance, generate images with the
LoRA loaded on the base UNet and score each against its prompt with an open_clip model:
100·max(cos(image, text), 0), as torchmetrics' CLIPScore defines it; a LoRA's score is the
mean over its images. The base pipeline, the CLIP model and the prompt embeddings are set
up once per population; adapters are loaded into the shared UNet and removed again.
Image i gets its own generator seeded with `seed + i`, so an image does not depend on
which other images share its batch. `score_cohort` generates the images of K adapters in one
denoising loop: the prompts' embeddings computed once, each batch repeated K times, copy k
routed to adapter k in the UNet's LoRA layers (`pipeline.cohort.layers`), so adapter k's images
are the ones it would get alone. On a CPU a denoising loop takes as many adapters as fit in
`CPU_ROWS_PER_CALL` UNet rows (on a GPU, all K).

Shapes: P prompts, I images (P × images_per_prompt), D CLIP embedding width.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.bases.loading import load_diffusion_pipeline
from pipeline.jobs import Job
from pipeline.manifest import Manifest
from pipeline.score.prompts import resolve_prompts
from storage import Store

ADAPTER_NAME = "lol_scored_adapter"
# UNet rows per pipeline call for cohorts on a CPU: the tiny UNet costs 3.7 / 3.2 / 3.4 / 3.8 / 4.3 ms
# per row at 16 / 32 / 64 / 128 / 256 rows (2 cores), so larger batches only lose there.
CPU_ROWS_PER_CALL = 32
PEFT_PREFIX = "base_model.model"  # how peft's save_pretrained prefixes the UNet's module names


def load_clip(model: str, pretrained: str | None, store: Store, size: str = "full", device: torch.device | None = None):
    """(model, preprocess, tokenizer) from open_clip, or from the tiny cache for `tiny:shapes-clip`."""
    if model.startswith("tiny:"):
        from pipeline.bases import tiny_module
        from pipeline.bases.cache import ensure_base

        built = ensure_base(model, store, size=size)
        return tiny_module(model).load(built.path, device=device or "cpu")
    import open_clip

    clip_model, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
    return clip_model.eval(), preprocess, open_clip.get_tokenizer(model)


class ClipScoreScorer:
    def __init__(self, spec: Any, device: str | torch.device | None = None):
        self.spec = spec
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def setup(self, manifest: Manifest, store: Store) -> None:
        spec = self.spec
        self.prompts = resolve_prompts(spec.prompts)
        self.pipe = load_diffusion_pipeline(manifest.base.model_dump(), store).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.clip, self.preprocess, self.tokenizer = load_clip(spec.model, spec.pretrained, store, spec.size, self.device)
        with torch.no_grad():
            text = self.clip.encode_text(self.tokenizer(self.prompts).to(self.device)).float()
        self.text_features = text / text.norm(dim=-1, keepdim=True)  # (P, D)

    def generate(self, adapter_dir: Path | None = None) -> np.ndarray:
        """(I, H, W, 3) float images in [0, 1]: every prompt × images_per_prompt, in order."""
        spec = self.spec
        prompts = [p for p in self.prompts for _ in range(spec.images_per_prompt)]
        unet = self.pipe.unet
        if adapter_dir is not None:
            unet.load_lora_adapter(str(adapter_dir), weight_name="adapter_model.safetensors",
                                   adapter_name=ADAPTER_NAME, prefix=PEFT_PREFIX)
        try:
            batches = []
            for start in range(0, len(prompts), spec.batch_size):
                chunk = prompts[start:start + spec.batch_size]
                generators = [torch.Generator(device="cpu").manual_seed(spec.seed + start + i) for i in range(len(chunk))]
                out = self.pipe(chunk, num_inference_steps=spec.steps, guidance_scale=spec.guidance_scale,
                                generator=generators, output_type="np")
                batches.append(out.images)
        finally:
            if adapter_dir is not None:
                unet.unload_lora()  # removes the LoRA layers too: the next LoRA meets the plain base
        return np.concatenate(batches)

    @torch.no_grad()
    def generate_cohort(self, adapter_dirs) -> np.ndarray:
        """(K, I, H, W, 3) the images `generate` makes with each of K adapters, in one denoising loop."""
        from pipeline.cohort.layers import cohort_layers
        from pipeline.cohort.peft_io import read_factors

        spec, K = self.spec, len(adapter_dirs)
        loaded = [read_factors(d, self.device) for d in adapter_dirs]
        targets = {tuple(sorted(config["target_modules"])) for _, config in loaded}
        if len(targets) != 1:
            raise ValueError(f"adapters scored together must target the same modules; these target {sorted(targets)}")
        prompts = [p for p in self.prompts for _ in range(spec.images_per_prompt)]
        guided = spec.guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None  # the pipeline's CFG rule
        batches = []
        with cohort_layers(self.pipe.unet, list(next(iter(targets)))) as (routing, layers):
            for slot, (factors, _) in enumerate(loaded):
                for name, layer in layers.items():
                    layer.add_slot(slot, factors[name], trainable=False)
            for start in range(0, len(prompts), spec.batch_size):
                chunk = prompts[start:start + spec.batch_size]
                positive, negative = self.pipe.encode_prompt(chunk, self.device, 1, guided)  # (B, S, E) each
                per_call = K if self.device.type == "cuda" else max(1, CPU_ROWS_PER_CALL // (len(chunk) * (1 + guided)))
                images = []
                for first in range(0, K, per_call):  # adapters first … first + n − 1 in one denoising loop
                    n = min(per_call, K - first)
                    copies = [first + s for s in range(n) for _ in chunk]  # rows copy-major: adapter k's chunk is block k
                    routing.set(copies + copies if guided else copies)  # CFG runs [unconditional; conditional]
                    generators = [torch.Generator(device="cpu").manual_seed(spec.seed + start + i) for _ in range(n) for i in range(len(chunk))]
                    out = self.pipe(prompt_embeds=positive.repeat(n, 1, 1),
                                    negative_prompt_embeds=negative.repeat(n, 1, 1) if guided else None,
                                    num_inference_steps=spec.steps, guidance_scale=spec.guidance_scale,
                                    generator=generators, output_type="np")
                    images.append(out.images.reshape(n, len(chunk), *out.images.shape[1:]))
                batches.append(np.concatenate(images))
        return np.concatenate(batches, axis=1)

    def score_cohort(self, jobs, adapter_dirs) -> list[dict[str, float]]:
        """`score` of each adapter, their images generated in one denoising loop."""
        images = self.generate_cohort(adapter_dirs)  # (K, I, H, W, 3)
        scores = self.clip_scores(images.reshape(-1, *images.shape[2:])).reshape(len(adapter_dirs), -1)
        return [{"clip_score": float(row.mean())} for row in scores]

    @torch.no_grad()
    def clip_scores(self, images: np.ndarray) -> np.ndarray:
        """(n·I,) 100·max(cos, 0) of each image against its prompt; `images` holds n adapters' I images each,
        in `generate` order."""
        pixels = torch.stack([self.preprocess(Image.fromarray((im * 255).round().astype(np.uint8))) for im in images])
        features = self.clip.encode_image(pixels.to(self.device)).float()
        features = features / features.norm(dim=-1, keepdim=True)  # (I, D)
        per_adapter = len(self.text_features) * self.spec.images_per_prompt  # I
        prompt_index = torch.arange(len(images), device=self.device) % per_adapter // self.spec.images_per_prompt
        cosine = (features * self.text_features[prompt_index]).sum(dim=-1)
        return (100 * cosine.clamp(min=0)).cpu().numpy()

    def score(self, job: Job, adapter_dir: Path) -> dict[str, float]:
        scores = self.clip_scores(self.generate(adapter_dir))
        return {"clip_score": float(scores.mean())}

    def provenance(self) -> dict[str, str]:
        return {p: importlib.metadata.version(p) for p in ("torch", "diffusers", "open_clip_torch", "peft")}

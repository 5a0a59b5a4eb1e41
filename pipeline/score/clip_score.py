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

import contextlib
import difflib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline import runtime
from pipeline.artefacts import HubFiles, hub_cache_dir, unavailable
from pipeline.bases.loading import load_diffusion_pipeline
from pipeline.jobs import Job
from pipeline.manifest import Manifest
from pipeline.score import ScorerError
from pipeline.score.prompts import resolve_prompts
from storage import Store

ADAPTER_NAME = "lol_scored_adapter"
# UNet rows per pipeline call for cohorts on a CPU, where larger batches only lose (the per-row
# costs measured on the tiny UNet: docs/performance.md, "Cohorts").
CPU_ROWS_PER_CALL = 32


def load_clip(model: str, pretrained: str | None, store: Store, size: str = "full", device: torch.device | None = None):
    """(model, preprocess, tokenizer) from open_clip, or from the tiny cache for `tiny:shapes-clip`.

    Anything open_clip loads: a model name with a `pretrained` tag (`ViT-B-16` / `openai`; the weights
    come from the hub cache, downloaded when the hub is reachable), a model name with a local
    `.safetensors` checkpoint as `pretrained`, `hf-hub:<repo>` or `local-dir:<folder>` (open_clip's
    layout: open_clip_config.json + weights). Offline, weights that are not cached raise
    ArtefactUnavailableError with the `hf download` command.
    """
    if model.startswith("tiny:"):  # a built folder in open_clip's local-dir layout, loaded like a user's own
        from pipeline.bases.cache import ensure_base

        built = ensure_base(model, store, size=size)
        return load_clip(f"local-dir:{built.path}", None, store, device=device)
    import open_clip

    from pipeline.artefacts import hub_offline, hub_reachable

    ref = clip_ref(model, pretrained)
    offline = ref.kind in ("tag", "hf-hub") and not hub_reachable()
    if offline and ref.checkpoint() is None:
        where = f" ({ref.files.describe()})" if ref.files else f" ({ref.url})"
        raise unavailable(f"CLIP weights {ref.describe()}{where}", ref.files)
    try:
        with hub_offline() if offline else contextlib.nullcontext():
            clip_model, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=ref.pretrained, device=device, cache_dir=hub_cache_dir(), force_quick_gelu=ref.quick_gelu)
            tokenizer = open_clip.get_tokenizer(model, cache_dir=hub_cache_dir())
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ScorerError(f"CLIP model {ref.describe()} cannot be loaded by open_clip: {first}") from None
    return clip_model.eval(), preprocess, tokenizer


@dataclass(frozen=True)
class ClipRef:
    """What a clip_score spec's (model, pretrained) names, checked before anything is built.

    kind: `tag` (open_clip pretrained tag), `file` (local checkpoint), `hf-hub`, `local-dir` or `random`
    (a model name without weights: random initialisation, for tests). `files` are the hub files the
    weights come from (None for local ones)."""

    model: str
    pretrained: str | None
    kind: str
    files: HubFiles | None = None
    quick_gelu: bool = False
    url: str = ""  # a tag whose weights come from a URL, not the hub

    def describe(self) -> str:
        return self.model + (f" / {self.pretrained}" if self.pretrained else "")

    def checkpoint(self) -> str | None:
        """The local weights file, where known without loading (a file, or cached hub weights)."""
        if self.kind == "file":
            return self.pretrained
        if self.url:
            path = Path(hub_cache_dir()) / os.path.basename(self.url)
            return str(path) if path.is_file() else None
        return self.files.cached() if self.files is not None else None


def clip_ref(model: str, pretrained: str | None) -> ClipRef:
    """Resolve and check a clip_score (model, pretrained); ValueError naming what would be valid."""
    import open_clip
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import _get_safe_alternatives

    if model.startswith("hf-hub:"):
        repo = model.removeprefix("hf-hub:")
        if pretrained:
            raise ScorerError(f"clip_score: model {model!r} carries its weights; leave pretrained unset (got {pretrained!r})")
        return ClipRef(model, None, "hf-hub", HubFiles(repo, files=((HF_CONFIG_NAME,), (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME))))
    if model.startswith("local-dir:"):
        folder = Path(model.removeprefix("local-dir:")).expanduser()
        if not (folder / HF_CONFIG_NAME).is_file():
            there = sorted(p.name for p in folder.iterdir())[:20] if folder.is_dir() else []
            raise ScorerError(f"clip_score: {model!r} needs a folder with {HF_CONFIG_NAME} and weights (open_clip's hub layout); "
                             f"{folder} holds: {', '.join(there) or 'nothing (it does not exist)'}")
        if pretrained:
            raise ScorerError(f"clip_score: model {model!r} carries its weights; leave pretrained unset (got {pretrained!r})")
        return ClipRef(model, None, "local-dir")
    name = model.replace("/", "-")
    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        raise ScorerError(f"clip_score: {model!r} is not an open_clip model name"
                         + (f" (did you mean {', '.join(close)}?)" if close else "")
                         + "; valid: an open_clip name (open_clip.list_models()), hf-hub:<repo>, local-dir:<folder> or tiny:shapes-clip")
    if not pretrained:
        return ClipRef(model, None, "random")
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if cfg:
        quick = bool(cfg.get("quick_gelu")) and not bool((open_clip.get_model_config(name) or {}).get("quick_gelu"))
        hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
        if hub:  # as open_clip's download_pretrained: 'org/repo/' (default weights name) or 'org/repo/file'
            repo, filename = os.path.split(hub)
            filename = filename or HF_WEIGHTS_NAME
            return ClipRef(model, pretrained, "tag", HubFiles(repo, files=((*_get_safe_alternatives(filename), filename),)), quick)
        return ClipRef(model, pretrained, "tag", None, quick, url=url)
    path = Path(pretrained).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ScorerError(f"clip_score: checkpoint {pretrained!r} is not a .safetensors file; pickle checkpoints "
                             "(.pt/.bin/.pth) are refused — save the state dict with safetensors.torch.save_file")
        return ClipRef(model, str(path), "file")
    tags = open_clip.list_pretrained_tags_by_model(name)
    looks_like_path = any(c in pretrained for c in "/\\") or pretrained.endswith((".safetensors", ".pt", ".bin", ".pth"))
    if looks_like_path:
        there = sorted(p.name for p in path.parent.iterdir())[:20] if path.parent.is_dir() else []
        raise ScorerError(f"clip_score: checkpoint file {pretrained!r} does not exist; {path.parent} holds: {', '.join(there) or 'nothing'}")
    raise ScorerError(f"clip_score: pretrained {pretrained!r} is neither a tag of {model} ({', '.join(tags) or 'none'}) "
                     "nor an existing .safetensors file")


class ClipScoreScorer:
    def __init__(self, spec: Any, device: str | torch.device | None = None):
        self.spec = spec
        self.device = runtime.compute_device(device)

    def setup(self, manifest: Manifest, store: Store) -> None:
        spec = self.spec
        self.prompts = resolve_prompts(spec.prompts)
        self.pipe = load_diffusion_pipeline(manifest.base.model_dump(), store).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.clip, self.preprocess, self.tokenizer = load_clip(spec.model, spec.pretrained, store, spec.size, self.device)
        self.clip_provenance = clip_provenance(spec.model, spec.pretrained)
        with torch.no_grad():
            text = self.clip.encode_text(self.tokenizer(self.prompts).to(self.device)).float()
        self.text_features = text / text.norm(dim=-1, keepdim=True)  # (P, D)

    def generate(self, adapter_dir: Path | None = None) -> np.ndarray:
        """(I, H, W, 3) float images in [0, 1]: every prompt × images_per_prompt, in order."""
        spec = self.spec
        prompts = [p for p in self.prompts for _ in range(spec.images_per_prompt)]
        with self.adapter_loaded(adapter_dir) if adapter_dir is not None else contextlib.nullcontext():
            batches = []
            for start in range(0, len(prompts), spec.batch_size):
                chunk = prompts[start:start + spec.batch_size]
                generators = [torch.Generator(device="cpu").manual_seed(spec.seed + start + i) for i in range(len(chunk))]
                out = self.pipe(chunk, num_inference_steps=spec.steps, guidance_scale=spec.guidance_scale,
                                height=spec.resolution, width=spec.resolution, generator=generators, output_type="np")
                batches.append(out.images)
        return np.concatenate(batches)

    @contextlib.contextmanager
    def adapter_loaded(self, adapter_dir: Path):
        """The stored peft adapter in the pipeline's UNet, ΔW = (alpha/r)·B·A as peft applies it; removed on exit.

        diffusers' `load_lora_adapter` reads no adapter_config.json: given peft's folder it would build the
        layers with lora_alpha = r, i.e. strength 1 instead of alpha/r. The state dict of
        `pipeline.lora_export` carries alpha/r in B, as the cohort route applies it (both read the adapter with
        `read_factors`, which refuses rsLoRA, DoRA and per-module rank/alpha patterns rather than mis-scale them)."""
        from pipeline.lora_export import diffusers_lora_state_dict

        unet = self.pipe.unet
        state = {k: v.to(self.device) for k, v in diffusers_lora_state_dict(adapter_dir).items()}
        unet.load_lora_adapter(state, adapter_name=ADAPTER_NAME, prefix="unet")
        try:
            yield unet
        finally:
            unet.unload_lora()  # removes the LoRA layers too: the next LoRA meets the plain base

    @torch.no_grad()
    def generate_cohort(self, adapter_dirs) -> np.ndarray:
        """(K, I, H, W, 3) the images `generate` makes with each of K adapters, in one denoising loop."""
        from pipeline.cohort.peft_io import stored_adapters_on

        spec, K = self.spec, len(adapter_dirs)
        prompts = [p for p in self.prompts for _ in range(spec.images_per_prompt)]
        guided = spec.guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None  # the pipeline's CFG rule
        batches = []
        with stored_adapters_on(self.pipe.unet, adapter_dirs, self.device) as routing:
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
                                    height=spec.resolution, width=spec.resolution, generator=generators, output_type="np")
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

    def score(self, job: Job | None, adapter_dir: Path | None) -> dict[str, float]:
        """The mean CLIP score of the adapter's images (None: the base's own)."""
        scores = self.clip_scores(self.generate(adapter_dir))
        return {"clip_score": float(scores.mean())}

    def provenance(self) -> dict[str, Any]:
        """Library versions and which CLIP weights scored (model, pretrained, checkpoint file and its sha256)."""
        versions = runtime.versions("torch", "diffusers", "open_clip_torch", "peft")
        return {"versions": versions, "clip": getattr(self, "clip_provenance", None)}


def clip_provenance(model: str, pretrained: str | None) -> dict[str, Any]:
    """{model, pretrained, checkpoint, sha256}: the weights file a CLIP model was loaded from, where there is one."""
    out: dict[str, Any] = {"model": model, "pretrained": pretrained}
    if model.startswith("tiny:"):
        return out
    ref = clip_ref(model, pretrained)
    path = ref.checkpoint()
    if ref.kind == "local-dir":
        from open_clip.factory import _find_checkpoint_in_dir

        path = _find_checkpoint_in_dir(Path(model.removeprefix("local-dir:")).expanduser())
    if path:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        out.update(checkpoint=os.path.basename(path), sha256=digest.hexdigest())
    return out

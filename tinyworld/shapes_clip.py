"""`tiny:shapes-clip`: a small open_clip CLIP trained from scratch on the shapes images.

The tiny world's CLIP-score model. It is an ordinary open_clip `CLIP` built from a registered
custom model config, so everything downstream (the `clip_score` scorer) uses it exactly like a
real open_clip model: `open_clip.add_model_config(<config json>)`, then
`open_clip.create_model_and_transforms(name, pretrained=<safetensors>)` and
`open_clip.get_tokenizer(name)` (the standard CLIP BPE, vocabulary 49408, context shortened).

Shape legend: B batch, D joint embedding dim, T texts, C=3 channels, S=32 image side.

A built folder holds

    tiny-shapes-clip.json            # open_clip model config; its stem is the model name
                                     # (the smoke size registers "tiny-shapes-clip-smoke")
    open_clip_config.json            # the same config in open_clip's hub/local-dir layout
    open_clip_model.safetensors      # the weights (fp32)

so `create_model_and_transforms("local-dir:<folder>")` works too.

The "full" model: ViT on 32 px (patch 4, width 64, 4 layers, 4 heads), text transformer
(width 32, 2 layers, 2 heads, context 16), joint dim 64: 1.82 M parameters, 1.58 M of them the
49408 × 32 token embedding that the standard tokenizer's ids require; 7.3 MB of fp32.
Measured: 100 % zero-shot top-1 over the 24 captions on the 469 holdout images after 600 steps
(about 3 min of one contended CPU core).

Training (`train`): 64 px easy-vqa images are resized to 32 px by the model's own validation
transform, then augmented on the fly (flip, integer shift, blur, pixel noise, the last two so
the model stays calibrated on the blurry/noisy images a tiny diffusion model generates).
Captions come from a closed set (8 colours × 3 shapes), so a batch holds every caption many
times; the standard CLIP loss would push an image away from other images' identical captions.
The loss is therefore the multi-positive form of the CLIP loss (UniCL): image→text
cross-entropy over the distinct captions, and text→image cross-entropy with a target spread
evenly over the batch images that carry that caption. Partial captions ("a red shape",
"a circle") are trained the same way, each family in its own softmax, so the text tower
also gives a meaning to "shape" and to colour-only / shape-only prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.data.base import ImageExample
from pipeline.data.shapes import COLORS, SHAPES, ShapesSource, find_data_dir
from pipeline.data.shapes import data_fingerprint as shapes_data_fingerprint

NAME = "shapes-clip"
KIND = "clip"
SIZES = ("smoke", "full")

WEIGHTS_FILE = "open_clip_model.safetensors"
HUB_CONFIG_FILE = "open_clip_config.json"
CAPTIONS: tuple[str, ...] = tuple(f"a {c} {s}" for c in COLORS for s in SHAPES)  # the 24 classes
COLOR_CAPTIONS: tuple[str, ...] = tuple(f"a {c} shape" for c in COLORS)
SHAPE_CAPTIONS: tuple[str, ...] = tuple(f"a {s}" for s in SHAPES)
_MODEL_KEYS = ("embed_dim", "vision_cfg", "text_cfg")

Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class DataSettings:
    holdout_fraction: float = 0.1  # ShapesSource split: share of images held out (by id hash)
    max_train: int | None = None  # use only the first N train images (None: all)
    max_eval: int | None = None  # evaluate on the first N holdout images (None: all)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 600  # optimiser steps
    batch_size: int = 128  # images per step; every distinct caption is encoded each step
    lr: float = 2e-3  # AdamW peak learning rate
    min_lr_ratio: float = 0.05  # cosine decays to lr × this
    warmup_steps: int = 30  # linear warm-up
    weight_decay: float = 0.05  # on matrices only (not norms, biases, embeddings, logit scale)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global grad norm (0: off)
    partial_weight: float = 0.5  # weight of the colour-only and shape-only caption losses


@dataclass(frozen=True)
class AugmentSettings:
    hflip_p: float = 0.5  # horizontal flip (captions carry no position)
    max_shift_px: int = 2  # integer translation in [-n, n] px at 32 px, border replicated
    blur_p: float = 0.4  # share of images blurred
    blur_sigma: float = 1.2  # gaussian σ (px at 32 px) of full blur; strength drawn in [0, 1]
    noise_p: float = 0.4  # share of images with added gaussian pixel noise
    noise_std: float = 0.08  # max noise std, in [0, 1] pixel units; std drawn in [0, max]


@dataclass(frozen=True)
class ClipRecipe:
    """Everything that determines a `tiny:shapes-clip` build (the JSON of `recipe_config`)."""

    model_name: str  # open_clip model name the config is registered under
    model: dict[str, Any]  # an open_clip model config: embed_dim, vision_cfg, text_cfg
    seed: int = 0
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["train"]["betas"] = list(self.train.betas)
        return out

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ClipRecipe:
        """Validate a `recipe_config` dict; ValueError names the bad key or value."""
        if not isinstance(config, dict):
            raise ValueError(f"shapes-clip config must be a dict, got {type(config).__name__}")
        _check_keys("config", config, {f.name for f in fields(cls)}, required={"model_name", "model"})
        model = config["model"]
        if not isinstance(model, dict) or any(k not in model for k in _MODEL_KEYS):
            raise ValueError(f"config.model must be an open_clip model config with {list(_MODEL_KEYS)}, got {model!r}")
        text = model["text_cfg"]
        if text.get("vocab_size", 49408) != 49408 or "hf_tokenizer_name" in text:
            raise ValueError("config.model.text_cfg must use open_clip's CLIP BPE tokenizer (vocab_size 49408)")
        sections = {}
        for name, kind in (("data", DataSettings), ("train", TrainSettings), ("augment", AugmentSettings)):
            raw = config.get(name, {})
            _check_keys(f"config.{name}", raw, {f.name for f in fields(kind)})
            sections[name] = kind(**{k: tuple(v) if k == "betas" else v for k, v in raw.items()})
        recipe = cls(model_name=str(config["model_name"]), model=model, seed=int(config.get("seed", 0)), **sections)
        recipe.check()
        return recipe

    def check(self) -> None:
        problems = []
        if not 0.0 < self.data.holdout_fraction < 1.0:
            problems.append(f"data.holdout_fraction must be in (0, 1), got {self.data.holdout_fraction}")
        for key in ("max_train", "max_eval"):
            value = getattr(self.data, key)
            if value is not None and value < 1:
                problems.append(f"data.{key} must be ≥ 1 or null, got {value}")
        if self.train.steps < 1 or self.train.batch_size < 2:
            problems.append(f"train.steps ≥ 1 and train.batch_size ≥ 2 required, got {self.train.steps}, {self.train.batch_size}")
        for key in ("hflip_p", "blur_p", "noise_p"):
            if not 0.0 <= getattr(self.augment, key) <= 1.0:
                problems.append(f"augment.{key} must be in [0, 1], got {getattr(self.augment, key)}")
        if self.model["vision_cfg"].get("image_size") != 32:
            problems.append(f"model.vision_cfg.image_size must be 32, got {self.model['vision_cfg'].get('image_size')}")
        if problems:
            raise ValueError("invalid shapes-clip config: " + "; ".join(problems))


def _check_keys(where: str, raw: Any, allowed: set[str], required: set[str] = frozenset()) -> None:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping, got {raw!r}")
    unknown = sorted(set(raw) - allowed)
    missing = sorted(required - set(raw))
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {unknown}, missing keys {missing}; valid keys: {sorted(allowed)}")


def _model_config(vision: tuple[int, int, int, int], text: tuple[int, int, int], embed_dim: int) -> dict[str, Any]:
    """open_clip config: vision (patch, width, layers, head_width), text (width, heads, layers)."""
    patch, v_width, v_layers, head_width = vision
    t_width, t_heads, t_layers = text
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "patch_size": patch, "width": v_width, "layers": v_layers,
                       "head_width": head_width, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": t_width, "heads": t_heads,
                     "layers": t_layers, "mlp_ratio": 4.0},
    }


def recipe_config(size: str) -> dict[str, Any]:
    """The JSON recipe of `size`: "smoke" trains for a few seconds (tests), "full" is the real model."""
    if size == "full":
        recipe = ClipRecipe(model_name="tiny-shapes-clip", model=_model_config((4, 64, 4, 16), (32, 2, 2), 64))
    elif size == "smoke":
        recipe = ClipRecipe(
            model_name="tiny-shapes-clip-smoke",
            model=_model_config((8, 32, 1, 16), (16, 1, 1), 32),
            data=DataSettings(max_train=64, max_eval=24),
            train=TrainSettings(steps=4, batch_size=16, warmup_steps=1),
        )
    else:
        raise ValueError(f"tiny:{NAME} has sizes {', '.join(SIZES)}, not {size!r}")
    return recipe.to_dict()


def data_fingerprint() -> str:
    """The easy-vqa data the model trains on: ShapesSource's table fingerprint."""
    return f"shapes-{shapes_data_fingerprint(find_data_dir())}"


# ----------------------------------------------------------------------------- open_clip plumbing


def write_model_config(recipe: ClipRecipe, out_dir: Path) -> Path:
    """Write `{model_name}.json` (registrable) and `open_clip_config.json`; return the former."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config_file = out_dir / f"{recipe.model_name}.json"
    config_file.write_text(json.dumps(recipe.model, indent=2, sort_keys=True) + "\n")
    hub = {"model_cfg": recipe.model, "preprocess_cfg": {}}
    (out_dir / HUB_CONFIG_FILE).write_text(json.dumps(hub, indent=2, sort_keys=True) + "\n")
    return config_file


def find_model_config(path: Path) -> Path:
    """The one open_clip model config JSON in a built folder (ValueError listing the folder if not one)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a built tiny:{NAME} folder (no such directory)")
    found = []
    for candidate in sorted(path.glob("*.json")):
        try:
            content = json.loads(candidate.read_text())
        except ValueError:
            continue
        if isinstance(content, dict) and all(k in content for k in _MODEL_KEYS):
            found.append(candidate)
    if len(found) != 1:
        present = sorted(p.name for p in path.iterdir())
        raise ValueError(f"{path} should hold exactly one open_clip model config JSON, found {[p.name for p in found]} "
                         f"(folder holds {present})")
    return found[0]


def _create(config_file: Path, device: str | torch.device = "cpu", pretrained: Path | None = None):
    """Register `config_file` with open_clip and create (model, preprocess_val, tokenizer) by name."""
    import open_clip

    open_clip.add_model_config(config_file)  # the latest registration of a name wins
    name = config_file.stem
    quiet = pretrained is None and logging.root.manager.disable < logging.WARNING
    if quiet:  # open_clip warns "initialized randomly": exactly what training from scratch wants
        logging.disable(logging.WARNING)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=str(pretrained) if pretrained is not None else None, device=device
        )
    finally:
        if quiet:
            logging.disable(logging.NOTSET)
    return model, preprocess, open_clip.get_tokenizer(name)


def save_weights(model: torch.nn.Module, out_dir: Path) -> Path:
    """Save the weights as safetensors (no pickle)."""
    from safetensors.torch import save_file

    path = Path(out_dir) / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def load(path: Path, device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) of a built folder, through open_clip's own loading path."""
    path = Path(path)
    config_file = find_model_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{path} lacks {WEIGHTS_FILE} (it holds {sorted(p.name for p in path.iterdir())})")
    model, preprocess, tokenizer = _create(config_file, device=device, pretrained=weights)
    return model.eval(), preprocess, tokenizer


# ----------------------------------------------------------------------------- zero-shot


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Unit-norm text embeddings, (T, D)."""
    return model.encode_text(tokenizer(list(texts)).to(_device_of(model)), normalize=True)


@torch.no_grad()
def encode_images(model, preprocess, examples: Sequence[ImageExample], batch_size: int = 256) -> torch.Tensor:
    """Unit-norm image embeddings of the examples' images, (B, D)."""
    device = _device_of(model)
    chunks = []
    for start in range(0, len(examples), batch_size):
        pixels = torch.stack([preprocess(e.load_image()) for e in examples[start : start + batch_size]])
        chunks.append(model.encode_image(pixels.to(device), normalize=True))
    return torch.cat(chunks)


def predict_captions(model, preprocess, tokenizer, examples: Sequence[ImageExample],
                     captions: Sequence[str] = CAPTIONS) -> list[str]:
    """The caption of highest cosine similarity for each example's image."""
    was_training = model.training
    model.eval()
    try:
        sims = encode_images(model, preprocess, examples) @ encode_texts(model, tokenizer, captions).T  # (B, T)
    finally:
        model.train(was_training)
    return [captions[i] for i in sims.argmax(dim=1).tolist()]


def zero_shot_accuracy(model, preprocess, tokenizer, examples: Sequence[ImageExample],
                       captions: Sequence[str] = CAPTIONS) -> float:
    """Top-1 share of examples whose own caption is the nearest of `captions` (default: the 24)."""
    if not examples:
        raise ValueError("zero_shot_accuracy needs at least one example")
    predicted = predict_captions(model, preprocess, tokenizer, examples, captions)
    return sum(p == e.caption for p, e in zip(predicted, examples, strict=True)) / len(examples)


# ----------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    config_file: Path
    steps: int
    train_seconds: float
    final_loss: float
    train_images: int


def _pixel_stack(examples: Sequence[ImageExample], preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed images (N, C, S, S) and caption indices (N,) into CAPTIONS."""
    index = {c: i for i, c in enumerate(CAPTIONS)}
    pixels = torch.stack([preprocess(e.load_image()) for e in examples])
    labels = torch.tensor([index[e.caption] for e in examples])
    return pixels, labels


def _normalisation(preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (1, C, 1, 1), of the preprocess' Normalize step."""
    from torchvision.transforms import Normalize

    norm = next(t for t in preprocess.transforms if isinstance(t, Normalize))
    return torch.tensor(norm.mean).view(1, -1, 1, 1), torch.tensor(norm.std).view(1, -1, 1, 1)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2.5 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def augment(pixels: torch.Tensor, settings: AugmentSettings, mean: torch.Tensor, std: torch.Tensor,
            generator: torch.Generator) -> torch.Tensor:
    """Randomly flip, shift, blur and noise a normalised batch (B, C, S, S) → same shape."""
    B, C, H, W = pixels.shape
    x = pixels * std + mean  # (B, C, H, W) in [0, 1]
    flip = torch.rand(B, generator=generator) < settings.hflip_p
    x = torch.where(flip.view(B, 1, 1, 1), x.flip(-1), x)
    if settings.max_shift_px > 0:
        n = settings.max_shift_px
        shift = torch.randint(-n, n + 1, (B, 2), generator=generator).float()  # (B, 2) px, (x, y)
        theta = torch.zeros(B, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = -2.0 * shift[:, 0] / W  # integer shifts sample pixel centres exactly
        theta[:, 1, 2] = -2.0 * shift[:, 1] / H
        grid = F.affine_grid(theta, (B, C, H, W), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if settings.blur_p > 0:
        k = _gaussian_kernel(settings.blur_sigma)
        r = k.numel() // 2
        blurred = F.pad(x, (r, r, r, r), mode="replicate")
        blurred = F.conv2d(blurred, k.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C)  # along W
        blurred = F.conv2d(blurred, k.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C)  # along H
        strength = torch.rand(B, generator=generator) * (torch.rand(B, generator=generator) < settings.blur_p)
        x = x + strength.view(B, 1, 1, 1) * (blurred - x)
    if settings.noise_p > 0:
        noise_std = settings.noise_std * torch.rand(B, generator=generator)
        noise_std = noise_std * (torch.rand(B, generator=generator) < settings.noise_p)
        x = (x + noise_std.view(B, 1, 1, 1) * torch.randn(x.shape, generator=generator)).clamp(0.0, 1.0)
    return (x - mean) / std


def multi_positive_clip_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CLIP loss when texts repeat: logits (B, T) image×distinct text, labels (B,) in [0, T).

    Image→text: cross-entropy over the T texts. Text→image: for each text present in the
    batch, cross-entropy over the B images against a target spread evenly over its images.
    """
    B, T = logits.shape
    i2t = F.cross_entropy(logits, labels)
    positives = F.one_hot(labels, T).T.float()  # (T, B)
    count = positives.sum(dim=1)  # (T,)
    present = count > 0
    target = positives[present] / count[present, None]  # (T', B)
    t2i = -(target * F.log_softmax(logits.T[present], dim=1)).sum(dim=1).mean()
    return 0.5 * (i2t + t2i)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exempt = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("class_embedding")
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, t: TrainSettings) -> float:
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(config: dict[str, Any], work_dir: Path, progress: Progress | None = None,
          source: ShapesSource | None = None) -> TrainResult:
    """Create the model from its registered config (written into `work_dir`) and train it.

    Deterministic given `config["seed"]` on one machine and thread count; the caller's global
    torch RNG state is left as it was.
    """
    recipe = ClipRecipe.from_dict(config)
    source = source or ShapesSource(holdout_fraction=recipe.data.holdout_fraction)
    examples = list(source.examples("train"))[: recipe.data.max_train]
    config_file = write_model_config(recipe, Path(work_dir))
    t, a = recipe.train, recipe.augment
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model, preprocess, tokenizer = _create(config_file)
        generator = torch.Generator().manual_seed(recipe.seed)
        started = time.perf_counter()
        pixels, labels = _pixel_stack(examples, preprocess)  # (N, C, S, S), (N,)
        mean, std = _normalisation(preprocess)
        families = [(tokenizer(list(CAPTIONS)), lambda y: y, 1.0)]
        if t.partial_weight > 0:
            families += [
                (tokenizer(list(COLOR_CAPTIONS)), lambda y: y // len(SHAPES), t.partial_weight),
                (tokenizer(list(SHAPE_CAPTIONS)), lambda y: y % len(SHAPES), t.partial_weight),
            ]
        texts = torch.cat([tokens for tokens, _, _ in families])  # (T, L) every caption of every family
        sizes = [len(tokens) for tokens, _, _ in families]

        optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, eps=t.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, t))
        model.train()
        N = len(examples)
        batch = min(t.batch_size, N)
        order = torch.randperm(N, generator=generator)
        cursor = 0
        loss_value = float("nan")
        for step in range(t.steps):
            if cursor + batch > N:  # next epoch: a fresh permutation, drop the remainder
                order, cursor = torch.randperm(N, generator=generator), 0
            idx = order[cursor : cursor + batch]
            cursor += batch
            x = augment(pixels[idx], a, mean, std, generator)  # (B, C, S, S)
            y = labels[idx]  # (B,)
            image = model.encode_image(x, normalize=True)  # (B, D)
            text = model.encode_text(texts, normalize=True)  # (T, D)
            logits = model.logit_scale.exp().clamp(max=100.0) * image @ text.T  # (B, T)
            loss = logits.new_zeros(())
            for (_, to_family, weight), chunk in zip(families, logits.split(sizes, dim=1)):
                loss = loss + weight * multi_positive_clip_loss(chunk, to_family(y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            loss_value = loss.detach().item()
            if progress is not None:
                progress(step + 1, t.steps)
        seconds = time.perf_counter() - started
    model.eval()
    return TrainResult(model, preprocess, tokenizer, config_file, t.steps, seconds, loss_value, N)


def build(config: dict[str, Any], out_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Train from scratch, save config + safetensors into `out_dir`, return metrics (JSON-able)."""
    started = time.perf_counter()
    recipe = ClipRecipe.from_dict(config)
    out_dir = Path(out_dir)
    source = ShapesSource(holdout_fraction=recipe.data.holdout_fraction)
    result = train(config, out_dir, progress, source=source)
    weights = save_weights(result.model, out_dir)
    holdout = list(source.examples("holdout"))[: recipe.data.max_eval]
    predicted = predict_captions(result.model, result.preprocess, result.tokenizer, holdout)
    truth = [e.caption for e in holdout]
    n = len(holdout)
    return {
        "zero_shot_top1": sum(p == c for p, c in zip(predicted, truth)) / n,
        "zero_shot_color": sum(p.split()[1] == c.split()[1] for p, c in zip(predicted, truth)) / n,
        "zero_shot_shape": sum(p.split()[2] == c.split()[2] for p, c in zip(predicted, truth)) / n,
        "eval_split": "holdout",
        "eval_images": n,
        "train_images": result.train_images,
        "steps": result.steps,
        "final_loss": round(result.final_loss, 4),
        "train_seconds": round(result.train_seconds, 2),
        "build_seconds": round(time.perf_counter() - started, 2),
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "weights_bytes": weights.stat().st_size,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "logit_scale": round(result.model.logit_scale.detach().exp().item(), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model_name": recipe.model_name,
    }


__all__ = [
    "CAPTIONS", "KIND", "NAME", "SIZES", "ClipRecipe", "build", "data_fingerprint", "load",
    "predict_captions", "recipe_config", "train", "zero_shot_accuracy",
]

"""`tiny:shapes-sd`: the tiny world's Stable-Diffusion-compatible base, pretrained here.

A real `StableDiffusionPipeline` — `UNet2DConditionModel`, `AutoencoderKL`, `CLIPTextModel`,
`CLIPTokenizer`, a scheduler — small enough to pretrain on two CPU cores in minutes, on the
easy-vqa shapes ("a {color} {shape}" → 32×32 image). The same finetuning and scoring code
that drives SD-1.4 by HF id drives this one: `load()` is `StableDiffusionPipeline.from_pretrained`.

Shape legend: B batch, C channels (3 = RGB = latent), H = W = R resolution (32),
T tokens (77), D text hidden size.

Components
----------
- tokenizer: open_clip's CLIP BPE as a transformers `CLIPTokenizer` (ids equal open_clip's,
  pad id 0; see `clip_tokenizer.py`).
- text encoder: `CLIPTextModel` with a small hidden size (the 49408-row token table is most
  of its parameters), trained jointly with the UNet.
- autoencoder: an `AutoencoderKL` with one level (no downsampling) whose weights are *set*, not
  trained, to the identity: latents are pixels in [-1, 1] (scaling factor 1). Each colour
  channel u travels in a GroupNorm group [u, -u, +k, -k] with constant channels k ≫ 1, so the
  group's mean is 0 and its variance ≈ k²/2 whatever the image; the norm's affine restores u
  and adds an offset that keeps SiLU in its linear range; every residual branch is zero.
  Round trip error ≈ 1e-4 (well under one 8-bit level). So diffusion runs in pixel space
  through SD's interface, and all compute goes to the UNet.
- UNet: `UNet2DConditionModel` at 32 px, 3 levels (32, 16, 8 px), transformer blocks at
  16 px, 8 px and in the middle, with modules named as in SD
  (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`, `...attn2.to_v`). At 8 px
  `attn1` is self-attention; at 16 px it is a second cross-attention (`only_cross_attention`),
  since self-attention over every 16-px position costs more than it brings here. Text reaches
  the UNet only through cross-attention (no pooled-text or class embedding), so a LoRA on
  `to_q`/`to_v` (`attn2.to_v` maps the text tokens to the values the image reads) can move
  colour and shape.
- storage: every component saved in float16 (half the bytes; the repository ships the built
  base), as many hub checkpoints are: `from_pretrained(path)` gives a float16 pipeline, and
  the project loads it with `dtype=torch.float32` (`load()`), as it does SD-1.4 by id. The
  identity VAE's weights are exact in float16 but one (k/√2 → 45.25, 1e-4 relative). Quality
  is measured on the saved weights.
- schedulers: DDPM (cosine schedule, x0-prediction, `prediction_type="sample"`) for
  training; the pipeline is saved with a `DPMSolverMultistepScheduler` from the same config.

Training: the UNet predicts the clean image (x0). For a small network this learns the
shapes much faster than v- or ε-prediction (at equal steps on this data: shape accuracy
0.54 vs 0.44 for v-prediction), since its output is a flat-coloured image, not noise. Loss
weight per example min(1 + snr, 1 + snr_cap) in x0 space (the plain v-loss, capped at low
noise). Classifier-free guidance by dropping captions to "" (what the pipeline feeds as the
negative prompt), AdamW with warmup and cosine decay, bf16 autocast on CPU, EMA weights
saved. Everything draws from one seeded generator, so a build is a function of (config, data).

`judge_images` reads (colour, shape) off generated images with the pixel logic of
`pipeline.data.shapes`, made robust to tinted/noisy backgrounds; `evaluate` scores a
pipeline with it on every caption.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.shapes import COLORS, PALETTE, SHAPES, ShapesSource
from tinyworld.clip_tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_clip_tokenizer

NAME = "shapes-sd"
KIND = "diffusion"
SIZES = ("smoke", "full")
RECIPE_VERSION = 1

CAPTIONS: tuple[str, ...] = tuple(f"a {c} {s}" for c in COLORS for s in SHAPES)
_IDENTITY_K = 64.0  # constant channels of the identity autoencoder's GroupNorm groups
_SILU_SHIFT = 12.0  # offset that keeps SiLU linear (error ≤ 13·e⁻¹¹ ≈ 2e-4)


# ----------------------------------------------------------------------------- recipe


def recipe_config(size: str) -> dict:
    """The build recipe for `size` ("smoke": seconds, for tests; "full": the real base)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for base {NAME!r}; valid sizes: {list(SIZES)}")
    full = size == "full"
    return {
        "name": NAME,
        "size": size,
        "recipe_version": RECIPE_VERSION,
        "seed": 0,
        "resolution": 32,
        # trained in float32, saved in float16 (the repository ships the built base; the
        # project's loaders ask for float32; the identity VAE's weights are exact in float16)
        "save_dtype": "float16",
        "text_encoder": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
        },
        "unet": {
            "block_out_channels": [16, 32, 64] if full else [8, 16, 16],
            "layers_per_block": 1,
            "attention_levels": [1, 2],  # levels with transformer blocks (0 = full resolution)
            "self_attention_levels": [2],  # elsewhere attn1 is a second cross-attention
            "attention_heads": 2,
            "norm_num_groups": 8 if full else 4,
        },
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "sample",  # x0-prediction: the net outputs clean images
        },
        "train": {
            "steps": 1500 if full else 4,
            "batch_size": 32 if full else 8,
            "lr": 2e-3,
            "warmup_steps": 50 if full else 1,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "ema_decay": 0.995,
            "caption_dropout": 0.1,
            "snr_cap": 5.0,  # loss weight in x0 space: min(1 + snr, 1 + snr_cap)
            "bf16_autocast": True,
            "hflip": True,
            "threads": 1,  # torch intra-op threads while building (see build())
        },
        "eval": {
            "samples_per_caption": 8 if full else 1,
            "num_inference_steps": 20 if full else 2,
            "guidance_scale": 4.0,
            "seed": 1234,
        },
    }


def _check_config(config: dict) -> None:
    expected = recipe_config("smoke")
    missing = sorted(set(expected) - set(config))
    if missing:
        raise ValueError(f"{NAME} config lacks {missing}; start from recipe_config('full')")
    for section in ("text_encoder", "unet", "scheduler", "train", "eval"):
        lacking = sorted(set(expected[section]) - set(config[section]))
        if lacking:
            raise ValueError(f"{NAME} config section {section!r} lacks {lacking}")


def data_fingerprint() -> str:
    """Hash of the training data: the shapes package fingerprint plus the train split's ids and captions."""
    source = ShapesSource()
    h = hashlib.sha256(f"{NAME}-data-v1".encode())
    h.update(f"holdout={source.holdout_fraction}".encode())
    for e in source.examples("train"):
        h.update(f"{e.id}\t{e.caption}\n".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- components


def make_unet(config: dict):
    """A freshly initialised `UNet2DConditionModel` (uses the global torch RNG)."""
    from diffusers import UNet2DConditionModel

    u = config["unet"]
    n = len(u["block_out_channels"])
    attn = set(u["attention_levels"])
    down = tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n)))
    # attn1 is self-attention on the self-attention levels, a second cross-attention elsewhere
    # (self-attention over every pixel of a high-resolution level costs more than the rest)
    self_levels = set(u.get("self_attention_levels", u["attention_levels"]))
    only_cross = tuple(i not in self_levels for i in range(n))
    return UNet2DConditionModel(
        sample_size=config["resolution"],
        in_channels=3,
        out_channels=3,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(u["block_out_channels"]),
        layers_per_block=u["layers_per_block"],
        cross_attention_dim=config["text_encoder"]["hidden_size"],
        attention_head_dim=u["attention_heads"],  # diffusers: this is the number of heads
        only_cross_attention=only_cross,
        norm_num_groups=u["norm_num_groups"],
    )


def make_text_encoder(config: dict):
    """A freshly initialised `CLIPTextModel` over open_clip's 49408 ids (global torch RNG)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    t = config["text_encoder"]
    text_config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        max_position_embeddings=t["max_position_embeddings"],
        hidden_act="quick_gelu",
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    return CLIPTextModel(text_config)


def make_identity_vae(resolution: int):
    """An `AutoencoderKL` (one level, 3 latent channels) whose encode/decode is the identity.

    Channel group c of the 12 inner channels carries [u_c, -u_c, +k, -k]: GroupNorm then sees
    mean 0 and variance (E[u²] + k²)/2 ≈ k²/2 for any image, so its affine (scale k/√2, shift s)
    returns u_c + s, and SiLU(u + s) ≈ u + s; convolutions take the shift back off. Every
    residual branch (conv2 of each resnet) is zero. The latent log-variance is -30 (std 3e-7).
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(12,),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=3,
        sample_size=resolution,
        scaling_factor=1.0,
        force_upcast=False,
        mid_block_add_attention=False,
    )
    k, s = _IDENTITY_K, _SILU_SHIFT
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for module in vae.modules():  # GroupNorm weights default to 1; keep them harmless
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.fill_(1.0)
        for coder in (vae.encoder, vae.decoder):
            conv_in = coder.conv_in  # 3 → 12 channels
            for c in range(3):
                conv_in.weight[4 * c, c, 1, 1] = 1.0
                conv_in.weight[4 * c + 1, c, 1, 1] = -1.0
                conv_in.bias[4 * c + 2] = k
                conv_in.bias[4 * c + 3] = -k
            norm = coder.conv_norm_out
            norm.weight.zero_()
            norm.bias.zero_()
            for c in range(3):
                norm.weight[4 * c] = k / math.sqrt(2.0)
                norm.bias[4 * c] = s
            for c in range(3):
                coder.conv_out.weight[c, 4 * c, 1, 1] = 1.0
                coder.conv_out.bias[c] = -s
        vae.encoder.conv_out.bias[3:] = -30.0  # log-variance channels
        for conv in (vae.quant_conv, vae.post_quant_conv):
            n = conv.weight.shape[0]
            conv.weight[:, :, 0, 0] = torch.eye(n)
    return vae


def make_schedulers(config: dict):
    """(training DDPM scheduler, DPM-Solver++ sampler) sharing one noise schedule."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    s = config["scheduler"]
    train = DDPMScheduler(
        num_train_timesteps=s["num_train_timesteps"],
        beta_schedule=s["beta_schedule"],
        prediction_type=s["prediction_type"],
        clip_sample=False,
        steps_offset=1,  # what StableDiffusionPipeline expects (it warns and patches otherwise)
    )
    sample = DPMSolverMultistepScheduler.from_config(train.config)
    return train, sample


# ----------------------------------------------------------------------------- data


def load_training_data(resolution: int) -> tuple[torch.Tensor, list[str]]:
    """The train split as a uint8 stack (N, 3, R, R) (box-filtered from 64 px) and its captions."""
    from PIL import Image

    examples = ShapesSource().examples("train")
    images = []
    for e in examples:
        with Image.open(e.image_path) as im:
            im = im.convert("RGB")
            if im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.BOX)
            images.append(np.asarray(im))
    stack = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, R, R)
    return stack, [e.caption for e in examples]


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, R, R) → float in [-1, 1]."""
    return images_u8.float() / 127.5 - 1.0


# ----------------------------------------------------------------------------- build


def _tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(P, T) ids exactly as StableDiffusionPipeline tokenizes prompts."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _target_and_weight(scheduler, x0, noise, t, snr_all, snr_cap):
    """The regression target for the scheduler's prediction type, and per-example loss weights.

    Weights are set in x0 space, w = min(1 + snr, 1 + snr_cap) (the plain v-prediction loss,
    capped at low noise), then converted to the target's space, so every prediction type
    optimises the same objective: high-noise steps, where layout and shape are decided, keep
    weight ≥ 1 (min-SNR weighting would give them ≈ snr ≈ 0).
    """
    snr = snr_all[t]  # (B,)
    w_x0 = torch.clamp(snr + 1.0, max=1.0 + snr_cap)
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return x0, w_x0
    if kind == "v_prediction":  # ||v̂ - v||² = (1 + snr) ||x̂0 - x0||²
        return scheduler.get_velocity(x0, noise, t), w_x0 / (1.0 + snr)
    if kind == "epsilon":  # ||ε̂ - ε||² = snr ||x̂0 - x0||²
        return noise, w_x0 / torch.clamp(snr, min=1e-4)
    raise ValueError(f"unsupported prediction_type {kind!r}; use 'sample', 'v_prediction' or 'epsilon'")


def _lr_at(step: int, train: dict) -> float:
    """Linear warmup then cosine decay to 10% of the peak."""
    peak, warm, total = train["lr"], train["warmup_steps"], train["steps"]
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build(
    config: dict,
    out_dir: Path,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Pretrain the base from scratch (seeded, deterministic), save it to `out_dir`, return metrics.

    `out_dir` gets a `StableDiffusionPipeline.save_pretrained(..., safe_serialization=True)`
    folder plus `shapes_sd_build.json` (config and metrics). `progress(step, total)` is
    called after every training step.

    Runs with `config["train"]["threads"]` torch threads (restored afterwards): one thread is
    the fastest on a small shared machine (two threads on two busy cores spin-wait and run
    several times slower) and keeps the floating-point reduction order, hence the weights,
    independent of how many cores the machine has.
    """
    _check_config(config)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(config["train"]["threads"]))
    try:
        return _build(config, Path(out_dir), progress)
    finally:
        torch.set_num_threads(previous_threads)


def train_steps(
    unet,
    text_encoder,
    tokenizer,
    vae,
    noise_scheduler,
    images_u8: torch.Tensor,
    captions: Sequence[str],
    train_cfg: dict,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Train `unet` and `text_encoder` in place for `train_cfg["steps"]` steps; return the losses.

    images_u8: uint8 (N, 3, R, R); captions: N captions, each one of `CAPTIONS`. The frozen `vae`
    encodes the images once; captions are dropped to "" with `train_cfg["caption_dropout"]`; x0
    loss weighted by `_target_and_weight`; AdamW with `_lr_at` warmup and cosine decay, gradient
    clipping and EMA; every draw from `torch.Generator().manual_seed(seed)`. At the end the EMA
    weights are copied into both models, which are left in eval mode. Used by `build` (fresh
    models) and by `tiny:shapes-sd-continued` (the built base, trained further).
    """
    N = images_u8.shape[0]
    prompts = ["", *CAPTIONS]  # index 0: the unconditional prompt
    prompt_index = {p: i for i, p in enumerate(prompts)}
    unknown = sorted({c for c in captions} - set(prompts))
    assert not unknown, unknown
    caption_ids = torch.tensor([prompt_index[c] for c in captions])  # (N,)
    vae.requires_grad_(False)
    prompt_tokens = _tokenize(tokenizer, prompts)  # (P, T)

    with torch.no_grad():  # the identity VAE, run once: latents are what the pipeline decodes
        latents_all = torch.cat(
            [
                vae.encode(to_model_range(images_u8[i : i + 512])).latent_dist.mode()
                * vae.config.scaling_factor
                for i in range(0, N, 512)
            ]
        )  # (N, 3, R, R)

    params = [p for p in unet.parameters()] + [p for p in text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    snr_all = alphas_cumprod / (1.0 - alphas_cumprod)  # (num_train_timesteps,)
    steps, B = train_cfg["steps"], train_cfg["batch_size"]
    losses: list[float] = []
    unet.train()
    text_encoder.train()
    for step in range(steps):
        idx = torch.randint(0, N, (B,), generator=gen)
        x0 = latents_all[idx]  # (B, 3, R, R)
        if train_cfg["hflip"]:
            flip = torch.rand(B, generator=gen) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        cap = caption_ids[idx]
        drop = torch.rand(B, generator=gen) < train_cfg["caption_dropout"]
        cap = torch.where(drop, torch.zeros_like(cap), cap)  # (B,) prompt indices
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (B,), generator=gen)

        used, inverse = torch.unique(cap, return_inverse=True)  # encode each prompt once
        noisy = noise_scheduler.add_noise(x0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train_cfg["bf16_autocast"]):
            hidden = text_encoder(prompt_tokens[used])[0][inverse]  # (B, T, D)
            pred = unet(noisy, t, hidden).sample.float()  # (B, 3, R, R)
        target, weight = _target_and_weight(noise_scheduler, x0, noise, t, snr_all, train_cfg["snr_cap"])
        per_example = (pred - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
        loss = (weight * per_example).mean()

        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, train_cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_cfg["grad_clip"])
        optimizer.step()
        decay = min(train_cfg["ema_decay"], (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    return losses


def _build(config: dict, out_dir: Path, progress: Callable[[int, int], None] | None) -> dict:
    from diffusers import StableDiffusionPipeline

    started = time.time()
    seed = int(config["seed"])
    R = config["resolution"]

    images_u8, captions = load_training_data(R)
    N = images_u8.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_clip_tokenizer(out_dir / "tokenizer")
        vae = make_identity_vae(R)
        text_encoder = make_text_encoder(config)
        unet = make_unet(config)
    noise_scheduler, sample_scheduler = make_schedulers(config)
    losses = train_steps(unet, text_encoder, tokenizer, vae, noise_scheduler, images_u8, captions,
                         config["train"], seed, progress)
    train_seconds = time.time() - started
    steps = config["train"]["steps"]

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sample_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(getattr(torch, config["save_dtype"]))  # every component, so a plain from_pretrained is consistent
    pipe.save_pretrained(out_dir, safe_serialization=True)

    ev = config["eval"]
    eval_started = time.time()
    quality = evaluate(
        load(out_dir),  # what was saved, as every user loads it

        samples_per_caption=ev["samples_per_caption"],
        num_inference_steps=ev["num_inference_steps"],
        guidance_scale=ev["guidance_scale"],
        seed=ev["seed"],
    )
    tail = losses[-min(100, len(losses)) :]
    metrics = {
        "name": NAME,
        "size": config["size"],
        "steps": steps,
        "loss_first": losses[0] if losses else None,
        "loss_last100": float(np.mean(tail)) if tail else None,
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(time.time() - eval_started, 2),
        "build_seconds": round(time.time() - started, 2),
        "params": {
            "unet": sum(p.numel() for p in unet.parameters()),
            "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
        },
        "file_bytes": _weight_bytes(out_dir),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "data_examples": int(N),
        "eval": {k: v for k, v in quality.items() if k != "per_caption"},
        "eval_per_caption": quality["per_caption"],
    }
    (out_dir / "shapes_sd_build.json").write_text(
        json.dumps({"config": config, "metrics": metrics}, indent=2)
    )
    return metrics


def _weight_bytes(out_dir: Path) -> dict[str, int]:
    sizes = {str(p.relative_to(out_dir)): p.stat().st_size for p in sorted(out_dir.rglob("*.safetensors"))}
    sizes["total"] = sum(sizes.values())
    return sizes


def load(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The saved base as a `StableDiffusionPipeline` (the same call that loads SD-1.4 by id)."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").exists():
        present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise ValueError(f"{path} is not a saved {NAME} pipeline (no model_index.json; it holds {present})")
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ----------------------------------------------------------------------------- judging


_FILL_RECTANGLE = 0.92  # fill ratio above: rectangle (real data: 1.0)
_FILL_CIRCLE = 0.76  # above: circle (real 32 px: 0.787..0.87); below: triangle (0.55..0.74)


def _as_stack(images) -> np.ndarray:
    """PIL images, a list of (H, W, 3) arrays, or an (N, H, W, 3) array → uint8 (N, H, W, 3)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        arr = images
    else:
        arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr * 255.0 if arr.max() <= 1.0 else arr), 0, 255).astype(np.uint8)
    return arr


def judge_measurements(images) -> dict[str, np.ndarray]:
    """Colour (palette index) and fill ratio of the one shape in each image, robustly.

    Same geometry as `pipeline.data.shapes.pixel_measurements` (background = per-image median,
    colour = palette colour nearest the purest shape pixels, coverage = projection on the
    background→colour line, fill = area / (width × height) from per-column/row maximum
    coverage), hardened for generated images: the reference distance is the 3rd largest (one
    or two stray pixels cannot set it), and coverage below 0.2 is treated as background noise
    (a linear ramp from 0.2 to 0.8), so speckle does not widen the bounding box.
    """
    x = _as_stack(images).astype(np.float32)
    N, H, W, _ = x.shape
    bg = np.median(x.reshape(N, H * W, 3), axis=1)  # (N, 3)
    diff = x - bg[:, None, None, :]  # (N, H, W, 3)
    dist = np.linalg.norm(diff, axis=-1).reshape(N, H * W)  # (N, HW)
    ref = np.sort(dist, axis=1)[:, -3]  # (N,) robust max
    core = dist >= 0.8 * ref[:, None]  # (N, HW)
    flat = x.reshape(N, H * W, 3)
    core_rgb = (flat * core[..., None]).sum(axis=1) / np.maximum(core.sum(axis=1), 1)[:, None]
    palette = np.array(list(PALETTE.values()), dtype=np.float32)  # (C, 3)
    color = np.linalg.norm(core_rgb[:, None, :] - palette[None], axis=-1).argmin(axis=1)  # (N,)

    direction = palette[color] - bg  # (N, 3)
    norm2 = np.maximum((direction**2).sum(axis=1), 1.0)
    alpha = np.einsum("nhwc,nc->nhw", diff, direction) / norm2[:, None, None]  # (N, H, W)
    alpha = np.clip((alpha - 0.2) / 0.6, 0.0, 1.0)
    mass = alpha.sum(axis=(1, 2))
    width = alpha.max(axis=1).sum(axis=1)
    height = alpha.max(axis=2).sum(axis=1)
    fill = mass / np.maximum(width * height, 1e-6)
    return {"color": color, "fill": fill, "area": mass / (H * W)}


def shape_of_fill(fill: float) -> str:
    """Rectangle ≈ 1, circle ≈ π/4, triangle ≈ 1/2 (thresholds set on 32 and 64 px real images)."""
    if fill > _FILL_RECTANGLE:
        return "rectangle"
    return "circle" if fill > _FILL_CIRCLE else "triangle"


def judge_images(images) -> list[tuple[str, str]]:
    """(colour, shape) of each image — PIL images or uint8 (N, H, W, 3) — by pixels alone."""
    m = judge_measurements(images)
    return [(COLORS[int(c)], shape_of_fill(float(f))) for c, f in zip(m["color"], m["fill"])]


@torch.no_grad()
def sample_captions(
    pipe,
    captions: Sequence[str] = CAPTIONS,
    samples_per_caption: int = 1,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
    chunk: int = 96,
) -> list:
    """PIL images, caption-major (`samples_per_caption` consecutive images per caption).

    Captions go through the pipeline in batches of `chunk` images, each batch with its own
    generator seeded `seed + batch index`, so the images depend only on the arguments.
    """
    per_call = max(1, chunk // max(1, samples_per_caption))
    images = []
    for i in range(0, len(captions), per_call):
        gen = torch.Generator().manual_seed(seed + i)
        out = pipe(
            list(captions[i : i + per_call]),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=samples_per_caption,
            generator=gen,
        )
        images += out.images
    return images


def evaluate(
    pipe,
    samples_per_caption: int = 4,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
) -> dict[str, Any]:
    """How often generated images show the prompted colour and shape, over all 24 captions."""
    images = sample_captions(pipe, CAPTIONS, samples_per_caption, num_inference_steps, guidance_scale, seed)
    judged = judge_images(images)
    per_caption = {}
    color_hits = shape_hits = both_hits = 0
    for i, caption in enumerate(CAPTIONS):
        _, color, shape = caption.split(" ")
        got = judged[i * samples_per_caption : (i + 1) * samples_per_caption]
        c = sum(g[0] == color for g in got)
        s = sum(g[1] == shape for g in got)
        b = sum(g == (color, shape) for g in got)
        color_hits, shape_hits, both_hits = color_hits + c, shape_hits + s, both_hits + b
        per_caption[caption] = {"color": c / len(got), "shape": s / len(got)}
    total = len(judged)
    return {
        "color_accuracy": color_hits / total,
        "shape_accuracy": shape_hits / total,
        "both_accuracy": both_hits / total,
        "samples": total,
        "samples_per_caption": samples_per_caption,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "per_caption": per_caption,
    }


def save_sample_grid(pipe, path: Path, guidance_scale: float = 4.0, seed: int = 1234, scale: int = 4) -> Path:
    """One image per caption (24 captions), `scale`× enlarged, in a 6×4 grid PNG at `path`."""
    from PIL import Image

    images = sample_captions(pipe, CAPTIONS, 1, 20, guidance_scale, seed)
    R = images[0].size[0] * scale
    cols = 6
    grid = Image.new("RGB", (cols * R, (len(images) + cols - 1) // cols * R), "white")
    for i, image in enumerate(images):
        grid.paste(image.resize((R, R), Image.NEAREST), ((i % cols) * R, (i // cols) * R))
    grid.save(path)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tinyworld.shapes_sd SIZE OUT_DIR [GRID.png]`: build, print metrics as JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=f"build tiny:{NAME} from scratch")
    parser.add_argument("size", choices=SIZES)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("grid", type=Path, nargs="?", help="also save a PNG of one sample per caption")
    args = parser.parse_args(argv)
    config = recipe_config(args.size)
    total = config["train"]["steps"]
    every = max(1, total // 20)

    def progress(step: int, steps: int) -> None:
        if step % every == 0 or step == steps:
            print(f"step {step}/{steps}", flush=True)

    metrics = build(config, args.out_dir, progress)
    if args.grid is not None:
        save_sample_grid(load(args.out_dir), args.grid, guidance_scale=config["eval"]["guidance_scale"])
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

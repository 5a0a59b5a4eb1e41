"""Stand-ins for the paper's three base models: random weights, the real architecture configs, hub layouts.

Nothing can be downloaded here, so the paper rehearsal (tests/test_paper_rehearsal.py,
bench/rehearsal.py) runs the paper manifests on randomly initialised models whose architecture
configs are those of the real checkpoints, saved in the layout a hub download leaves:

- `sd14`: `CompVis/stable-diffusion-v1-4` — model_index.json + unet/ vae/ text_encoder/ tokenizer/
  scheduler/ (no safety_checker / feature_extractor: the pipeline loads SD with safety_checker=None).
  The configs below are the values of the repo's unet/config.json, vae/config.json,
  text_encoder/config.json and scheduler/scheduler_config.json. The tokenizer is OpenAI CLIP's BPE
  (49,408 ids) rebuilt from open_clip's vocabulary (tinyworld/clip_tokenizer.py), with SD-1.4's
  tokenizer_config: pad = unk = eos = "<|endoftext|>", model_max_length 77.
- `qwen2-0.5b`: `Qwen/Qwen2-0.5B` — config.json (the values of the repo's config.json),
  model.safetensors, generation_config.json, tokenizer.json / tokenizer_config.json. The tokenizer is a
  byte-level BPE trained here with `tokenizers` through Qwen2's own text pipeline
  (tinyworld.qa_lm.train_tokenizer, Qwen2's pre-tokenisation regex), at most 2,048 ids (the
  corpus below yields about 600), eos = pad =
  "<|endoftext|>", no bos (as Qwen2). Stated difference: its ids are fewer than the real tokenizer's
  151,646 and "<|endoftext|>" has id 0, not 151,643; the embedding keeps the config's exact
  vocab_size 151,936 (the real checkpoint pads its embedding past its tokenizer too), so every id
  fits and the LoRA targets (q_proj, v_proj) have exactly the real shapes.
- `vit-b-16`: open_clip `ViT-B-16` — open_clip's own model config (open_clip/model_configs/ViT-B-16.json),
  written as open_clip_config.json (with OpenAI CLIP's preprocessing, as the `openai` tag uses)
  + open_clip_model.safetensors: loads as `model: ViT-B-16, pretrained: <dir>/open_clip_model.safetensors`
  or `model: local-dir:<dir>`.

Each has a reduced-width variant (`*-small`): the same classes, block types, module names and
layer structure (SD: 4 down / 4 up blocks, 2 layers per block, 16 transformer blocks, so a
celeba-sd14 adapter still has 64 target matrices), small widths — for the default test suite.

`build(name, root)` writes `root/name` once (a `standin.json` names the config it was built from)
and returns the folder. Build times on 2 CPU cores: the small ones ~2 s each; sd14 ~1 min
(4.3 GB on disk), qwen2-0.5b ~30 s (2 GB), vit-b-16 ~10 s (0.6 GB).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- CompVis/stable-diffusion-v1-4

SD14_UNET = {  # unet/config.json
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False, "dual_cross_attention": False, "upcast_attention": False,
    "use_linear_projection": False, "resnet_time_scale_shift": "default", "class_embed_type": None, "num_class_embeds": None,
}
SD14_VAE = {  # vae/config.json
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
SD14_TEXT_ENCODER = {  # text_encoder/config.json (CLIP ViT-L/14's text tower)
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
    "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12,
    "pad_token_id": 1, "projection_dim": 512, "vocab_size": 49408,
}
SD14_SCHEDULER = {  # scheduler/scheduler_config.json
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
SD14_TOKENIZER = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>", "model_max_length": 77}  # tokenizer/tokenizer_config.json

# ----------------------------------------------------------------------------- Qwen/Qwen2-0.5B

QWEN2_0_5B = {  # config.json
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 131072, "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": True, "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN2_TOKENIZER_VOCAB = 2048

# ----------------------------------------------------------------------------- open_clip ViT-B-16

OPENAI_PREPROCESS = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                     "interpolation": "bicubic", "resize_mode": "shortest"}


def vit_b_16_config() -> dict[str, Any]:
    """open_clip's own ViT-B-16 model config, read from the installed package (never retyped)."""
    import open_clip

    config = open_clip.get_model_config("ViT-B-16")
    assert config is not None, "open_clip has no ViT-B-16 config"
    return copy.deepcopy(config)


# ----------------------------------------------------------------------------- reduced widths

def _small_sd() -> dict[str, dict]:
    unet = {**SD14_UNET, "block_out_channels": [32, 32, 64, 64], "norm_num_groups": 8, "cross_attention_dim": 32,
            "sample_size": 8}  # 64 px by default: the scorer's images stay small
    vae = {**SD14_VAE, "block_out_channels": [8, 8, 16, 16], "norm_num_groups": 8, "layers_per_block": 1, "sample_size": 64}
    text = {**SD14_TEXT_ENCODER, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "num_hidden_layers": 2, "projection_dim": 32}
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": SD14_SCHEDULER, "tokenizer": SD14_TOKENIZER}


def _small_qwen2() -> dict[str, Any]:
    return {**QWEN2_0_5B, "hidden_size": 112, "intermediate_size": 96, "num_hidden_layers": 2, "max_window_layers": 2,
            "max_position_embeddings": 1024, "sliding_window": 1024, "vocab_size": QWEN2_TOKENIZER_VOCAB,
            "bos_token_id": 0, "eos_token_id": 0}  # the stand-in tokenizer's "<|endoftext|>"


def _small_clip() -> dict[str, Any]:
    config = vit_b_16_config()
    config["embed_dim"] = 32
    config["vision_cfg"].update(image_size=32, layers=2, width=32, patch_size=16, head_width=16)
    config["text_cfg"].update(width=32, heads=2, layers=2)
    return config


SPECS: dict[str, dict[str, Any]] = {
    "sd14": {"kind": "sd", "config": {"unet": SD14_UNET, "vae": SD14_VAE, "text_encoder": SD14_TEXT_ENCODER,
                                      "scheduler": SD14_SCHEDULER, "tokenizer": SD14_TOKENIZER}},
    "sd14-small": {"kind": "sd", "config": _small_sd()},
    "qwen2-0.5b": {"kind": "qwen2", "config": QWEN2_0_5B},
    "qwen2-0.5b-small": {"kind": "qwen2", "config": _small_qwen2()},
    "vit-b-16": {"kind": "clip", "config": None},  # open_clip's config, read at build time
    "vit-b-16-small": {"kind": "clip", "config": None},
}


def spec_config(name: str) -> Any:
    if name not in SPECS:
        raise ValueError(f"unknown stand-in {name!r}; known: {', '.join(SPECS)}")
    if name == "vit-b-16":
        return vit_b_16_config()
    if name == "vit-b-16-small":
        return _small_clip()
    return SPECS[name]["config"]


def build(name: str, root: Path) -> Path:
    """Build stand-in `name` into `root/name` unless a build of the same config is there; returns the folder."""
    import torch

    config = spec_config(name)
    digest = hashlib.sha256(json.dumps([name, config], sort_keys=True).encode()).hexdigest()[:16]
    out = Path(root) / name
    marker = out / "standin.json"
    if marker.is_file() and json.loads(marker.read_text()).get("config_sha") == digest:
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    {"sd": _build_sd, "qwen2": _build_qwen2, "clip": _build_clip}[SPECS[name]["kind"]](config, out)
    marker.write_text(json.dumps({"name": name, "config_sha": digest, "random_weights": True}, indent=1) + "\n")
    return out


def _build_sd(config: dict[str, dict], out: Path) -> None:
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tinyworld.clip_tokenizer import write_clip_vocab

    vocab = write_clip_vocab(out / "_vocab")
    tokenizer = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), **config["tokenizer"])
    unet = UNet2DConditionModel(**config["unet"])
    vae = AutoencoderKL(**config["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(config["scheduler"]), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    for f in ("vocab.json", "merges.txt"):  # as the hub's tokenizer/ folder holds them, beside tokenizer.json
        (vocab / f).replace(out / "tokenizer" / f)
    (vocab / "tokenizer_config.json").unlink()
    vocab.rmdir()


def tokenizer_corpus() -> list[str]:
    """A deterministic English-like corpus (ARC-style questions) to train the stand-in Qwen2 BPE on."""
    import random

    rng = random.Random(0)
    words = ("which what how why when where the a an of in on to for with is are was be by that this from as at "
             "energy water plant animal cell light heat sound rock soil earth sun moon star force motion mass "
             "temperature weather climate ocean river mineral fossil gene trait organism food chain predator "
             "student teacher experiment observe measure record data graph table answer question best most "
             "likely change increase decrease cause effect result because after before during between").split()
    texts = []
    for i in range(3000):
        n = rng.randint(6, 16)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        texts.append(f"Question: {sentence.capitalize()} {i % 97}?\nAnswer: {rng.choice(words)} {rng.choice(words)}")
    return texts


def _build_qwen2(config: dict[str, Any], out: Path) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tinyworld.qa_lm import TokenizerSettings, train_tokenizer

    settings = TokenizerSettings(vocab_size=QWEN2_TOKENIZER_VOCAB, min_frequency=1, eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
    tokenizer = train_tokenizer(tokenizer_corpus(), settings, model_max_length=32768)
    assert len(tokenizer) <= config["vocab_size"], (len(tokenizer), config["vocab_size"])
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "rope_theta")}
    qwen = Qwen2Config(**fields, rope_parameters={"rope_type": "default", "rope_theta": config["rope_theta"]})
    model = AutoModelForCausalLM.from_config(qwen)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_clip(config: dict[str, Any], out: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    model = open_clip.CLIP(**config) if "custom_text" not in config else open_clip.CustomTextCLIP(**config)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    preprocess = {**OPENAI_PREPROCESS, "size": config["vision_cfg"]["image_size"]}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}, indent=1) + "\n")


# ----------------------------------------------------------------------------- the LoRA layouts the paper states

def sd_lora_layout(unet_config: dict[str, Any], targets=("attn1.to_q", "attn1.to_v", "attn2.to_q", "attn2.to_v")) -> dict[str, tuple[int, int]]:
    """{module: (in, out)} of every target of a UNet config, counted from the config alone (no model):
    one transformer block per layer of each cross-attention block (layers_per_block down, +1 up, 1 mid)."""
    widths = unet_config["block_out_channels"]
    cross = unet_config["cross_attention_dim"]
    blocks: list[int] = []
    for i, kind in enumerate(unet_config["down_block_types"]):
        blocks += [widths[i]] * unet_config["layers_per_block"] * (kind.startswith("CrossAttn"))
    blocks.append(widths[-1])  # UNetMidBlock2DCrossAttn
    for i, kind in enumerate(unet_config["up_block_types"]):
        blocks += [list(reversed(widths))[i]] * (unet_config["layers_per_block"] + 1) * (kind.startswith("CrossAttn"))
    shapes = {"attn1.to_q": lambda c: (c, c), "attn1.to_v": lambda c: (c, c),
              "attn2.to_q": lambda c: (c, c), "attn2.to_v": lambda c: (cross, c)}
    return {f"block{b}.{t}": shapes[t](c) for b, c in enumerate(blocks) for t in targets}


def lora_parameters(layout: dict[str, tuple[int, int]], rank: int) -> int:
    """Parameters of a rank-`rank` LoRA over `layout`: r·(in + out) per matrix."""
    return sum(rank * (n_in + n_out) for n_in, n_out in layout.values())

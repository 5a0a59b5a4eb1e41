"""Is `tiny:shapes-sd` a base worth finetuning? Two measurements, each judged twice.

1. **Prompt following**: for each of the 24 captions ("a red triangle"), generate images and
   read their colour and shape back, (a) with `tiny:shapes-clip` zero-shot over the 24
   captions and (b) with the pixel judge of `shapes_sd.judge_images` (robust to tinted
   backgrounds). Chance: colour 1/8, shape 1/3.
2. **A LoRA matters**: for a colour c, finetune a rank-4 LoRA with the population trainer
   (`DiffusionTrainer.train`, the code every population job runs) on ~20 training images of
   colour c with the empty instance prompt, then generate from the empty prompt with and
   without the LoRA and compare how often colour c appears.

`lol bases evaluate` runs both and writes the figures to a JSON file.

Shapes: I images, H = W = 32 pixels.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.data.shapes import COLORS, SHAPES, ShapesSource
from tinyworld import shapes_clip, shapes_sd

# The empty prompt: the base's unconditional distribution (what classifier-free guidance trained
# it to draw without a caption), where every colour appears about as often as in the data. A
# made-up phrase such as "a shape" is not neutral here: the tiny text encoder maps unseen words
# to one arbitrary colour (measured: "a shape" gives teal/blue in ≥ 92% of images).
NEUTRAL_PROMPT = ""


class ClipJudge:
    """Reads (colour, shape) off images as the nearest of the 24 captions under `tiny:shapes-clip`."""

    def __init__(self, model, preprocess, tokenizer):
        self.model, self.preprocess = model.eval(), preprocess
        self.text = shapes_clip.encode_texts(model, tokenizer, shapes_sd.CAPTIONS)  # (24, D)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> list[tuple[str, str]]:
        pixels = torch.stack([self.preprocess(im) for im in images])  # (I, 3, S, S)
        features = self.model.encode_image(pixels, normalize=True)  # (I, D)
        best = (features @ self.text.T).argmax(dim=1).tolist()
        return [tuple(shapes_sd.CAPTIONS[i].split(" ")[1:]) for i in best]


def pixel_judge(images: Sequence[Image.Image]) -> list[tuple[str, str]]:
    return shapes_sd.judge_images(images)


def prompt_following(pipe, judges: dict[str, Any], samples_per_caption: int = 8, num_inference_steps: int = 20,
                     guidance_scale: float = 4.0, seed: int = 1234) -> dict[str, Any]:
    """Per judge: share of generated images with the prompted colour, shape, and both."""
    images = shapes_sd.sample_captions(pipe, shapes_sd.CAPTIONS, samples_per_caption, num_inference_steps,
                                       guidance_scale, seed)
    wanted = [tuple(c.split(" ")[1:]) for c in shapes_sd.CAPTIONS for _ in range(samples_per_caption)]
    result: dict[str, Any] = {"samples": len(images), "samples_per_caption": samples_per_caption,
                              "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed}
    for name, judge in judges.items():
        got = judge(images)
        result[name] = {
            "color_accuracy": float(np.mean([g[0] == w[0] for g, w in zip(got, wanted)])),
            "shape_accuracy": float(np.mean([g[1] == w[1] for g, w in zip(got, wanted)])),
            "both_accuracy": float(np.mean([g == w for g, w in zip(got, wanted)])),
            "shape_accuracy_by_shape": {
                s: float(np.mean([g[1] == s for g, w in zip(got, wanted) if w[1] == s])) for s in SHAPES
            },
        }
    return result


def colour_examples(colour: str, count: int = 20, seed: int = 0) -> list:
    """`count` training images of one colour, all shapes mixed, drawn with `seed`."""
    pool = [e for e in ShapesSource().examples("train") if e.attributes["color"] == colour]
    if len(pool) < count:
        raise ValueError(f"only {len(pool)} training images are {colour}; asked for {count}")
    return random.Random(f"{colour}-{seed}").sample(pool, count)


def _colour_share(judge, images, colour: str) -> float:
    return float(np.mean([g[0] == colour for g in judge(images)]))


def lora_colour_effect(pipe, judges: dict[str, Any], colours: Sequence[str] = COLORS, images: int = 48,
                       num_inference_steps: int = 20, guidance_scale: float = 4.0, seed: int = 0,
                       lora: dict[str, Any] | None = None, grid: Path | None = None, shown: int = 8) -> dict[str, Any]:
    """For each colour: its share among `images` neutral-prompt generations without and with a LoRA
    finetuned on 20 images of that colour (rank 4, `lora` hyperparameters, ≤ 100 steps).
    `grid`: also save the first `shown` images of each row (no LoRA, then each colour's LoRA) as a PNG."""
    from peft import LoraConfig

    from pipeline.finetune.diffusion import DiffusionTrainer

    hp = {"steps": 100, "learning_rate": 3e-3, "batch_size": 4, "instance_prompt": NEUTRAL_PROMPT, **(lora or {})}
    trainer = DiffusionTrainer(device="cpu")
    trainer.use_pipeline(pipe, ["to_q", "to_v"])

    def generate() -> list[Image.Image]:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(images)]
        return pipe([NEUTRAL_PROMPT] * images, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, generator=generators).images

    base_images = generate()
    base = {name: {c: _colour_share(judge, base_images, c) for c in colours} for name, judge in judges.items()}
    examples = {"no LoRA": base_images[:shown]}
    per_colour = {}
    for colour in colours:
        config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")
        with tempfile.TemporaryDirectory(prefix="lol-lora-effect-") as tmp:
            started = time.perf_counter()
            trainer.train(colour_examples(colour, seed=seed), config, hp, seed, Path(tmp))
            train_seconds = time.perf_counter() - started
            pipe.unet.load_lora_adapter(str(Path(tmp) / "adapter"), weight_name="adapter_model.safetensors",
                                        adapter_name="effect", prefix="base_model.model")
            try:
                adapted = generate()
            finally:
                pipe.unet.unload_lora()  # removes the LoRA layers, not just the adapter
        examples[f"LoRA on {colour}"] = adapted[:shown]
        per_colour[colour] = {"train_seconds": round(train_seconds, 2)}
        for name, judge in judges.items():
            before, after = base[name][colour], _colour_share(judge, adapted, colour)
            per_colour[colour][name] = {"without_lora": before, "with_lora": after,
                                        "ratio": after / before if before else float("inf")}
    if grid is not None:
        save_rows(examples, grid)
    return {"neutral_prompt": NEUTRAL_PROMPT, "images": images, "lora": {"rank": 4, **hp},
            "per_colour": per_colour,
            "min_ratio": {name: min(v[name]["ratio"] for v in per_colour.values()) for name in judges}}


def save_rows(rows: dict[str, list[Image.Image]], path: Path, scale: int = 3) -> Path:
    """A PNG with one labelled row of images per entry of `rows`."""
    from PIL import ImageDraw

    size = max(im.size[0] for images in rows.values() for im in images) * scale
    label_width = 110
    grid = Image.new("RGB", (label_width + size * max(len(v) for v in rows.values()), size * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, r * size + size // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.resize((size, size), Image.NEAREST), (label_width + c * size, r * size))
    grid.save(path)
    return Path(path)


def evaluate_base(pipe, clip_bundle, samples_per_caption: int = 8, effect_images: int = 48,
                  colours: Sequence[str] = COLORS, num_inference_steps: int = 20,
                  lora: dict[str, Any] | None = None, effect_grid: Path | None = None) -> dict[str, Any]:
    """Both measurements, both judges (`clip_bundle` = `shapes_clip.load(...)`)."""
    judges = {"clip": ClipJudge(*clip_bundle), "pixels": pixel_judge}
    started = time.perf_counter()
    following = prompt_following(pipe, judges, samples_per_caption, num_inference_steps)
    effect = lora_colour_effect(pipe, judges, colours, images=effect_images,
                                num_inference_steps=num_inference_steps, lora=lora, grid=effect_grid)
    return {"prompt_following": following, "lora_effect": effect, "seconds": round(time.perf_counter() - started, 1)}

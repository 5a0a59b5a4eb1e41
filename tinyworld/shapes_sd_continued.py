"""`tiny:shapes-sd-continued`: `tiny:shapes-sd`, trained further — a second member of its base family.

The transfer experiment (a predictor trained on LoRAs of one base, tested on LoRAs of a
related base) needs two bases of one family: same architecture, same tokenizer, weights that
differ by more pretraining. This base is the built `tiny:shapes-sd` (full or smoke), trained for
`train.steps` more steps on the same shapes data with its own seed and a lower peak learning
rate, by the very training loop of shapes-sd (`shapes_sd.train_steps`; nothing is copied here).

Recipe: the parent's name, size and **recipe hash** (so a new parent recipe makes a new
continued recipe, and a stale one is refused), the seed, the training section (the parent's,
with steps, lr and warmup replaced) and the evaluation settings. `build()` resolves the parent
through the cache of a store: the `store` argument when the cache passes one, else the store of
`$LOL_STORE` / `./lol-store` (DESIGN §4); the parent is built there first if missing.

Saved as shapes-sd saves itself (`StableDiffusionPipeline.save_pretrained`, float16), so
`load()` and every finetuning / scoring path treat it as any SD-compatible base.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.bases import BaseModelError
from tinyworld import shapes_sd

NAME = "shapes-sd-continued"
KIND = "diffusion"
SIZES = shapes_sd.SIZES
PARENT = shapes_sd.NAME
RECIPE_VERSION = 1
SHIPPED = False  # derived from a shipped base in minutes; not shipped itself (the repository's weight budget)

load = shapes_sd.load  # the same saved format


def recipe_config(size: str) -> dict:
    """The continued-training recipe for `size`: parent recipe hash, seed, train and eval sections."""
    from pipeline.bases.cache import recipe_for

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for base {NAME!r}; valid sizes: {list(SIZES)}")
    parent = recipe_for(PARENT, size)
    full = size == "full"
    train = {**parent.config["train"],
             "steps": 500 if full else 2,  # a third of the parent's 1500: a close but distinct sibling
             "lr": 5e-4,  # a quarter of the parent's peak: continue, do not restart
             "warmup_steps": 25 if full else 1}
    return {
        "name": NAME,
        "size": size,
        "recipe_version": RECIPE_VERSION,
        "parent": {"name": PARENT, "size": size, "recipe_hash": parent.hash},
        "seed": 1,  # the parent's is 0: other minibatches, noise and caption dropout
        "save_dtype": parent.config["save_dtype"],
        "train": train,
        "eval": dict(parent.config["eval"]),
    }


def data_fingerprint() -> str:
    """The same training data as the parent."""
    return shapes_sd.data_fingerprint()


def _check_config(config: dict) -> None:
    missing = sorted({"parent", "seed", "save_dtype", "train", "eval"} - set(config))
    if missing:
        raise ValueError(f"{NAME} config lacks {missing}; start from recipe_config('full')")


def _store(store):
    from storage import Store, resolve_store_url

    return store if isinstance(store, Store) else Store(resolve_store_url(store))


def build(config: dict, out_dir: Path, progress: Callable[[int, int], None] | None = None, store=None) -> dict:
    """Continue training the parent base (resolved in `store`), save to `out_dir`, return metrics.

    store: a `storage.Store`, a store URL, or None for `$LOL_STORE` / `./lol-store`.
    `out_dir` gets the saved pipeline plus `shapes_sd_continued_build.json` (config and metrics).
    """
    from pipeline.bases.cache import ensure_base, recipe_for

    _check_config(config)
    parent = config["parent"]
    current = recipe_for(parent["name"], parent["size"])
    if current.hash != parent["recipe_hash"]:
        raise BaseModelError(
            f"this {NAME} recipe continues tiny:{parent['name']} ({parent['size']}) recipe {parent['recipe_hash']}, "
            f"but the current tiny:{parent['name']} recipe is {current.hash}; build from recipe_config() again")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(config["train"]["threads"]))
    try:
        return _build(config, Path(out_dir), progress, ensure_base(parent["name"], _store(store), size=parent["size"]))
    finally:
        torch.set_num_threads(previous_threads)


def _build(config: dict, out_dir: Path, progress, parent) -> dict:
    started = time.time()
    pipe = shapes_sd.load(parent.path)  # float32, as every user loads it
    noise_scheduler, _ = shapes_sd.make_schedulers(parent.recipe.config)
    images_u8, captions = shapes_sd.load_training_data(parent.recipe.config["resolution"])
    before = {name: _flat(module) for name, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))}
    losses = shapes_sd.train_steps(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, noise_scheduler, images_u8, captions,
                         config["train"], int(config["seed"]), progress)
    train_seconds = time.time() - started
    moved = {name: float((_flat(module) - before[name]).norm() / before[name].norm())
             for name, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))}
    pipe.to(getattr(torch, config["save_dtype"]))
    pipe.save_pretrained(out_dir, safe_serialization=True)

    ev = config["eval"]
    eval_started = time.time()
    quality = shapes_sd.evaluate(load(out_dir), samples_per_caption=ev["samples_per_caption"],
                                 num_inference_steps=ev["num_inference_steps"], guidance_scale=ev["guidance_scale"],
                                 seed=ev["seed"])
    tail = losses[-min(100, len(losses)):]
    metrics: dict[str, Any] = {
        "name": NAME,
        "size": config["size"],
        "parent": {**config["parent"], "folder": parent.recipe.folder, "eval": parent.metrics.get("eval")},
        "steps": len(losses),
        "loss_first": losses[0] if losses else None,
        "loss_last100": sum(tail) / len(tail) if tail else None,
        "relative_weight_change": moved,  # ‖θ − θ_parent‖ / ‖θ_parent‖ per component
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(time.time() - eval_started, 2),
        "eval": {k: v for k, v in quality.items() if k != "per_caption"},
        "eval_per_caption": quality["per_caption"],
    }
    (out_dir / "shapes_sd_continued_build.json").write_text(json.dumps({"config": config, "metrics": metrics}, indent=2))
    return metrics


def _flat(module: torch.nn.Module) -> torch.Tensor:
    """Every parameter of `module`, float64, as one vector."""
    return torch.cat([p.detach().double().flatten() for p in module.parameters()])

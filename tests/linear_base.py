"""A real, minimal base builder used to test the cache: fits a seeded linear map and saves it.

It follows the same module interface as the tiny bases (NAME, KIND, SIZES, recipe_config,
data_fingerprint, build, load), so the cache is exercised without minutes of training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

NAME = "linear"
KIND = "test"
SIZES = ("smoke", "full")
BUILDS: list[str] = []  # every build appends its output folder, so tests can count builds


def recipe_config(size: str) -> dict:
    return {"features": 4 if size == "smoke" else 16, "steps": 20, "seed": 0}


def data_fingerprint() -> str:
    return "synthetic-linear-v1"


def build(config: dict, out_dir: Path, progress=None) -> dict:
    torch.manual_seed(config["seed"])
    x = torch.randn(64, config["features"])
    target = x @ torch.randn(config["features"], 1)
    weight = torch.zeros(config["features"], 1, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for step in range(config["steps"]):
        loss = ((x @ weight - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress:
            progress(step + 1, config["steps"])
    save_file({"weight": weight.detach()}, str(out_dir / "model.safetensors"))
    BUILDS.append(str(out_dir))
    return {"final_loss": round(float(loss.detach()), 6)}


def load(path: Path) -> torch.Tensor:
    return load_file(str(path / "model.safetensors"))["weight"]

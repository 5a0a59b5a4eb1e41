"""Validation sweep of GL-net settings on tiny-shapes' clip_score (model selection on validation only).

Usage: python bench/selection/glnet_clip_score.py STORE/published/tiny-shapes [THREADS]
Prints one JSON line per setting: mean validation R² over seeds 0-2 (no test metric: the test split is
scored once, by `lol evaluate`, after the choice; issue #21).
"""

import json
import sys
import time
from dataclasses import replace

import torch

from lol_models.tasks import labeled_for, load_splits, tasks_of
from lol_models.train import TrainConfig, fit

CANDIDATES = [  # (model, model config, training overrides)
    ("glnet", {}, {}),
    ("glnet", {}, {"lr": 3e-3}),
    ("glnet", {}, {"epochs": 150}),
    ("glnet", {"hidden": (32, 32)}, {}),
    ("glnet", {"normalize_input": False}, {}),
    ("glnet", {"cross_layer": False}, {}),
    ("glnet", {"head": (64, 64)}, {"lr": 3e-3, "epochs": 100}),
    ("glnet", {"hidden": (16,)}, {}),
    ("mlp_oalign", {}, {}),
    ("transformer", {}, {}),
]


def main() -> None:
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    splits = load_splits(sys.argv[1])
    task = next(t for t in tasks_of(splits["train"]) if "clip_score" in t.name)
    data = {n: labeled_for(splits[n], task) for n in ("train", "validation")}
    for name, model_cfg, train_cfg in CANDIDATES:
        started = time.perf_counter()
        config = TrainConfig(task="regression", **{"epochs": 50, "lr": 1e-3, **train_cfg})
        runs = [fit(name, data["train"], data["validation"], model_config=model_cfg or None, config=replace(config, seed=s))
                for s in (0, 1, 2)]
        val = sum(r.val["r2"] for r in runs) / len(runs)
        print(json.dumps({"model": name, "model_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in model_cfg.items()},
                          "train": train_cfg, "val_r2": round(val, 3), "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()

"""Validation sweep of GL-net settings on tiny-shapes' clip_score (model selection on validation only).

Usage: python bench/selection/glnet_clip_score.py STORE/published/tiny-shapes [THREADS]
Prints one JSON line per setting: mean validation and test R² over seeds 0-2.
"""

import json
import sys
import time

import torch

from lol_models.tasks import labeled_for, load_splits, tasks_of
from lol_models.train import TrainConfig, run_seeds

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
    data = {n: labeled_for(s, task) for n, s in splits.items()}
    for name, model_cfg, train_cfg in CANDIDATES:
        started = time.perf_counter()
        config = TrainConfig(task="regression", **{"epochs": 50, "lr": 1e-3, **train_cfg})
        summary = run_seeds(name, data["train"], data["validation"], data["test"], seeds=(0, 1, 2),
                            model_config=model_cfg or None, config=config)
        val = sum(r.val["r2"] for r in summary.results) / len(summary.results)
        print(json.dumps({"model": name, "model_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in model_cfg.items()},
                          "train": train_cfg, "val_r2": round(val, 3), "test_r2": round(summary.mean["r2"], 3),
                          "test_r2_std": round(summary.std["r2"], 3), "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()

"""Model selection for GL-net's input normalisation on every task of each published folder given:
GL-net with and without `normalize_input`, next to the MLP and MLP+O-Align; 3 seeds; mean
validation and test main metric (R² or ROC-AUC), one JSON line per (task, model).

Usage: python bench/selection/glnet_normalize_input.py STORE/published/tiny-shapes STORE/published/tiny-arc
"""

import json
import sys
import time

import torch

from lol_models.experiments import MAIN_METRIC, _labeled, load_splits, tasks_of
from lol_models.train import TrainConfig, run_seeds

MODELS = [("glnet", {"normalize_input": True}), ("glnet", {"normalize_input": False}), ("mlp", None), ("mlp_oalign", None)]


def main() -> None:
    torch.set_num_threads(1)
    for path in sys.argv[1:]:
        splits = load_splits(path)
        for task in tasks_of(splits["train"]):
            data = {n: _labeled(s, task) for n, s in splits.items()}
            metric = MAIN_METRIC[task.kind]
            for name, model_cfg in MODELS:
                started = time.perf_counter()
                summary = run_seeds(name, data["train"], data["validation"], data["test"], seeds=(0, 1, 2),
                                    model_config=model_cfg, config=TrainConfig(task=task.kind, epochs=50, lr=1e-3))
                val = sum(r.val[metric] for r in summary.results) / len(summary.results)
                print(json.dumps({"data": path.rstrip("/").split("/")[-1], "task": task.name, "model": name, "cfg": model_cfg,
                                  f"{metric}_val": round(val, 3), f"{metric}_test": round(summary.mean[metric], 3),
                                  "std": round(summary.std[metric], 3), "s": round(time.perf_counter() - started)}), flush=True)


if __name__ == "__main__":
    main()

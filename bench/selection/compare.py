"""Model selection on validation: every task of each published folder × candidate (model, config).

One JSON line per (folder, task, candidate): the main metric (R² or ROC-AUC) averaged over
seeds 0-2 on validation (what a choice may rest on) and on test (reported, never chosen on).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from lol_models.tasks import MAIN_METRIC, labeled_for, load_splits, tasks_of
from lol_models.train import TrainConfig, run_seeds

Candidate = tuple[str, dict[str, Any] | None]  # (model name, model config or None for its defaults)


def compare(paths: Sequence[str], candidates: Sequence[Candidate], epochs: int = 50, lr: float = 1e-3,
            seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    for path in paths:
        splits = load_splits(path)
        for task in tasks_of(splits["train"]):
            data = {n: labeled_for(s, task) for n, s in splits.items()}
            metric = MAIN_METRIC[task.kind]
            for name, model_cfg in candidates:
                started = time.perf_counter()
                summary = run_seeds(name, data["train"], data["validation"], data["test"], seeds=seeds,
                                    model_config=model_cfg, config=TrainConfig(task=task.kind, epochs=epochs, lr=lr))
                val = sum(r.val[metric] for r in summary.results) / len(summary.results)
                print(json.dumps({"data": path.rstrip("/").split("/")[-1], "task": task.name, "model": name, "cfg": model_cfg,
                                  f"{metric}_val": round(val, 3), f"{metric}_test": round(summary.mean[metric], 3),
                                  "std": round(summary.std[metric], 3), "s": round(time.perf_counter() - started)}), flush=True)

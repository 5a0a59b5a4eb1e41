"""Model selection on validation: every task of each published folder × candidate (model, config).

One JSON line per (folder, task, candidate): the main metric (R² or ROC-AUC) averaged over
seeds 0-2 on validation — what a choice may rest on. No test metric is computed here: the test
split is scored once, by `lol evaluate`, after the choice (issue #21). Splits are the protocol's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from lol_models.tasks import MAIN_METRIC, labeled_for, load_splits, tasks_of
from lol_models.train import TrainConfig, fit

Candidate = tuple[str, dict[str, Any] | None]  # (model name, model config or None for its defaults)


def compare(paths: Sequence[str], candidates: Sequence[Candidate], epochs: int = 50, lr: float = 1e-3,
            seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    for path in paths:
        splits = load_splits(path)
        for task in tasks_of(splits["train"]):
            data = {n: labeled_for(splits[n], task) for n in ("train", "validation")}
            metric = MAIN_METRIC[task.kind]
            for name, model_cfg in candidates:
                started = time.perf_counter()
                config = TrainConfig(task=task.kind, epochs=epochs, lr=lr)
                runs = [fit(name, data["train"], data["validation"], model_config=model_cfg, config=replace(config, seed=s))
                        for s in seeds]
                vals = [r.val[metric] for r in runs]
                print(json.dumps({"data": path.rstrip("/").split("/")[-1], "task": task.name, "model": name, "cfg": model_cfg,
                                  f"{metric}_val": round(sum(vals) / len(vals), 3),
                                  "best_epochs": [r.best_epoch for r in runs], "s": round(time.perf_counter() - started)}), flush=True)

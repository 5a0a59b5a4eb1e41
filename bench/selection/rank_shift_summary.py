"""Summarise a `lol experiment ranks` result for docs/results.md: per task and predictor the test
metrics on the seen and unseen ranks (mean ± std over seeds, paired bootstrap 95% CI), the config
selection chose, GL-net − each predictor, and for regression R² against the training-set variance
(1 − MSE / Var of the target over the training rows of the training ranks): the unseen rank's own
variance differs from the training ranks' (tiny-shapes-rank-shift's CLIP-score spread grows with rank),
so plain R² on an unseen rank mixes the model's error with that set's spread.

Usage: python bench/selection/rank_shift_summary.py RANK_GENERALISATION_JSON [PUBLISHED_FOLDER]
(PUBLISHED_FOLDER defaults to the one the experiment read.)
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from lol_models.rank_generalisation import rank_sets
from lol_models.shift import labeled
from lol_models.tasks import load_splits, tasks_of


def training_variance(published: str, record: dict) -> dict[str, float]:
    """Task → variance of its targets (mean over columns) on the rows the final runs trained on."""
    splits = load_splits(published, "protocol")
    train, rows = rank_sets(splits, record["train_ranks"], record["test_ranks"], None)["train"]
    return {task.name: float(labeled(train, task, rows).targets.double().var(0, unbiased=False).mean())
            for task in tasks_of(splits["train"]) if task.kind == "regression"}


def main(path: str, published: str | None = None) -> None:
    record = json.loads(open(path).read())
    variance = training_variance(published or record["published"], record)
    print(f"train ranks {record['train_ranks']} → test {record['test_ranks']}, select on {record.get('select_on_rank')}, "
          f"rows {record['rows']}")
    for name, task in record["tasks"].items():
        metrics = [task["metric"], task["second_metric"]] + (["spearman_rho"] if task["metric"] == "r2" else [])
        print(f"== {name}" + (f" (training-set variance {variance[name]:.3f})" if name in variance else ""))
        for predictor, result in task["predictors"].items():
            chosen = result["selection"]["trials"][result["selection"]["chosen"]]
            print(f"  {predictor}: chosen config {result['selection']['chosen']} (validation {chosen['val_score']:.3f}): "
                  f"{json.dumps(chosen['candidate'])}")
            for test in ("seen", "unseen"):
                summary = result["tests"][test]
                cells = [f"{m} {summary['mean'][m]:.3f} ± {summary['std'][m]:.3f} "
                         f"[{summary['ci'][m]['low']:.3f}, {summary['ci'][m]['high']:.3f}]" for m in metrics]
                if name in variance:
                    r2_train = [1.0 - seed["tests"][test]["mse"] / variance[name] for seed in result["per_seed"]]
                    cells.append(f"r2_train_var {np.mean(r2_train):.3f} ± {np.std(r2_train):.3f}")
                print(f"    {test} (n={summary['n']}): " + "; ".join(cells))
        for test in ("seen", "unseen"):
            for other, differences in task["difference"][test]["vs"].items():
                print(f"  GL-net − {other} on {test}: " + "; ".join(
                    f"{m} {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" for m, d in differences.items()))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:3])

"""Transfer across a base-model family: train on population A, test on population B.

A and B are published populations of LoRAs of two related bases with the same architecture
(`tiny-shapes` on `tiny:shapes-sd`, `tiny-shapes-continued` on `tiny:shapes-sd-continued`): the
same layers, so a predictor trained on A's LoRAs reads B's. Each predictor × task is trained on
A's train split (epoch picked on A's validation split) over seeds and scored on B's test split,
and on A's own test split for reference.

Outputs in `out_dir`:
    transfer.json    settings, both folders, row counts, per task × predictor: mean ± std over seeds
                     of every test metric on `a_test` and `b_test`, and per seed
    transfer.png     test metric per predictor, A's test split vs B's, one panel per task

Shape legend: N LoRAs, r rank (both populations zero-padded to the larger).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lol_models.data import PulledDataError, read_layout
from lol_models.shift import labeled, metric_of, shift_bars, shift_experiment
from lol_models.tasks import LearnSettings, jsonable, load_splits, tasks_of
from lol_models.weights import Layout

__all__ = ["Transfer", "train_on_a_test_on_b"]

RESULTS_FILE = "transfer.json"
FIGURE_FILE = "transfer.png"


@dataclass
class Transfer:
    """What `train_on_a_test_on_b` measured; `tasks` as in transfer.json."""

    published_a: str
    published_b: str
    rows: dict[str, int]  # train, validation, a_test, b_test
    tasks: dict[str, Any] = field(default_factory=dict)
    skipped_tasks: dict[str, str] = field(default_factory=dict)  # task → why it was not run
    results_path: Path | None = None
    figure_path: Path | None = None

    def metric(self, task: str, predictor: str, test: str = "b_test", metric: str | None = None) -> tuple[float, float]:
        """(mean, std) over seeds of `metric` (default: the task's main metric) on `test`."""
        return metric_of(self.tasks, task, predictor, test, metric)


def train_on_a_test_on_b(published_a: str | Path, published_b: str | Path, settings: LearnSettings,
                         out_dir: str | Path, model_configs: Mapping[str, Any] | None = None,
                         on_run: Callable[[str, str], None] | None = None, split: str = "protocol",
                         workers: int = 1) -> Transfer:
    """Train every predictor × task on A (train/validation), score on B's test split and A's.

    split: "protocol" (default) — both populations re-split by group name (`lol_models.splits`), so B's test
    split holds the twins of A's test LoRAs whatever either was published with; "published" — as published.
    Tasks are A's (filtered by `settings.targets`); a task whose label columns B lacks is skipped
    and listed in `skipped_tasks`. A and B must have the same layers (names and shapes); ranks may
    differ. workers: predictor × task units trained at once, in processes (`shift_experiment`).
    Writes transfer.json and transfer.png in `out_dir`.
    """
    layout_a, layout_b = (Layout.from_published(read_layout(p)[0]) for p in (published_a, published_b))
    if not layout_a.same_layers(layout_b):
        raise PulledDataError(f"{published_b}'s LoRAs do not have {published_a}'s layers, so a predictor trained on "
                              f"one cannot read the other: {layout_a.describe_difference(layout_b)}")
    a = load_splits(published_a, split)
    b_test = load_splits(published_b, split, needed=("test",))["test"]  # B may hold its test groups alone
    tasks, skipped = [], {}
    for task in tasks_of(a["train"], settings.targets):
        missing = [c for c in task.columns if c not in b_test.labels]
        if missing:
            skipped[task.name] = f"{published_b} lacks label column(s) {missing}; it has {b_test.label_names}"
        else:
            tasks.append(task)
    if not tasks:
        raise PulledDataError(f"no task of {published_a} has its labels in {published_b}: {skipped}")
    sets = _sets(tasks, a, b_test)
    results = shift_experiment(tasks, sets, settings, model_configs=model_configs, on_run=on_run, workers=workers,
                               load_sets=functools.partial(_load_sets, published_a, published_b, split, tuple(tasks)))

    rows = {"train": len(a["train"]), "validation": len(a["validation"]), "a_test": len(a["test"]), "b_test": len(b_test)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outcome = Transfer(str(published_a), str(published_b), rows, results, skipped)
    record = {"experiment": "transfer", "published_a": str(published_a), "published_b": str(published_b),
              "rows": rows, "skipped_tasks": skipped, "settings": settings.as_json(), "tasks": results}
    outcome.results_path = out / RESULTS_FILE
    outcome.results_path.write_text(json.dumps(record, indent=1, default=jsonable) + "\n")
    outcome.figure_path = shift_bars(results, ["a_test", "b_test"], ["A's test split (same base)", "B's test split (other base)"],
                                     out / FIGURE_FILE, "Transfer: trained on A, tested on A and B (mean ± std over seeds)")
    return outcome


def _sets(tasks, a, b_test) -> dict[str, dict[str, Any]]:
    return {task.name: {"train": labeled(a["train"], task), "validation": labeled(a["validation"], task),
                        "a_test": labeled(a["test"], task), "b_test": labeled(b_test, task)} for task in tasks}


def _load_sets(published_a: str | Path, published_b: str | Path, split: str, tasks: tuple) -> dict[str, dict[str, Any]]:
    """The experiment's sets, built in a worker process from the two published folders."""
    return _sets(tasks, load_splits(published_a, split), load_splits(published_b, split, needed=("test",))["test"])

"""The main experiment: every predictor × every target task of a published population.

Tasks come from the dataset's `labels.json`: a scorer whose labels are all 0/1 is one
multilabel task (attributes, membership, sources); every other label column is its own
regression task (clip_score, acc, eval_loss). Each (predictor, task) is trained over seeds
with `run_seeds`; the test score is taken at the best-validation epoch.

Outputs in `out_dir`:
    runs/{predictor}--{task}.json     # per seed: best epoch, val/test metrics; seed 0's test predictions
    results.json, results.md          # `evaluate`: mean ± std table
    report.md, figures/*.png          # `lol_models.report.report`
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lol_models.data import PulledDataError
from lol_models.tasks import (
    MAIN_METRIC,
    SECOND_METRIC,
    LearnSettings,
    Task,
    jsonable,
    labeled_for,
    load_splits,
    predictor_order,
    tasks_of,
)
from lol_models.train import TrainConfig, predict, run_seeds

__all__ = ["MAIN_METRIC", "SECOND_METRIC", "LearnSettings", "Task", "Results", "evaluate", "load_splits",
           "results_markdown", "tasks_of", "train_all"]

def train_all(published: str | Path, settings: LearnSettings, out_dir: str | Path,
              on_run: Callable[[str, str], None] | None = None) -> list[Path]:
    """Train every predictor on every task over seeds; one JSON per (predictor, task)."""
    out = Path(out_dir) / "runs"
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(published)
    written = []
    for task in tasks_of(splits["train"], settings.targets):
        data = {name: labeled_for(split, task) for name, split in splits.items()}
        for predictor in settings.predictors:
            started = time.perf_counter()
            config = TrainConfig(task=task.kind, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.learning_rate)
            try:
                summary = run_seeds(predictor, data["train"], data["validation"], data["test"],
                                    seeds=tuple(range(settings.seeds)), config=config)
            except ValueError as exc:  # e.g. mlp_dense over its memory budget: recorded, not fatal
                record = {"predictor": predictor, "task": asdict(task), "error": str(exc)}
            else:
                first = summary.results[0]
                with torch.no_grad():
                    predicted = predict(first.model, splits["test"].weights)
                if task.kind == "regression":
                    predicted = predicted * first.target_std + first.target_mean
                record = {
                    "predictor": predictor, "task": asdict(task), "seeds": settings.seeds,
                    "mean": summary.mean, "std": summary.std,
                    "per_seed": [{"seed": r.seed, "best_epoch": r.best_epoch, "val": r.val, "test": r.test} for r in summary.results],
                    "test_predictions": predicted.tolist(), "test_targets": data["test"].targets.tolist(),
                    "parameters": sum(p.numel() for p in first.model.parameters()),
                }
            record["seconds"] = round(time.perf_counter() - started, 2)
            path = out / f"{predictor}--{task.name}.json"
            path.write_text(json.dumps(record, indent=1, default=jsonable) + "\n")
            written.append(path)
            if on_run is not None:
                on_run(predictor, task.name)
    return written


@dataclass
class Results:
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {kind, columns, predictors: {name: record}}


def evaluate(out_dir: str | Path) -> Results:
    """Collect runs/*.json into results.json and results.md (mean ± std over seeds)."""
    out = Path(out_dir)
    runs = sorted((out / "runs").glob("*.json"))
    if not runs:
        raise PulledDataError(f"no trained predictors in {out / 'runs'}; run `lol train` first")
    results = Results()
    for path in runs:
        record = json.loads(path.read_text())
        task = record["task"]
        entry = results.tasks.setdefault(task["name"], {"kind": task["kind"], "columns": task["columns"], "predictors": {}})
        entry["predictors"][record["predictor"]] = record
    (out / "results.json").write_text(json.dumps(results.tasks, indent=1) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    return results


def _cell(record: dict[str, Any], metric: str) -> str:
    if "error" in record:
        return "— (" + record["error"].split(";")[0][:60] + ")"
    mean, std = record["mean"].get(metric), record["std"].get(metric)
    if mean is None:
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}"


def results_markdown(results: Results) -> str:
    predictors = sorted({p for t in results.tasks.values() for p in t["predictors"]}, key=predictor_order)
    lines = ["| task | kind | metric | " + " | ".join(predictors) + " |", "|---|---|---|" + "---|" * len(predictors)]
    for name, task in sorted(results.tasks.items()):
        for metric in (MAIN_METRIC[task["kind"]], SECOND_METRIC[task["kind"]]):
            cells = [_cell(task["predictors"][p], metric) if p in task["predictors"] else "" for p in predictors]
            lines.append(f"| {name} | {task['kind']} | {metric} | " + " | ".join(cells) + " |")
    seeds = {r.get("seeds") for t in results.tasks.values() for r in t["predictors"].values() if "seeds" in r}
    return ("Test metrics at the best-validation epoch, mean ± std over "
            f"{', '.join(str(s) for s in sorted(seeds))} seed(s).\n\n" + "\n".join(lines) + "\n")



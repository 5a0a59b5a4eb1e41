"""The main experiment: every predictor × every target task of a published population.

Tasks come from the dataset's `labels.json`: a scorer whose labels are all 0/1 is one
multilabel task (attributes, membership, sources); every other label column is its own
regression task (clip_score, acc, eval_loss). Each (predictor, task) is trained under the
protocol (`lol_models.protocol`): the same tuning budget for every predictor, chosen on validation
only, then `seeds` final trainings whose test predictions `evaluate` scores, once, with paired
bootstrap CIs (`lol_models.evaluation`). Splits are the protocol's, by group name (`lol_models.splits`).

Outputs in `out_dir`:
    runs/{predictor}--{task}.json     # selection trials (validation scores), chosen config, per seed: best
                                      # epoch and validation metrics; test job ids and every seed's test
                                      # predictions — no test label, no test metric
    predictors/{predictor}--{task}--seed{s}.{json,safetensors}  # each trained model, for `lol predict`
                                      # (lol_models/predictors.py)
    results.json, results.md          # `evaluate`: test metrics, mean ± std over seeds, bootstrap CIs,
                                      # differences GL-net − each predictor
    report.md, figures/*.png          # `lol_models.report.report`
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lol_models import evaluation
from lol_models.data import read_layout, read_rows, split_names
from lol_models.predictors import remove_saved, save_predictor
from lol_models.protocol import tune_and_train
from lol_models.tasks import (
    MAIN_METRIC,
    SECOND_METRIC,
    LearnSettings,
    Task,
    jsonable,
    labeled_for,
    load_splits,
    tasks_of,
)

__all__ = ["MAIN_METRIC", "SECOND_METRIC", "LearnSettings", "Task", "Results", "evaluate", "load_splits",
           "results_markdown", "tasks_of", "train_all"]


def train_all(published: str | Path, settings: LearnSettings, out_dir: str | Path,
              on_run: Callable[[str, str], None] | None = None) -> list[Path]:
    """Train every predictor on every task under the protocol; one JSON per (predictor, task).

    Reads the training and validation labels, and only the weights and job ids of the test split.
    """
    out = Path(out_dir) / "runs"
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(published, settings.split)
    test = splits["test"]
    published_layout, label_info = read_layout(published)
    facts = training_facts(published)
    written = []
    for task in tasks_of(splits["train"], settings.targets):
        train, validation = labeled_for(splits["train"], task), labeled_for(splits["validation"], task)
        for predictor in settings.predictors:
            started = time.perf_counter()
            remove_saved(out_dir, predictor, task.name)
            record: dict[str, Any] = {"predictor": predictor, "task": asdict(task), "published": str(published),
                                      "split": settings.split, "settings": settings.as_json()}
            try:
                trained = tune_and_train(predictor, task.kind, train, validation, test.weights, settings)
            except ValueError as exc:  # e.g. mlp_dense over its memory budget: recorded, not fatal
                record["error"] = str(exc)
            else:
                record.update(_trained_record(trained, train, settings))
                for result in trained.runs:
                    save_predictor(out_dir, predictor=predictor, seed=result.seed, task=asdict(task), model=result.model,
                                   model_config=trained.model_config, labels=label_info, published_layout=published_layout,
                                   facts=facts, target_mean=result.target_mean, target_std=result.target_std,
                                   metrics={"best_epoch": result.best_epoch, "val": result.val})
                record["test_job_ids"] = list(test.job_ids)
            record["seconds"] = round(time.perf_counter() - started, 2)
            path = out / f"{predictor}--{task.name}.json"
            path.write_text(json.dumps(record, indent=1, default=jsonable) + "\n")
            written.append(path)
            if on_run is not None:
                on_run(predictor, task.name)
    return written


def _trained_record(trained, train, settings: LearnSettings) -> dict[str, Any]:
    """The run JSON's protocol part: selection, chosen config, per-seed validation, test predictions."""
    cfg = trained.train_config
    record = {
        "selection": trained.selection.as_dict(),
        "config": {"model": trained.model_config,
                   "train": {k: getattr(cfg, k) for k in ("lr", "weight_decay", "batch_size", "grad_clip", "epochs",
                                                           "min_epochs", "smooth", "select_by")}},
        "seeds": settings.seeds,
        "per_seed": [{"seed": r.seed, "best_epoch": r.best_epoch, "val": r.val} for r in trained.runs],
        "test_predictions": trained.test_predictions.tolist(),
        "parameters": sum(p.numel() for p in trained.runs[0].model.parameters()),
    }
    if cfg.task == "regression":
        record["train_target_variance"] = train.targets.double().var(0, unbiased=False).tolist()
    return record


def training_facts(published: str | Path) -> dict[str, Any]:
    """What the rows of a published population share, which a LoRA must match to be predicted:
    population, base (reference, revision), target modules, and the ranks and alphas they hold."""
    columns = ["population", "base_ref", "base_revision", "target_modules", "rank", "alpha"]
    rows = [row for split in split_names(published) for row in read_rows(published, split, columns=columns, strict=False)]
    return {
        "population": sorted({r["population"] for r in rows if r.get("population")}),
        "base_ref": sorted({r["base_ref"] for r in rows if r.get("base_ref")}),
        "base_revision": sorted({r["base_revision"] for r in rows if r.get("base_revision")}),
        "target_modules": sorted({m for r in rows for m in r.get("target_modules") or []}),
        "ranks": sorted({int(r["rank"]) for r in rows}), "alphas": sorted({float(r["alpha"]) for r in rows}),
    }


@dataclass
class Results:
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {kind, columns, predictors: {name: record}}


def evaluate(out_dir: str | Path, published: str | Path | None = None) -> Results:
    """Score the runs in `out_dir` on their test labels (the only place they are read): results.json and
    results.md with mean ± std over seeds, paired bootstrap 95% CIs and GL-net − each predictor."""
    return Results(evaluation.evaluate_runs(out_dir, published))


def results_markdown(results: Results) -> str:
    return evaluation.results_markdown(results.tasks)

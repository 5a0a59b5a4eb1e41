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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lol_models import evaluation
from lol_models.common import SettingsError
from lol_models.data import published_fingerprint, read_layout, read_rows, split_names
from lol_models.parallel import run_units
from lol_models.predictors import PREDICTORS_DIR, remove_saved, save_predictor, saved_stem
from lol_models.protocol import tune_and_train, tuning_pool
from lol_models.registry import MODELS
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
              on_run: Callable[[str, str], None] | None = None, workers: int = 1, resume: bool = True) -> list[Path]:
    """Train every predictor on every task under the protocol; one JSON per (predictor, task), in
    task × predictor order.

    Reads the training and validation labels, and only the weights and job ids of the test split.
    `workers` > 1 trains that many (predictor, task) units at once in spawned processes, each with
    cores / workers torch threads; every unit is seeded, so the runs are those one process trains,
    up to float rounding of the thread count. `on_run(predictor, task)` follows each finished unit.
    `resume`: a unit whose run file is already there — trained with the same settings (whichever other
    predictors and targets that run had) on the same published rows (`published_fingerprint`), from the same
    pool of configs (`tuning_pool`: the predictor's defaults and search space), without error, every seed's
    model saved — is kept, not trained again, so an interrupted `lol train` goes on where it stopped.
    """
    (Path(out_dir) / "runs").mkdir(parents=True, exist_ok=True)
    context = _UnitContext.load(published, settings)
    units = [(task, predictor) for task in tasks_of(context.splits["train"], settings.targets)
             for predictor in settings.predictors]
    written: dict[int, Path] = {}

    def finished(i: int, path: Path) -> None:
        written[i] = path
        if on_run is not None:
            on_run(units[i][1], units[i][0].name)

    for i, (task, predictor) in enumerate(units):
        if resume and (kept := _finished_run(context, out_dir, task, predictor)) is not None:
            finished(i, kept)
    todo = [i for i in range(len(units)) if i not in written]
    if workers <= 1 or len(todo) <= 1:
        for i in todo:
            finished(i, _train_unit(context, out_dir, *units[i]))
    else:
        del context  # each worker loads its own; the parent's copy of the weights would only add to the peak
        run_units([(out_dir, *units[i]) for i in todo], _train_unit_in_worker, workers, _start_worker,
                  (published, settings), lambda k, path: finished(todo[k], path),
                  costs=[MODELS[units[i][1]].unit_cost for i in todo])
    return [written[i] for i in range(len(units))]


def _finished_run(context: _UnitContext, out_dir: str | Path, task: Task, predictor: str) -> Path | None:
    """The run file of (predictor, task) if it can be kept (see `train_all`'s `resume`), else None."""
    path = Path(out_dir) / "runs" / f"{predictor}--{task.name}.json"
    if context.fingerprint is None or not path.is_file():
        return None
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = (isinstance(run, dict) and "error" not in run and run.get("published_fingerprint") == context.fingerprint
            and isinstance(run.get("settings"), dict) and _unit_settings(run["settings"]) == _unit_settings(context.settings.as_json())
            and run.get("task") == json.loads(json.dumps(asdict(task), default=jsonable))
            and run.get("tuning") is not None
            and run.get("tuning") == _jsonable(lambda: tuning_pool(predictor, task.kind, context.settings)))
    saved = Path(out_dir) / PREDICTORS_DIR
    complete = all((saved / f"{saved_stem(predictor, task.name, seed)}{suffix}").is_file()
                   for seed in range(context.settings.seeds) for suffix in (".json", ".safetensors"))
    return path if same and complete else None


def _jsonable(make: Callable[[], Any]) -> Any:
    """make() as the run file stores it (tuples as lists, dtypes as text); None if make() raises SettingsError."""
    try:
        return json.loads(json.dumps(make(), default=jsonable))
    except SettingsError:
        return None


def _unit_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The learn settings one unit's training depends on: all but which predictors and targets the run trains and
    the widened search spaces (`search`; the unit's own is compared exactly through its tuning pool)."""
    return {k: v for k, v in json.loads(json.dumps(settings, default=jsonable)).items()
            if k not in ("predictors", "targets", "search")}


@dataclass
class _UnitContext:
    """What every (predictor, task) unit of one `train_all` reads: the splits and the published facts."""

    published: str | Path
    settings: LearnSettings
    splits: dict[str, Any]
    published_layout: Any
    label_info: Any
    facts: dict[str, Any]
    fingerprint: str | None  # `published_fingerprint`

    @classmethod
    def load(cls, published: str | Path, settings: LearnSettings) -> _UnitContext:
        splits = load_splits(published, settings.split)
        # `lol train` never holds a test label: it predicts the test rows from their weights, and `lol evaluate`
        # alone reads their labels. Selection code that reached for them fails here, not in review.
        splits["test"] = replace(splits["test"], labels={})
        published_layout, label_info = read_layout(published)
        return cls(published, settings, splits, published_layout, label_info, training_facts(published),
                   published_fingerprint(published))


_worker_context: _UnitContext | None = None  # a `train_all` worker process's context, loaded once


def _start_worker(published: str | Path, settings: LearnSettings, threads: int) -> None:
    import torch

    global _worker_context
    torch.set_num_threads(threads)
    _worker_context = _UnitContext.load(published, settings)


def _train_unit_in_worker(out_dir: str | Path, task: Task, predictor: str) -> Path:
    assert _worker_context is not None, "a train_all worker runs _start_worker first"
    return _train_unit(_worker_context, out_dir, task, predictor)


def _train_unit(context: _UnitContext, out_dir: str | Path, task: Task, predictor: str) -> Path:
    """Tune and train `predictor` on `task`, save its final models and write runs/{predictor}--{task}.json."""
    settings, test = context.settings, context.splits["test"]
    train, validation = labeled_for(context.splits["train"], task), labeled_for(context.splits["validation"], task)
    started = time.perf_counter()
    remove_saved(out_dir, predictor, task.name)
    record: dict[str, Any] = {"predictor": predictor, "task": asdict(task), "published": str(context.published),
                              "published_fingerprint": context.fingerprint, "split": settings.split,
                              "settings": settings.as_json()}
    try:
        record["tuning"] = tuning_pool(predictor, task.kind, settings)  # e.g. a budget larger than the space: this unit's error
        trained = tune_and_train(predictor, task.kind, train, validation, test.weights, settings)
    except ValueError as exc:  # e.g. mlp_dense over its memory budget: recorded, not fatal
        record["error"] = str(exc)
    else:
        record.update(_trained_record(trained, train, settings))
        for result in trained.runs:
            save_predictor(out_dir, predictor=predictor, seed=result.seed, task=asdict(task), model=result.model,
                           model_config=trained.model_config, labels=context.label_info,
                           published_layout=context.published_layout, facts=context.facts,
                           target_mean=result.target_mean, target_std=result.target_std,
                           metrics={"best_epoch": result.best_epoch, "val": result.val})
        record["test_job_ids"] = list(test.job_ids)
    record["seconds"] = round(time.perf_counter() - started, 2)
    path = Path(out_dir) / "runs" / f"{predictor}--{task.name}.json"
    path.write_text(json.dumps(record, indent=1, default=jsonable) + "\n")
    return path


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

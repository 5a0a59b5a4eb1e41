"""Train on one distribution of LoRAs, test on others: the core of the rank and transfer experiments.

`train_and_test` trains one predictor on one task as the main experiment does (`lol_models.protocol`):
unless a config is given, the same tuning budget from the predictor's own search space, chosen on the
validation set only, then `seeds` final trainings with the epoch rule; every named test set is scored
after that. `shift_experiment` runs it for every predictor × task and adds, per test set, paired bootstrap
95% CIs over its LoRAs and the CIs of GL-net − each predictor (`lol_models.bootstrap`); `shift_bars` draws
test metric per predictor, one bar per test set, one panel per task.

Shape legend
    N LoRAs in a set, T targets (regression) / K labels (multilabel), r rank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lol_models.bootstrap import bootstrap_table
from lol_models.data import LoraDataset, PulledDataError
from lol_models.parallel import run_units
from lol_models.protocol import select_config, train_config
from lol_models.registry import MODELS, config_for
from lol_models.search import Candidate
from lol_models.tasks import MAIN_METRIC, SECOND_METRIC, LearnSettings, Task, predictor_order
from lol_models.train import LabeledLoras, evaluate, fit, predict

__all__ = ["labeled", "mean_std", "metric_of", "shift_bars", "shift_experiment", "train_and_test"]


def mean_std(per_seed: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample std (ddof=1; 0 for one seed) of every metric over seeds, NaNs left out."""
    keys = [k for k in per_seed[0] if all(k in m for m in per_seed)]
    mean, std = {}, {}
    for key in keys:
        values = np.array([m[key] for m in per_seed], dtype=np.float64)
        values = values[np.isfinite(values)]
        mean[key] = float(values.mean()) if values.size else math.nan
        std[key] = float(values.std(ddof=1)) if values.size > 1 else (0.0 if values.size else math.nan)
    return mean, std


def _pad_all(sets: Mapping[str, LabeledLoras]) -> dict[str, LabeledLoras]:
    """Zero-pad every set to the largest rank among them (every U Vᵀ unchanged)."""
    r_max = max(s.weights.rank for s in sets.values())
    return {name: LabeledLoras(s.weights.pad_rank(r_max), s.targets) for name, s in sets.items()}


def train_and_test(predictor: str, task: Task, train: LabeledLoras, validation: LabeledLoras,
                   tests: Mapping[str, LabeledLoras], settings: LearnSettings,
                   model_config: Any = None,
                   selection_sets: tuple[LabeledLoras, LabeledLoras] | None = None) -> dict[str, Any]:
    """Select a config and train `predictor` on `train` (chosen on `validation`) once per seed; score every test set.

    tests: name → LabeledLoras (N ≥ 2 each); model_config: the predictor's config (None: chosen under the
    tuning budget, `settings.tuning_budget`, from its search space). selection_sets: (train, validation) the
    configs are tried on instead of (`train`, `validation`), e.g. a rank held out of training to choose the
    config that extrapolates best (`lol_models.rank_generalisation`); the final runs still train on `train`
    with the epoch picked on `validation`.
    All sets are zero-padded to their common largest rank, so models on raw factors meet columns of
    a rank unseen in training as inputs they only ever saw as zeros.
    Returns {"seeds", "selection" (None when `model_config` was given), "tests": {name: {"n", "mean", "std"}},
    "per_seed": [{seed, best_epoch, val, tests}], "parameters", "seconds", "_predictions": {name: (S, N, T)}},
    or {"error": …} when the model refuses the inputs (e.g. mlp_dense's budget).
    """
    if not tests:
        raise ValueError("train_and_test needs at least one test set")
    small = {name: len(s) for name, s in tests.items() if len(s) < 2}
    if small:
        raise PulledDataError(f"test set(s) with fewer than 2 LoRAs cannot be scored: {small}")
    started = time.perf_counter()
    chosen_on = dict(zip(("selection:train", "selection:validation"), selection_sets or ()))
    padded = _pad_all({"train": train, "validation": validation, **chosen_on, **{f"test:{k}": v for k, v in tests.items()}})
    per_seed, parameters, predictions = [], None, {name: [] for name in tests}
    try:
        if model_config is None:
            selection = select_config(predictor, task.kind, padded.get("selection:train", padded["train"]),
                                      padded.get("selection:validation", padded["validation"]), settings)
            candidate, chosen = selection.candidate, selection.as_dict()
        else:
            candidate, chosen = Candidate(), None
        config = train_config(settings, task.kind, candidate)
        model_config = config_for(predictor, task.kind, candidate.model) if model_config is None else model_config
        for seed in range(settings.seeds):
            result = fit(predictor, padded["train"], padded["validation"], model_config=model_config,
                         config=replace(config, seed=seed))
            scores = {}
            for name in tests:
                data = padded[f"test:{name}"]
                scores[name] = evaluate(result.model, data, task.kind, target_mean=result.target_mean,
                                        target_std=result.target_std)
                out = predict(result.model, data.weights).double()  # (N, T)
                if task.kind == "regression":
                    out = out * result.target_std.double().cpu() + result.target_mean.double().cpu()
                predictions[name].append(out.numpy())
            per_seed.append({"seed": seed, "best_epoch": result.best_epoch, "val": result.val, "tests": scores})
            parameters = sum(p.numel() for p in result.model.parameters())
    except ValueError as exc:  # e.g. mlp_dense over its memory budget: recorded, not fatal
        return {"error": str(exc), "seconds": round(time.perf_counter() - started, 2)}
    summary = {}
    for name in tests:
        mean, std = mean_std([s["tests"][name] for s in per_seed])
        summary[name] = {"n": len(tests[name]), "mean": mean, "std": std}
    return {"seeds": settings.seeds, "selection": chosen, "tests": summary, "per_seed": per_seed,
            "parameters": parameters, "seconds": round(time.perf_counter() - started, 2),
            "_predictions": {name: np.stack(p) for name, p in predictions.items()}}


def labeled(dataset: LoraDataset, task: Task, rows: torch.Tensor | None = None) -> LabeledLoras:
    """The task's targets of `dataset` (all rows, or the index Tensor `rows`)."""
    data = LabeledLoras(dataset.weights, dataset.targets(task.columns))
    return data if rows is None else data.subset(rows)


def shift_experiment(tasks: Sequence[Task], sets: Mapping[str, Mapping[str, LabeledLoras]],
                     settings: LearnSettings, model_configs: Mapping[str, Any] | None = None,
                     on_run=None, workers: int = 1,
                     load_sets: Callable[[], Mapping[str, Mapping[str, LabeledLoras]]] | None = None) -> dict[str, Any]:
    """Every predictor × task; `sets[task.name]` = {"train", "validation", test name…}.

    model_configs: predictor name → its config (dict or config object); predictors not named use defaults.
    `sets[task.name]` may also hold "selection_train" and "selection_validation": the sets configs are chosen on
    (`train_and_test`'s selection_sets). `workers` > 1 trains that many predictor × task units at once in
    spawned processes (`lol_models.parallel`), each building the sets once with `load_sets` (picklable, e.g. a
    `functools.partial` of a module-level function; required then), so the sets are not pickled per unit.
    Returns {task name: {"kind", "columns", "metric", "second_metric", "predictors": {name: record}}}.
    """
    units = [(task, predictor, (model_configs or {}).get(predictor)) for task in tasks for predictor in settings.predictors]
    records: dict[str, dict[str, Any]] = {task.name: {} for task in tasks}

    def finished(i: int, record: dict[str, Any]) -> None:
        task, predictor, _ = units[i]
        records[task.name][predictor] = record
        if on_run is not None:
            on_run(predictor, task.name)

    if workers > 1 and len(units) > 1:
        if load_sets is None:
            raise ValueError("shift_experiment with workers > 1 needs load_sets, which builds the sets in each worker")
        run_units([(*unit, settings) for unit in units], _unit_in_worker, workers, _start_worker, (load_sets,), finished,
                  costs=[MODELS[predictor].unit_cost for _, predictor, _ in units])
    else:
        for i, (task, predictor, config) in enumerate(units):
            finished(i, _unit(sets[task.name], task, predictor, config, settings))
    out: dict[str, Any] = {}
    for task in tasks:
        data = _tests_of(sets[task.name])
        task_records = {p: records[task.name][p] for p in settings.predictors}  # settings' order, whatever finished first
        differences = _add_intervals(task, task_records, data)
        out[task.name] = {"kind": task.kind, "columns": list(task.columns), "metric": MAIN_METRIC[task.kind],
                          "second_metric": SECOND_METRIC[task.kind], "predictors": task_records, "difference": differences}
    return out


SET_ROLES = ("train", "validation", "selection_train", "selection_validation")  # every other set is a test set


def _tests_of(task_sets: Mapping[str, LabeledLoras]) -> dict[str, LabeledLoras]:
    return {name: data for name, data in task_sets.items() if name not in SET_ROLES}


def _unit(task_sets: Mapping[str, LabeledLoras], task: Task, predictor: str, config: Any,
          settings: LearnSettings) -> dict[str, Any]:
    """`train_and_test` of one predictor on one task's sets."""
    chosen_on = ((task_sets["selection_train"], task_sets["selection_validation"])
                 if "selection_train" in task_sets else None)
    return train_and_test(predictor, task, task_sets["train"], task_sets["validation"], _tests_of(task_sets),
                          settings, config, chosen_on)


_worker_sets: Mapping[str, Mapping[str, LabeledLoras]] | None = None  # a worker's sets, built once


def _start_worker(load_sets: Callable[[], Mapping[str, Mapping[str, LabeledLoras]]], threads: int) -> None:
    global _worker_sets
    torch.set_num_threads(threads)
    _worker_sets = load_sets()


def _unit_in_worker(task: Task, predictor: str, config: Any, settings: LearnSettings) -> dict[str, Any]:
    assert _worker_sets is not None, "a shift_experiment worker runs _start_worker first"
    return _unit(_worker_sets[task.name], task, predictor, config, settings)


def _add_intervals(task: Task, records: dict[str, Any], tests: Mapping[str, LabeledLoras]) -> dict[str, Any]:
    """Per test set: each predictor's paired bootstrap 95% CIs (into its record) and GL-net − each other's."""
    differences = {}
    ok = {p: r for p, r in records.items() if "error" not in r}
    for name, data in tests.items():
        predictions = {p: r["_predictions"][name] for p, r in ok.items()}
        if not predictions:
            continue
        table = bootstrap_table(task.kind, data.targets.double().numpy(), predictions,
                                reference="glnet" if "glnet" in predictions else None)
        for p, r in ok.items():
            r["tests"][name]["ci"] = table["ci"][p]
        differences[name] = {"reference": table["reference"], "vs": table["difference"]}
    for r in ok.values():
        del r["_predictions"]
    return differences


def metric_of(tasks: Mapping[str, Any], task: str, predictor: str, test: str,
              metric: str | None = None) -> tuple[float, float]:
    """(mean, std) over seeds of `metric` (default: the task's main metric) on test set `test`."""
    entry = tasks[task]
    record = entry["predictors"][predictor]
    if "error" in record:
        raise ValueError(f"{predictor} did not run on {task}: {record['error']}")
    cell = record["tests"][test]
    key = metric or entry["metric"]
    return cell["mean"][key], cell["std"][key]


def metric_cells(tasks: Mapping[str, Any], task: str, predictor: str, tests: Sequence[str]) -> list[str]:
    """"mean ± std [bootstrap 95% CI]" of the task's main metric per test set, "—" where the predictor has none."""
    cells = []
    for test in tests:
        try:
            mean, std = metric_of(tasks, task, predictor, test)
            ci = tasks[task]["predictors"][predictor]["tests"][test].get("ci", {}).get(tasks[task]["metric"])
            cells.append(f"{mean:.3f} ± {std:.3f}" + (f" [{ci['low']:.3f}, {ci['high']:.3f}]" if ci else ""))
        except (KeyError, ValueError):
            cells.append("—")
    return cells




def shift_bars(results: Mapping[str, Any], test_names: Sequence[str], labels: Sequence[str], path: str | Path,
               title: str) -> Path:
    """PNG: per task a panel of grouped bars, test metric (mean ± std over seeds) per predictor and test set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.2 * max(1, len(tasks)), 3.4), squeeze=False)
    colours = ["#7f7f7f", "#d62728", "#1f77b4", "#2ca02c"]
    width = 0.8 / len(test_names)
    for ax, name in zip(axes[0], tasks):
        task = results[name]
        metric = task["metric"]
        predictors = sorted(task["predictors"], key=predictor_order)
        for j, (test, label) in enumerate(zip(test_names, labels)):
            means, stds = [], []
            for p in predictors:
                record = task["predictors"][p]
                cell = record.get("tests", {}).get(test)
                means.append(_finite(cell["mean"].get(metric)) if cell else 0.0)
                stds.append(_finite(cell["std"].get(metric)) if cell else 0.0)
            xs = np.arange(len(predictors)) + (j - (len(test_names) - 1) / 2) * width
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=label, color=colours[j % len(colours)])
        ax.set_xticks(np.arange(len(predictors)), predictors, rotation=30, fontsize=8)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_ylabel(f"test {metric}")
        ax.set_title(name, fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else 0.0

"""`lol evaluate`: the one place test labels are read — every trained predictor scored once, with CIs.

`lol train` (`lol_models.protocol`) leaves, per predictor × task, `runs/{predictor}--{task}.json` with
its final seeds' predictions on the test LoRAs and their job ids, but no test label and no test metric.
`evaluate` loads the test labels of the same split (the published folder and split mode the run
recorded), checks the job ids agree, and writes

    results.json   per task: per predictor the test metrics of every seed, their mean and std, a paired
                   bootstrap 95% CI of the seed mean over test LoRAs (`lol_models.bootstrap`), and the CI
                   of GL-net − each other predictor on the same resamples
    results.md     the same as tables, metrics named exactly (`lol_models.metrics.METRIC_NAMES`)

Shape legend: N test LoRAs, T targets / K labels, S seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lol_models.bootstrap import RESAMPLES, bootstrap_table
from lol_models.data import LoraDataset, PulledDataError
from lol_models.metrics import METRIC_NAMES, multilabel_metrics, regression_metrics
from lol_models.shift import mean_std
from lol_models.tasks import jsonable, load_splits, predictor_order

__all__ = ["REFERENCE", "TABLE_METRICS", "evaluate_runs", "results_markdown"]

REFERENCE = "glnet"  # differences are GL-net − each other predictor
TABLE_METRICS = {"regression": ("r2", "r2_train_var", "kendall_tau", "spearman_rho"),
                 "multilabel": ("roc_auc", "accuracy")}
SHORT_NAMES = {"r2": "R²", "r2_train_var": "R² vs train var.", "kendall_tau": "Kendall τ-b",
               "spearman_rho": "Spearman ρ", "roc_auc": "ROC-AUC", "accuracy": "accuracy"}


def _test_split(published: str, split: str, cache: dict[tuple[str, str], LoraDataset]) -> LoraDataset:
    key = (published, split)
    if key not in cache:
        cache[key] = load_splits(published, split)["test"]
    return cache[key]


def _seed_metrics(kind: str, y: np.ndarray, predictions: np.ndarray, train_variance: list[float] | None) -> dict[str, float]:
    """Test metrics of one seed's predictions (N, T) against y (N, T)."""
    if kind == "regression":
        metrics = regression_metrics(y, predictions)
        if train_variance is not None:
            mse = ((y - predictions) ** 2).mean(0)  # (T,)
            metrics["r2_train_var"] = float(np.mean(1.0 - mse / np.asarray(train_variance)))
        return metrics
    return multilabel_metrics(y, predictions)


def evaluate_runs(out_dir: str | Path, published: str | Path | None = None, *, resamples: int = RESAMPLES,
                  seed: int = 0) -> dict[str, dict[str, Any]]:
    """Score every run under `out_dir/runs` on its test labels; write results.json and results.md; return the tasks.

    published: the published folder (default: the one each run recorded).
    """
    out = Path(out_dir)
    paths = sorted((out / "runs").glob("*.json"))
    if not paths:
        raise PulledDataError(f"no trained predictors in {out / 'runs'}; run `lol train` first")
    tasks: dict[str, dict[str, Any]] = {}
    cache: dict[tuple[str, str], LoraDataset] = {}
    for path in paths:
        record = json.loads(path.read_text())
        task = record["task"]
        entry = tasks.setdefault(task["name"], {"kind": task["kind"], "columns": task["columns"], "predictors": {}})
        if "error" not in record and "test_predictions" not in record:
            raise PulledDataError(f"{path} was written by an older `lol train` (test metrics, no test predictions); "
                                  "run `lol train` again")
        entry["predictors"][record["predictor"]] = record
    for name, entry in tasks.items():
        _score_task(name, entry, published, cache, resamples, seed)
    (out / "results.json").write_text(json.dumps(tasks, indent=1, default=jsonable) + "\n")
    (out / "results.md").write_text(results_markdown(tasks))
    return tasks


def _score_task(name: str, entry: dict[str, Any], published: str | Path | None,
                cache: dict[tuple[str, str], LoraDataset], resamples: int, seed: int) -> None:
    ok = {p: r for p, r in entry["predictors"].items() if "error" not in r}
    if not ok:
        return
    first = next(iter(ok.values()))
    test = _test_split(str(published or first["published"]), first.get("split", "protocol"), cache)
    y = test.targets(entry["columns"]).double().numpy()  # (N, T)
    kind = entry["kind"]
    entry["n_test"] = int(y.shape[0])
    if y.shape[0] < 2:  # recorded like a model that refused its inputs: the table shows why
        for record in ok.values():
            record["error"] = f"the test split holds {y.shape[0]} LoRA(s); scoring needs at least 2"
        return
    train_variance = first.get("train_target_variance")
    predictions = {}
    for predictor, record in ok.items():
        if record["test_job_ids"] != test.job_ids:
            raise PulledDataError(f"{predictor} on {name} was trained for other test LoRAs than {published or record['published']}'s "
                                  "test split holds now; run `lol train` again")
        preds = np.asarray(record["test_predictions"], dtype=np.float64)  # (S, N, T)
        predictions[predictor] = preds
        for run, p in zip(record["per_seed"], preds):
            run["test"] = _seed_metrics(kind, y, p, train_variance)
        record["mean"], record["std"] = mean_std([run["test"] for run in record["per_seed"]])
        record["test_predictions"] = preds[0].tolist()  # seed 0, for the report's scatter
        record["test_predictions_all_seeds"] = preds.tolist()  # (S, N, T): later analyses need not retrain
        record["test_targets"] = y.tolist()
    variance = train_variance if kind == "regression" else None
    table = bootstrap_table(kind, y, predictions, reference=REFERENCE if REFERENCE in predictions else None,
                            train_variance=variance, resamples=resamples, seed=seed)
    for predictor, record in ok.items():
        record["ci"] = table["ci"][predictor]
    entry["bootstrap"] = {k: table[k] for k in ("resamples", "seed", "level", "n")}
    entry["difference"] = {"reference": table["reference"], "vs": table["difference"]}
    entry["n_test_groups"] = len(set(test.groups))
    if entry["n_test_groups"] >= 2:  # LoRAs of a group share data (and often labels): resample whole groups too
        by_group = bootstrap_table(kind, y, predictions, reference=table["reference"], train_variance=variance,
                                   resamples=resamples, seed=seed, groups=test.groups)
        for predictor, record in ok.items():
            record["ci_by_group"] = by_group["ci"][predictor]
        entry["difference_by_group"] = {"reference": by_group["reference"], "vs": by_group["difference"],
                                        "groups": by_group["groups"]}


def _cell(record: dict[str, Any], metric: str) -> str:
    if "error" in record:
        return "— (" + record["error"].split(";")[0][:60] + ")"
    ci = record.get("ci", {}).get(metric)
    if ci is None:
        return "n/a"
    return f"{record['mean'][metric]:.3f} ± {record['std'][metric]:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def _diff_cell(interval: dict[str, float] | None) -> str:
    if interval is None or not np.isfinite(interval["low"]):
        return "n/a"
    mark = " *" if interval["low"] > 0 or interval["high"] < 0 else ""
    return f"{interval['value']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]{mark}"


def results_markdown(tasks: dict[str, dict[str, Any]]) -> str:
    """The main table (mean ± std over seeds [bootstrap 95% CI]) and the table of GL-net − each predictor."""
    predictors = sorted({p for t in tasks.values() for p in t["predictors"]}, key=predictor_order)
    lines = ["| task | kind | metric | " + " | ".join(predictors) + " |", "|---|---|---|" + "---|" * len(predictors)]
    for name, task in sorted(tasks.items()):
        for metric in TABLE_METRICS[task["kind"]]:
            cells = [_cell(task["predictors"][p], metric) if p in task["predictors"] else "" for p in predictors]
            if any(c not in ("", "n/a") for c in cells):
                lines.append(f"| {name} | {task['kind']} | {SHORT_NAMES[metric]} | " + " | ".join(cells) + " |")
    seeds = sorted({r.get("seeds") for t in tasks.values() for r in t["predictors"].values() if "seeds" in r})
    boot = next((t["bootstrap"] for t in tasks.values() if "bootstrap" in t), None)
    sizes = ", ".join(f"{name} {t['n_test']}" + (f" from {t['n_test_groups']} groups" if t.get("n_test_groups") else "")
                      for name, t in sorted(tasks.items()) if "n_test" in t)
    text = [f"Test metrics of each predictor's chosen config: mean ± std over {', '.join(map(str, seeds))} seed(s) "
            f"[paired bootstrap 95% CI of the seed mean over test LoRAs"
            + (f", {boot['resamples']} resamples, seed {boot['seed']}" if boot else "") + f"]. Test LoRAs: {sizes}.", "",
            *lines, "", "Metrics: " + "; ".join(f"{SHORT_NAMES[k]} = {METRIC_NAMES[k]}" for k in SHORT_NAMES), ""]
    others = [p for p in predictors if p != REFERENCE]
    if any(t.get("difference", {}).get("reference") for t in tasks.values()):
        text += [f"Differences {REFERENCE} − each predictor (same resampled test LoRAs; * where the 95% CI excludes 0):", "",
                 "| task | metric | " + " | ".join(f"{REFERENCE} − {p}" for p in others) + " |",
                 "|---|---|" + "---|" * len(others)]
        text += _difference_rows(tasks, others, "difference") + [""]
    if any(t.get("difference_by_group", {}).get("reference") for t in tasks.values()):
        text += ["The same differences, resampling whole test groups (LoRAs of one group share their training data and "
                 "often their labels, so they are not independent draws; * where the 95% CI excludes 0):", "",
                 "| task | metric | " + " | ".join(f"{REFERENCE} − {p}" for p in others) + " |",
                 "|---|---|" + "---|" * len(others)]
        text += _difference_rows(tasks, others, "difference_by_group") + [""]
    return "\n".join(text) + "\n"


def _difference_rows(tasks: dict[str, dict[str, Any]], others: list[str], key: str) -> list[str]:
    rows = []
    for name, task in sorted(tasks.items()):
        vs = task.get(key, {}).get("vs", {})
        if not vs:
            continue
        for metric in TABLE_METRICS[task["kind"]]:
            cells = [_diff_cell(vs.get(p, {}).get(metric)) for p in others]
            if any(c != "n/a" for c in cells):
                rows.append(f"| {name} | {SHORT_NAMES[metric]} | " + " | ".join(cells) + " |")
    return rows

"""The main experiment: every predictor × every target task of a published population.

Tasks come from the dataset's `labels.json`: a scorer whose labels are all 0/1 is one
multilabel task (attributes, membership, sources); every other label column is its own
regression task (clip_score, acc, eval_loss). Each (predictor, task) is trained over seeds
with `run_seeds`; the test score is taken at the best-validation epoch.

Outputs in `out_dir`:
    runs/{predictor}--{task}.json     # per seed: best epoch, val/test metrics; seed 0's test predictions
    results.json, results.md          # `evaluate`: mean ± std table
    report.md, figures/*.png          # `report`
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lol_models.data import LoraDataset, PulledDataError, pull
from lol_models.train import LabeledLoras, TrainConfig, predict, run_seeds

MAIN_METRIC = {"regression": "r2", "multilabel": "roc_auc"}
SECOND_METRIC = {"regression": "kendall_tau", "multilabel": "accuracy"}


@dataclass(frozen=True)
class LearnSettings:
    """What to train: the manifest's `learn` section, as plain values."""

    predictors: tuple[str, ...] = ("mlp", "mlp_svd", "mlp_oalign", "mlp_dense", "transformer", "glnet")
    targets: tuple[str, ...] = ()  # label columns or scorer names; empty: every task
    seeds: int = 3
    epochs: int = 50
    batch_size: int = 64
    learning_rate: float = 1e-3


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "regression" | "multilabel"
    columns: tuple[str, ...]


def tasks_of(dataset: LoraDataset, wanted: Sequence[str] = ()) -> list[Task]:
    """Group label columns into tasks; `wanted` filters by column or scorer name."""
    by_scorer: dict[str, list[str]] = {}
    for column, info in sorted(dataset.label_info.items()):
        by_scorer.setdefault(info["scorer"], []).append(column)
    tasks = []
    for scorer, columns in by_scorer.items():
        binary = all(set(torch.unique(dataset.labels[c]).tolist()) <= {0, 1} for c in columns)
        if binary and scorer in ("attributes", "membership", "sources"):
            tasks.append(Task(scorer, "multilabel", tuple(columns)))
        else:
            tasks.extend(Task(column, "regression", (column,)) for column in columns)
    if wanted:
        known = {t.name for t in tasks} | {c for t in tasks for c in t.columns}
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise PulledDataError(f"unknown target(s) {unknown}; targets of this dataset: {', '.join(sorted(known))}")
        tasks = [t for t in tasks if t.name in wanted or any(c in wanted for c in t.columns)]
    return tasks


def load_splits(published: str | Path) -> dict[str, LoraDataset]:
    splits = {}
    for name in ("train", "validation", "test"):
        try:
            splits[name] = pull(published, split=name)
        except PulledDataError as exc:
            if "unknown split" not in str(exc):
                raise
    missing = [s for s in ("train", "validation", "test") if s not in splits]
    if missing:
        raise PulledDataError(f"{published} lacks split(s) {missing}; learning needs train, validation and test "
                              "(set publish.splits in the manifest and publish again)")
    return splits


def _labeled(dataset: LoraDataset, task: Task) -> LabeledLoras:
    return LabeledLoras(dataset.weights, dataset.targets(task.columns))


def train_all(published: str | Path, settings: LearnSettings, out_dir: str | Path,
              on_run: Callable[[str, str], None] | None = None) -> list[Path]:
    """Train every predictor on every task over seeds; one JSON per (predictor, task)."""
    out = Path(out_dir) / "runs"
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(published)
    written = []
    for task in tasks_of(splits["train"], settings.targets):
        data = {name: _labeled(split, task) for name, split in splits.items()}
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
            path.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
            written.append(path)
            if on_run is not None:
                on_run(predictor, task.name)
    return written


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


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
    predictors = sorted({p for t in results.tasks.values() for p in t["predictors"]}, key=_predictor_order)
    lines = ["| task | kind | metric | " + " | ".join(predictors) + " |", "|---|---|---|" + "---|" * len(predictors)]
    for name, task in sorted(results.tasks.items()):
        for metric in (MAIN_METRIC[task["kind"]], SECOND_METRIC[task["kind"]]):
            cells = [_cell(task["predictors"][p], metric) if p in task["predictors"] else "" for p in predictors]
            lines.append(f"| {name} | {task['kind']} | {metric} | " + " | ".join(cells) + " |")
    seeds = {r.get("seeds") for t in results.tasks.values() for r in t["predictors"].values() if "seeds" in r}
    return ("Test metrics at the best-validation epoch, mean ± std over "
            f"{', '.join(str(s) for s in sorted(seeds))} seed(s).\n\n" + "\n".join(lines) + "\n")


def _predictor_order(name: str) -> int:
    order = ["mlp", "mlp_svd", "mlp_oalign", "mlp_dense", "transformer", "glnet"]
    return order.index(name) if name in order else len(order)


def report(out_dir: str | Path, title: str = "Learning on LoRAs", scaling_figure: Path | None = None) -> Path:
    """report.md with the main table and figures (predicted vs true per regression task, bars per
    task), then every experiment found in the store's learn area (`out_dir`'s parent: rank
    generalisation, transfer, speed) and the scaling figure, when given."""
    import matplotlib

    from lol_models.report_sections import experiment_sections

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    results = evaluate(out)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    lines = [f"# {title}", "", "## Main table", "", results_markdown(results), ""]
    for name, task in sorted(results.tasks.items()):
        ok = {p: r for p, r in task["predictors"].items() if "error" not in r}
        if not ok:
            continue
        metric = MAIN_METRIC[task["kind"]]
        names = sorted(ok, key=_predictor_order)
        fig, ax = plt.subplots(figsize=(6, 3))
        means = [ok[p]["mean"].get(metric) or 0.0 for p in names]
        stds = [ok[p]["std"].get(metric) or 0.0 for p in names]
        ax.bar(names, means, yerr=stds, color=["#d62728" if p == "glnet" else "#7f7f7f" for p in names], capsize=3)
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"{name}: {metric} (mean ± std over seeds)")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        bars = figures / f"{_file(name)}-{metric}.png"
        fig.savefig(bars, dpi=110)
        plt.close(fig)
        lines += [f"## {name} ({task['kind']})", "", f"![{name} {metric}](figures/{bars.name})", ""]
        if task["kind"] == "regression":
            fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
            for ax, predictor in zip(axes[0], names):
                truth = [row[0] for row in ok[predictor]["test_targets"]]
                guess = [row[0] for row in ok[predictor]["test_predictions"]]
                ax.scatter(truth, guess, s=8, alpha=0.7)
                low, high = min(truth + guess), max(truth + guess)
                ax.plot([low, high], [low, high], color="black", linewidth=0.8)
                ax.set_title(predictor, fontsize=9)
                ax.set_xlabel("true", fontsize=8)
            axes[0][0].set_ylabel("predicted", fontsize=8)
            fig.suptitle(f"{name}: predicted vs true on the test split (seed 0)", fontsize=10)
            fig.tight_layout()
            scatter = figures / f"{_file(name)}-scatter.png"
            fig.savefig(scatter, dpi=110)
            plt.close(fig)
            lines += [f"![{name} scatter](figures/{scatter.name})", ""]
    lines += experiment_sections(out.parent, figures, scaling_figure)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _file(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)

"""`lol finetune | score | publish | pull | train | evaluate | report`: one stage each, resumable."""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Optional

import typer
from rich.table import Table

from pipeline.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_PROBLEMS,
    ManifestArg,
    OverridesArg,
    StoreOpt,
    load,
    out,
    progress_bar,
    report_missing_artefacts,
    units_progress,
)
from pipeline.manifest import Manifest
from storage import Store

app = typer.Typer()


@app.command("finetune")
def finetune_command(
    manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N jobs of the population.")] = None,
    shard: Annotated[Optional[str], typer.Option(help="Run shard i/n of the jobs (e.g. 2/4).")] = None,
) -> int:
    """Train one LoRA per job the store lacks (resumable), with a summary table."""
    loaded = load(manifest, overrides)
    if report_missing_artefacts(loaded):  # the base, data, benchmarks, CLIP: one line each, before any work
        return EXIT_BAD_INPUT
    summary = _run_finetune(loaded, Store(store), limit, shard)
    return EXIT_PROBLEMS if summary.failed else 0


def _run_finetune(loaded: Manifest, target: Store, limit: int | None = None, shard_spec: str | None = None):
    from pipeline.jobs import planned_count
    from pipeline.stages import finetune

    total = planned_count(loaded, limit)
    with progress_bar() as progress:
        task = progress.add_task(f"finetuning {loaded.population.name}", total=total)
        summary = finetune(loaded, target, limit=limit, shard_spec=shard_spec,
                           on_job=lambda job, outcome: progress.advance(task))
        progress.update(task, completed=total)
    table = Table(title=f"finetune {loaded.population.name}")
    for column in ("planned", "trained", "already done", "claimed elsewhere", "failed", "LoRAs/minute"):
        table.add_column(column, justify="right")
    table.add_row(str(summary.planned), str(len(summary.trained)), str(summary.skipped), str(summary.busy),
                  str(len(summary.failed)), f"{summary.loras_per_minute:.1f}")
    out.print(table)
    for reason, count in Counter(summary.failed.values()).most_common():
        out.print(f"  failed × {count}: {reason}")
    for note in summary.notes:
        out.print(f"  note: {note}")
    return summary


@app.command("score")
def score_command(
    manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None,
    scorer: Annotated[Optional[list[str]], typer.Option(help="Only these scorers (by name); repeatable.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N jobs of the population.")] = None,
    shard: Annotated[Optional[str], typer.Option(help="Score shard i/n of the jobs (e.g. 2/4).")] = None,
) -> int:
    """Label every finetuned LoRA lacking a score (resumable), with label statistics."""
    loaded = load(manifest, overrides)
    summary = _run_score(loaded, Store(store), scorer, limit, shard)
    return EXIT_PROBLEMS if summary.failed else 0


def _run_score(loaded: Manifest, target: Store, only=None, limit=None, shard_spec=None):
    from pipeline.jobs import planned_count
    from pipeline.stages import score

    total = planned_count(loaded, limit) * len(only or loaded.scorers)
    with progress_bar() as progress:
        task = progress.add_task(f"scoring {loaded.population.name}", total=total)
        summary = score(loaded, target, only=only, limit=limit, shard_spec=shard_spec,
                        on_job=lambda job, sid, outcome: progress.advance(task))
    table = Table(title=f"score {loaded.population.name}")
    for column in ("scorer id", "scored now", "already scored"):
        table.add_column(column, justify="right")
    for sid in summary.scored:
        table.add_row(sid, str(summary.scored[sid]), str(summary.skipped[sid]))
    out.print(table)
    stats = Table(title="labels over scored LoRAs")
    for column in ("label", "mean", "std", "n"):
        stats.add_column(column, justify="right")
    for name, (mean, std, n) in summary.label_stats().items():
        stats.add_row(name, f"{mean:.4g}", f"{std:.4g}", str(n))
    out.print(stats)
    if summary.unfinished:
        out.print(f"{summary.unfinished} planned job(s) have no finetuned LoRA yet; `lol finetune` first.")
    for (job_id, sid), reason in sorted(summary.failed.items()):
        out.print(f"  failed {job_id} / {sid}: {reason}")
    for note in summary.notes:
        out.print(f"  note: {note}")
    return summary


@app.command("publish")
def publish_command(
    manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None,
    push: Annotated[bool, typer.Option(help="Push to publish.repo_id when HF_TOKEN is set.")] = True,
    trust_remote_pickle: Annotated[bool, typer.Option("--trust-remote-pickle", help="Also read pickle adapters (adapter_model.bin); unpickling can run code.")] = False,
) -> int:
    """Write the population as a Hugging Face dataset folder; push it when a token is set."""
    loaded = load(manifest, overrides)
    _run_publish(loaded, Store(store), push, trust_remote_pickle)
    return 0


def _run_publish(loaded: Manifest, target: Store, push: bool = True, trust_remote_pickle: bool = False):
    from pipeline.stages import publish

    summary = publish(loaded, target, push=push, trust_remote_pickle=trust_remote_pickle)
    table = Table(title=f"published {loaded.population.name}")
    for column in ("split", "LoRAs"):
        table.add_column(column, justify="right")
    for name, count in summary.rows.items():
        table.add_row(name, str(count))
    out.print(table)
    for reason, count in Counter(summary.excluded.values()).most_common():
        out.print(f"  not published × {count}: {reason}")
    out.print(summary.message)
    return summary


@app.command("pull")
def pull_command(
    repo_or_path: Annotated[str, typer.Argument(help="Hub dataset id or published folder.", show_default=False)],
    split: Annotated[str, typer.Option(help="Split to load.")] = "train",
    non_finite: Annotated[str, typer.Option("--non-finite", help="Rows with NaN/Inf weights or labels: fail, or skip them (counted).")] = "fail",
) -> int:
    """Load a published population as tensors and describe what the LoL models will see."""
    import time

    from lol_models.data import pull

    started = time.perf_counter()
    dataset = pull(repo_or_path, split=split, non_finite=non_finite)  # a PulledDataError is bad input: exit 2
    seconds = time.perf_counter() - started
    table = Table(title=f"{repo_or_path} [{split}]: {len(dataset)} LoRAs, loaded in {seconds:.2f} s")
    for column in ("layer group", "layers", "U (n×r)", "V (m×r)"):
        table.add_column(column)
    for i, group in enumerate(dataset.weights.groups):
        table.add_row(str(i), str(len(group.names)), f"{group.u.shape[2]}×{group.u.shape[3]}", f"{group.v.shape[2]}×{group.v.shape[3]}")
    out.print(table)
    out.print("labels: " + ", ".join(dataset.label_names))
    if dataset.skipped:
        out.print(f"skipped {len(dataset.skipped)} row(s) with NaN/Inf weights: "
                  + ", ".join(f"{job} ({count})" for job, count in list(dataset.skipped.items())[:5]))
    if dataset.skipped_labels:
        out.print(f"skipped {len(dataset.skipped_labels)} row(s) with NaN/Inf labels: "
                  + ", ".join(f"{job} ({count})" for job, count in list(dataset.skipped_labels.items())[:5]))
    return 0


@app.command("train")
def train_command(
    manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None,
    workers: Annotated[int, typer.Option(min=1, help="(predictor, target) units trained at once, each in its own process "
                                                    "with cores / workers torch threads.")] = 1,
    fresh: Annotated[bool, typer.Option("--fresh", help="Train every unit again, even those already trained with the same "
                                                        "settings on the same published rows (kept by default).")] = False,
) -> int:
    """Train every predictor of the manifest's `learn` section on every target, over seeds."""
    from pipeline.runtime import sigterm_exits
    from pipeline.stages import learn_target, train

    loaded = load(manifest, overrides)
    target = Store(store)
    published, out_dir, settings = learn_target(loaded, target)
    with sigterm_exits(), units_progress(f"training predictors on {loaded.population.name}") as on_run:  # SIGTERM stops the workers too
        written = train(loaded, target, workers=workers, resume=not fresh, on_run=on_run)
    out.print(f"trained {len(written)} predictor × task runs ({settings.seeds} seed(s) each) into {out_dir}/runs")
    return 0


@app.command("evaluate")
def evaluate_command(manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None) -> int:
    """Score the trained predictors on the test split, once: results.json and results.md with paired bootstrap 95% CIs."""
    from pipeline.stages import evaluate, learn_target

    loaded = load(manifest, overrides)
    target = Store(store)
    evaluate(loaded, target)
    out_dir = learn_target(loaded, target)[1]
    out.print((out_dir / "results.md").read_text(), markup=False, highlight=False)
    out.print(f"results: {out_dir / 'results.json'}")
    return 0


@app.command("report")
def report_command(manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None) -> int:
    """Write report.md with the main table and figures."""
    from pipeline.stages import report

    path = report(load(manifest, overrides), Store(store))
    out.print(f"report: {path}")
    return 0

"""`lol experiment ranks | transfer | speed`: LoL experiments beyond the main table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from pipeline.cli.common import ManifestArg, OverridesArg, StoreOpt, load, out, units_progress
from pipeline.runtime import sigterm_exits
from storage import Store

experiment_app = typer.Typer(help="LoL experiments beyond the main table: rank generalisation, transfer, speed.",
                             no_args_is_help=True)


def _shift_table(title: str, tasks: dict, tests: tuple[str, ...]) -> Table:
    """One row per task × predictor: mean ± std of the task's main metric on each test set."""
    from lol_models.shift import metric_cells

    table = Table(title=title)
    for column in ("task", "predictor", *tests):
        table.add_column(column, justify="right")
    for task, entry in tasks.items():
        for predictor in entry["predictors"]:
            table.add_row(task, predictor, *metric_cells(tasks, task, predictor, tests))
    return table


@experiment_app.command("ranks")
def experiment_ranks(
    manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None,
    train_rank: Annotated[Optional[list[int]], typer.Option("--train-rank", help="Ranks to train on (default: all but the largest).")] = None,
    test_rank: Annotated[Optional[list[int]], typer.Option("--test-rank", help="Unseen ranks to test on (default: the largest).")] = None,
    select_on_rank: Annotated[Optional[int], typer.Option(
        "--select-on-rank", help="Choose each predictor's config on this training rank, held out of the configs' "
                                 "training (scored on its validation rows); default: on every training rank.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Predictor × task units trained at once, in their own processes.")] = 1,
) -> int:
    """Train the predictors on some LoRA ranks of a published population, test on unseen ranks.

    Results go to learn/<population>/ranks/<train-…_test-…[_select-…]>/, one folder per rank setting."""
    from lol_models.rank_generalisation import (
        published_ranks,
        rank_generalisation,
        setting_name,
        split_ranks,
    )
    from pipeline.stages import learn_target

    published, learn_dir, settings = learn_target(load(manifest, overrides), Store(store, create=False))
    train, test = split_ranks(published_ranks(published), train_rank, test_rank)  # the defaults resolved: one folder per setting
    out_dir = Path(learn_dir) / "ranks" / setting_name(train, test, select_on_rank)
    with sigterm_exits(), units_progress(f"rank generalisation: train {train}, test {test}") as on_run:
        result = rank_generalisation(published, settings, out_dir, train, test, select_on_rank=select_on_rank,
                                     workers=workers, on_run=on_run)
    out.print(_shift_table(f"rank generalisation: train {result.train_ranks}, test {result.test_ranks}", result.tasks, ("seen", "unseen")))
    out.print(f"results: {result.results_path}; figure: {result.figure_path}")
    return 0


@experiment_app.command("transfer")
def experiment_transfer(
    manifest: ManifestArg,
    to: Annotated[Path, typer.Option("--to", help="Manifest of the population to test on (e.g. its base's continued version).")],
    overrides: OverridesArg = None,
    store: StoreOpt = None,
    workers: Annotated[int, typer.Option(min=1, help="Predictor × task units trained at once, in their own processes.")] = 1,
) -> int:
    """Train the predictors on one published population, test on another (e.g. tiny-shapes → tiny-shapes-continued).

    `key=value` overrides apply to both manifests (e.g. learn.seeds=5)."""
    from lol_models.transfer import train_on_a_test_on_b
    from pipeline.stages import learn_target

    target = Store(store, create=False)
    source_manifest, target_manifest = load(manifest, overrides), load(to, overrides)
    published_a, _, settings = learn_target(source_manifest, target)
    published_b, learn_b, _ = learn_target(target_manifest, target)
    with sigterm_exits(), units_progress(f"transfer: {source_manifest.population.name} → {target_manifest.population.name}") as on_run:
        result = train_on_a_test_on_b(published_a, published_b, settings,
                                      Path(learn_b) / f"transfer-from-{source_manifest.population.name}", workers=workers,
                                      on_run=on_run)
    out.print(_shift_table(f"transfer: {source_manifest.population.name} → {target_manifest.population.name}",
                           result.tasks, ("a_test", "b_test")))
    for task, why in result.skipped_tasks.items():
        out.print(f"skipped {task}: {why}")
    out.print(f"results: {result.results_path}; figure: {result.figure_path}")
    return 0


@experiment_app.command("speed")
def experiment_speed(
    manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None,
    predictor: Annotated[str, typer.Option(help="Predictor to time (trained here on the clip_score column).")] = "glnet",
    loras: Annotated[int, typer.Option(help="LoRAs whose CLIP score is computed (generation + CLIP) for timing.")] = 8,
) -> int:
    """Per-LoRA time of predicting the CLIP score versus computing it, and their ratio."""
    from pipeline.speed import RESULTS_FILE, clip_score_speed
    from pipeline.stages import learn_target

    loaded, target = load(manifest, overrides), Store(store, create=False)
    out_dir = Path(learn_target(loaded, target)[1]) / "speed"
    result = clip_score_speed(loaded, target, out_dir, predictor=predictor, loras_scored=loras)
    table = Table(title="CLIP score: predicted vs computed, per LoRA")
    for column in ("predictor", "predict s/LoRA", "compute s/LoRA", "images/LoRA", "speed-up"):
        table.add_column(column, justify="right")
    table.add_row(result.predictor, f"{result.predict_seconds_per_lora:.2e}", f"{result.score_seconds_per_lora:.3f}",
                  str(result.images_per_lora), f"{result.speedup:,.0f}×")
    out.print(table)
    out.print(f"results: {out_dir / RESULTS_FILE}")
    return 0

"""`lol validate | fetch | plan | status | verify | run | deploy`: a population as a whole."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from lol_models.split_rule import PROTOCOL_FRACTIONS
from pipeline.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_PROBLEMS,
    ManifestArg,
    OverridesArg,
    StoreOpt,
    err,
    load,
    out,
    progress_bar,
    report_missing_artefacts,
)
from pipeline.jobs import Job, expand
from pipeline.manifest import Manifest
from pipeline.stages import RunStage, population_status
from storage import Store

app = typer.Typer()


@app.command()
def validate(manifest: ManifestArg, overrides: OverridesArg = None) -> int:
    """Check a manifest; print every problem with its YAML path and line."""
    loaded = load(manifest, overrides)
    out.print(f"[green]✓[/] {manifest}: population [bold]{loaded.population.name}[/] "
              f"({loaded.count} LoRAs of {loaded.base.ref}, {loaded.base.kind})")
    if loaded.execution.only_splits:
        from pipeline.jobs import planned_count

        out.print(f"  planned: {planned_count(loaded)} of them, the jobs whose group falls in "
                  f"{' / '.join(loaded.execution.only_splits)} (execution.only_splits)")
        if loaded.publish.split_seed is not None or dict(loaded.publish.splits) != PROTOCOL_FRACTIONS:
            out.print("  [yellow]note:[/] these are the manifest's published splits (publish.splits, publish.split_seed), "
                      "not the LoL protocol's, so `lol train` and `lol experiment transfer`, which re-split by the "
                      "protocol, will find some of these jobs in other splits")
    return 0


@app.command()
def fetch(manifest: ManifestArg, overrides: OverridesArg = None,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be fetched (and what is cached) without downloading.")] = False) -> int:
    """Download everything the manifest needs (base at its revision, hf: datasets and benchmarks, CLIP weights) into the HF cache."""
    from pipeline.fetch import fetch_manifest

    loaded = load(manifest, overrides)
    out.print(f"{'would fetch' if dry_run else 'fetching'} what {loaded.population.name} needs into the cache (HF_HOME={_hf_home()}):",
              highlight=False, soft_wrap=True)
    outcomes = fetch_manifest(loaded, dry_run=dry_run, on_artefact=lambda o: out.print(
        f"  {o.status:<11} {o.artefact.kind:<9} {o.artefact.describe()}  ({', '.join(o.artefact.used_by)})"
        + (f"\n      {o.detail}" if o.status in ("would fetch", "local") and o.detail else ""), soft_wrap=True, highlight=False))
    problems = [o for o in outcomes if o.status in ("missing", "failed")]
    for o in problems:
        err.print(Text.assemble(("error: ", "bold red"), o.detail), highlight=False)
    if not problems and not dry_run:
        out.print(f"all {len(outcomes)} artefact(s) cached or local", highlight=False)
    return EXIT_BAD_INPUT if problems else 0


def _hf_home() -> str:
    from pipeline.artefacts import hf_home

    return hf_home()


@app.command()
def plan(manifest: ManifestArg, overrides: OverridesArg = None,
         show: Annotated[int, typer.Option(help="How many jobs to list.")] = 5) -> int:
    """Expand a manifest into jobs: the first few, and the distribution of each hyperparameter."""
    loaded = load(manifest, overrides)
    jobs = list(expand(loaded))
    table = Table(title=f"{loaded.population.name}: first {min(show, len(jobs))} of {len(jobs)} jobs")
    for column in ("k", "job id", "rank", "data", "hyperparameters"):
        table.add_column(column)
    for job in jobs[:show]:
        table.add_row(str(job.index), job.job_id, str(job.spec.rank), _data_text(job), _hyper_text(job))
    out.print(table)
    out.print(_distribution_table(jobs))
    return 0


@app.command()
def status(manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None) -> int:
    """Done / failed / claimed / pending jobs of the population, failures by reason."""
    loaded = load(manifest, overrides)
    report = population_status(loaded, Store(store, create=False))
    table = Table(title=f"{loaded.population.name} in {Store(store, create=False).url}")
    table.add_column("state")
    table.add_column("jobs", justify="right")
    for state, count in (("done", len(report.done)), ("failed", len(report.failed)),
                         ("claimed", len(report.claimed)), ("pending", len(report.pending))):
        table.add_row(state, str(count))
    if report.damaged:
        table.add_row("damaged (unsafe folder)", str(len(report.damaged)))
    if report.unplanned:
        table.add_row("done, not in this plan", str(len(report.unplanned)))
    out.print(table)
    for reason, count in report.failures_by_reason.most_common():
        out.print(f"  failed × {count}: {reason}")
    for job_id, why in list(report.damaged.items())[:10]:
        out.print(f"  damaged: {job_id}: {why} (`lol finetune` retrains it)", highlight=False)
    return 0


@app.command()
def verify(manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None,
           reseal: Annotated[bool, typer.Option("--reseal", help="First seal the records and scores written before "
                                                "seals existed (each only if its identity and checksums check out).")] = False) -> int:
    """Re-hash every stored LoRA and its scores; list corrupt, missing, foreign, unsealed or stray files; exit 1 if any."""
    loaded = load(manifest, overrides)
    population = Store(store, create=False).population(loaded.population.name)
    if reseal:
        resealed = population.reseal(population.job_ids())
        out.print(f"resealed {sum(map(len, resealed.values()))} file(s) of {len(resealed)} job(s) written before seals existed")
    # an object store is listed once, after any reseal: the listing names the jobs and spares per-job requests
    listing = None if population.store.is_local else population.object_listing()
    ids = population.job_ids() if listing is None else sorted(listing[0])
    problems, checked, scored = [], 0, {}
    with progress_bar() as progress:
        task = progress.add_task("verifying", total=len(ids))
        for _job_id, found in population.verify(ids, scored=scored, listing=listing):
            problems.extend(found)
            checked += 1
            progress.advance(task)
    for problem in problems:
        out.print(Text.assemble(("✗ ", "red"), str(problem)), highlight=False)
    bad_jobs = len({p.job_id for p in problems})
    out.print(f"{checked - bad_jobs} of {checked} stored LoRAs verify; {len(problems)} problem(s).")
    _print_unscored(loaded, scored)
    if problems:
        out.print("repair: `lol finetune` retrains damaged LoRAs, then `lol score` relabels them")
    return EXIT_PROBLEMS if problems else 0


def _print_unscored(loaded: Manifest, scored: dict[str, set[str]]) -> None:
    """Note intact LoRAs lacking a score of the manifest's scorers (never scored, or the file was
    deleted), from what `verify` found: `scored` holds each intact LoRA's verified scorer ids."""
    from pipeline.score import scorer_id
    from pipeline.stages import planned_ids

    sids = [scorer_id(spec) for spec in loaded.scorers]
    unscored = [job_id for job_id in planned_ids(loaded) if job_id in scored and not all(sid in scored[job_id] for sid in sids)]
    if unscored:
        shown = ", ".join(unscored[:10]) + (f" and {len(unscored) - 10} more" if len(unscored) > 10 else "")
        out.print(f"unscored: {len(unscored)} intact LoRA(s) lack a score of {', '.join(sids)}: {shown} "
                  "(`lol score` adds them)", highlight=False)


@app.command()
def run(
    manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None,
    api_url: Annotated[Optional[str], typer.Option("--api-url", envvar="PREFECT_API_URL",
                                                   help="Prefect API to run on; default: a local ephemeral one.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N jobs of the population.")] = None,
    stages: Annotated[Optional[list[RunStage]], typer.Option(
        "--stage", help="Run only this stage; repeatable (default: all, in order).", show_default=False)] = None,
    workers: Annotated[int, typer.Option(min=1, help="Local worker processes for finetune and score tasks, and for the learn stage's (predictor, target) units (one per core suits the tiny world).")] = 1,
) -> int:
    """Run every stage through Prefect (run_population), skipping what the store already holds."""
    import importlib

    from pipeline.score import make_scorer
    from pipeline.stages import trainer_factory

    loaded = load(manifest, overrides)  # every check happens before a task is submitted
    trainer_factory(loaded.base.kind)
    for spec in loaded.scorers:
        make_scorer(spec)
    target = Store(store, create=False)  # reachable and of a format we read; a refused run leaves no new store
    commands = importlib.import_module("flows.commands")  # the Prefect side lives in flows/
    chosen = [s.value for s in RunStage if s in (stages or list(RunStage))]  # always in pipeline order
    if {"finetune", "score"} & set(chosen) and report_missing_artefacts(loaded):  # one line each, before any task
        return EXIT_BAD_INPUT
    if "finetune" in chosen:  # the data, here: a refusal is one line, not Prefect's task tracebacks
        from pipeline.finetune.runner import plan_jobs
        from pipeline.preflight import check_before_training

        population = target.population(loaded.population.name)
        _, todo = plan_jobs(loaded, population, limit)
        if todo:
            check_before_training(loaded, population, todo)
    results = commands.run(str(manifest), list(overrides or []), store, api_url, limit, chosen, workers)
    table = Table(title=f"run {loaded.population.name}")
    table.add_column("stage")
    table.add_column("outcome")
    for stage_name, outcome in results.items():
        table.add_row(stage_name, ", ".join(f"{k}: {v}" for k, v in outcome.items()) if isinstance(outcome, dict) else str(outcome))
    out.print(table)
    return 0


@app.command()
def deploy(
    api_url: Annotated[Optional[str], typer.Option("--api-url", envvar="PREFECT_API_URL", help="Prefect server API.")] = None,
    name: Annotated[Optional[list[str]], typer.Option(help="Deployment(s) of prefect.yaml; default all.")] = None,
    work_pool: Annotated[str, typer.Option(help="Work pool the deployments use.")] = "gpu",
) -> int:
    """Apply prefect.yaml's deployments to a Prefect server."""
    import importlib

    commands = importlib.import_module("flows.commands")
    for deployed in commands.deploy(api_url, name, work_pool):
        out.print(f"[green]✓[/] deployment {deployed}")
    return 0


def _data_text(job: Job) -> str:
    data = job.spec.data
    detail = {"identity_groups": lambda: f"group {data.get('group')}",
              "class_subsets": lambda: ", ".join(data.get("classes", [])),
              "source_subsets": lambda: ", ".join(data.get("sources", []))}[data["kind"]]()
    return f"{data['source']}: {detail}"


def _hyper_text(job: Job) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(job.spec.hyperparameters.items()))


def _distribution_table(jobs: list[Job]) -> Table:
    table = Table(title=f"distribution over {len(jobs)} jobs")
    table.add_column("hyperparameter")
    table.add_column("values")
    columns: dict[str, list] = {"rank": [j.spec.rank for j in jobs], "lora_dropout": [j.spec.lora_dropout for j in jobs]}
    for job in jobs:
        for key, value in job.spec.hyperparameters.items():
            columns.setdefault(key, []).append(value)
    for key in sorted(columns):
        values = columns[key]
        counts = Counter(values)
        if len(counts) <= 12 or not all(isinstance(v, (int, float)) for v in values):
            text = "  ".join(f"{v}: {n}" for v, n in sorted(counts.items(), key=lambda kv: str(kv[0])))
        else:
            text = (f"min {min(values):.4g}  median {statistics.median(values):.4g}  max {max(values):.4g}  "
                    f"({len(counts)} distinct)")
        table.add_row(key, text)
    return table

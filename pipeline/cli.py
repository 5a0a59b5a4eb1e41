"""`lol`: the front door. Every subcommand is a thin call into library functions.

`main(argv)` returns the exit code instead of exiting, so tests call it directly.
Exit codes: 0 ok, 1 the command ran and found problems (e.g. `verify`), 2 bad input.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pipeline.bases import BaseModelError
from pipeline.data.base import DataSourceError
from pipeline.jobs import Job, expand
from pipeline.manifest import Manifest, ManifestError
from pipeline.publish import PublishError
from pipeline.stages import population_status
from storage import Store, StoreError

app = typer.Typer(
    name="lol",
    help="Populations of finetuned LoRAs: finetune, score, publish, and learn on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)  # a line is one line in logs and pipes, whatever the path lengths
err = Console(stderr=True, soft_wrap=True)

USER_ERRORS = (ManifestError, StoreError, DataSourceError, BaseModelError, PublishError, ValueError, FileNotFoundError)
EXIT_PROBLEMS, EXIT_BAD_INPUT = 1, 2

ManifestArg = Annotated[Path, typer.Argument(help="Manifest YAML file.", show_default=False)]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides, e.g. count=10 lora.rank=8.", show_default=False)]
StoreOpt = Annotated[Optional[str], typer.Option("--store", help="Store URL or path; default $LOL_STORE, else ./lol-store.")]


def load(manifest_path: Path, overrides: list[str] | None) -> Manifest:
    return Manifest.from_yaml(manifest_path, overrides=overrides or [])


@app.command()
def validate(manifest: ManifestArg, overrides: OverridesArg = None) -> int:
    """Check a manifest; print every problem with its YAML path and line."""
    loaded = load(manifest, overrides)
    out.print(f"[green]✓[/] {manifest}: population [bold]{loaded.population.name}[/] "
              f"({loaded.count} LoRAs of {loaded.base.ref}, {loaded.base.kind})")
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
    ids = population.job_ids()
    if reseal:
        resealed = population.reseal(ids)
        out.print(f"resealed {sum(map(len, resealed.values()))} file(s) of {len(resealed)} job(s) written before seals existed")
    problems, checked = [], 0
    with _progress() as progress:
        task = progress.add_task("verifying", total=len(ids))
        for _job_id, found in population.verify(ids):
            problems.extend(found)
            checked += 1
            progress.advance(task)
    for problem in problems:
        out.print(Text.assemble(("✗ ", "red"), str(problem)), highlight=False)
    bad_jobs = len({p.job_id for p in problems})
    out.print(f"{checked - bad_jobs} of {checked} stored LoRAs verify; {len(problems)} problem(s).")
    _print_unscored(loaded, population, {p.job_id for p in problems})
    if problems:
        out.print("repair: `lol finetune` retrains damaged LoRAs, then `lol score` relabels them")
    return EXIT_PROBLEMS if problems else 0


def _print_unscored(loaded: Manifest, population, damaged: set[str]) -> None:
    """Note intact LoRAs lacking a score of the manifest's scorers (never scored, or the file was deleted)."""
    from pipeline.score import scorer_id

    sids = [scorer_id(spec) for spec in loaded.scorers]
    unscored = [job.job_id for job in expand(loaded) if job.job_id not in damaged and population.record(job.job_id) is not None
                and not all(population.has_score(job.job_id, sid) for sid in sids)]
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
    stages: Annotated[str, typer.Option(help="Comma-separated subset of finetune,score,publish,learn.")] = "finetune,score,publish,learn",
    workers: Annotated[int, typer.Option(help="Local worker processes for finetune and score tasks (one per core suits the tiny world).")] = 1,
) -> int:
    """Run every stage through Prefect (run_population), skipping what the store already holds."""
    import importlib

    from pipeline.score import make_scorer
    from pipeline.stages import trainer_factory

    loaded = load(manifest, overrides)  # every check happens before a task is submitted
    trainer_factory(loaded.base.kind)
    for spec in loaded.scorers:
        make_scorer(spec)
    Store(store)
    commands = importlib.import_module("flows.commands")  # the Prefect side lives in flows/
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    valid = ("finetune", "score", "publish", "learn")
    if not chosen or set(chosen) - set(valid):
        raise ValueError(f"--stages {stages!r}: choose from {', '.join(valid)}")
    if workers < 1:
        raise ValueError(f"--workers must be ≥ 1, got {workers}")
    if {"finetune", "score"} & set(chosen):  # hub artefacts first: one line each, before any task starts
        from pipeline.fetch import missing_artefacts

        if missing := missing_artefacts(loaded):
            for line in missing:
                err.print(Text.assemble(("error: ", "bold red"), line), highlight=False)
            return EXIT_BAD_INPUT
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


bench_app = typer.Typer(help="Benchmarks: results go to bench/results/ and a table.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
BenchManifest = Annotated[Path, typer.Option("--manifest", help="Population to measure.")]
BenchCount = Annotated[int, typer.Option(help="LoRAs per mode.")]


def _bench_table(title: str, measurements, path: Path) -> None:
    table = Table(title=title)
    for column in ("benchmark", "mode", "LoRAs", "seconds", "LoRAs/hour", "peak RSS MB", "processes"):
        table.add_column(column, justify="right")
    for m in measurements:
        table.add_row(m.benchmark, m.mode, str(m.loras), f"{m.seconds:.1f}", f"{m.loras_per_hour:.0f}", f"{m.peak_rss_mb:.0f}", str(m.processes))
    out.print(table)
    out.print(f"results: {path}")


def _check_modes(modes: str) -> None:
    from pipeline.bench import MODES

    unknown = [m.strip() for m in modes.split(",") if m.strip() not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; modes: {', '.join(MODES)}")


@bench_app.command("finetune")
def bench_finetune_command(
    overrides: OverridesArg = None, manifest: BenchManifest = Path("manifests/tiny-shapes.yaml"), count: BenchCount = 16,
    modes: Annotated[str, typer.Option(help="Comma-separated: process, sequential, cohort.")] = "process,sequential,cohort",
) -> int:
    """LoRAs per hour and peak memory of finetuning, per mode, each in fresh processes."""
    from pipeline.bench import bench_finetune, write_results

    load(manifest, overrides)
    _check_modes(modes)
    results = bench_finetune(str(manifest), list(overrides or []), count, [m.strip() for m in modes.split(",")])
    _bench_table("lol bench finetune", results, write_results("finetune", results, {"manifest": str(manifest), "overrides": overrides, "count": count}))
    return 0


@bench_app.command("labels")
def bench_labels_command(
    manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None,
    output: Annotated[Optional[Path], typer.Option(help="JSON to write (default: bench/results/labels-{population}.json).")] = None,
) -> int:
    """Are the labels informative? Spread of every label and Kendall τ against lr × steps/epochs and each hyperparameter."""
    import json as json_module

    from pipeline.label_stats import label_statistics

    loaded = load(manifest, overrides)
    result = label_statistics(loaded, Store(store, create=False))
    if not result["labels"]:
        raise ValueError(f"no scores stored for {loaded.population.name!r}; run `lol score {manifest}` first")
    table = Table(title=f"labels of {loaded.population.name} ({result['planned']} planned)")
    table.add_column("label", overflow="fold")  # long attribute tests wrap instead of being cut
    for column in ("n", "mean", "std", "min", "max", "τ vs lr×length (p)"):
        table.add_column(column, justify="right")
    for column, s in result["labels"].items():
        tau = s["kendall"].get("lr×length")
        table.add_row(column, str(s["count"]), f"{s['mean']:.4g}", f"{s['std']:.4g}", f"{s['min']:.4g}", f"{s['max']:.4g}",
                      f"{tau['tau']:+.3f} ({tau['p_value']:.2g})" if tau else "—")
    out.print(table)
    path = output or Path("bench/results") / f"labels-{loaded.population.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json_module.dumps(result, indent=1))
    out.print(f"results: {path}")
    return 0


@bench_app.command("score")
def bench_score_command(
    overrides: OverridesArg = None, manifest: BenchManifest = Path("manifests/tiny-shapes.yaml"), count: BenchCount = 16,
    modes: Annotated[str, typer.Option(help="Comma-separated: process, sequential, cohort.")] = "process,sequential,cohort",
) -> int:
    """LoRAs per hour and peak memory of scoring, per mode (finetuning first, untimed)."""
    from pipeline.bench import bench_score, write_results

    load(manifest, overrides)
    _check_modes(modes)
    results = bench_score(str(manifest), list(overrides or []), count, [m.strip() for m in modes.split(",")])
    _bench_table("lol bench score", results, write_results("score", results, {"manifest": str(manifest), "overrides": overrides, "count": count}))
    return 0


@bench_app.command("unet")
def bench_unet_command(
    config: Annotated[str, typer.Option(help="UNet shape: sd15 (SD-1.5, 512 px) or small.")] = "sd15",
    adapters: Annotated[int, typer.Option(help="LoRAs K per mode (batch 1 each).")] = 8,
    steps: Annotated[int, typer.Option(help="Optimizer steps per LoRA.")] = 10,
    device: Annotated[Optional[str], typer.Option(help="cuda or cpu (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or bf16.")] = "bf16",
    modes: Annotated[str, typer.Option(help="Comma-separated: sequential, cohort.")] = "sequential,cohort",
) -> int:
    """LoRA training throughput on an SD-shaped UNet with random weights: sequential vs cohort, TFLOP/s."""
    import json as json_module
    import time as time_module
    from dataclasses import asdict

    from pipeline.bench_unet import bench_unet

    results, facts = bench_unet(config, adapters, steps, device, dtype, tuple(m.strip() for m in modes.split(",")))
    table = Table(title=f"lol bench unet: {config}, {facts['device']}, {dtype}")
    for column in ("mode", "LoRAs", "steps", "seconds", "LoRA-steps/s", "TFLOP/s", "of peak", "peak MB"):
        table.add_column(column, justify="right")
    for m in results:
        share = f"{m.achieved_tflops / facts['peak_tflops']:.1%}" if facts["peak_tflops"] else "—"
        table.add_row(m.mode, str(m.adapters), str(m.steps), f"{m.seconds:.2f}", f"{m.adapter_steps_per_second:.2f}",
                      f"{m.achieved_tflops:.2f}", share, f"{m.peak_memory_mb:.0f}")
    out.print(table)
    path = Path("bench/results") / f"unet-{config}-{time_module.strftime('%Y%m%dT%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json_module.dumps({"facts": facts, "results": [
        {**asdict(m), "adapter_steps_per_second": m.adapter_steps_per_second, "achieved_tflops": m.achieved_tflops}
        for m in results]}, indent=2) + "\n")
    out.print(f"results: {path}")
    return 0


@bench_app.command("orchestration")
def bench_orchestration_command(
    overrides: OverridesArg = None, manifest: BenchManifest = Path("manifests/tiny-shapes.yaml"), count: BenchCount = 8,
) -> int:
    """The same population through the library and through the Prefect flows: the overhead."""
    from pipeline.bench import bench_orchestration, write_results

    load(manifest, overrides)
    results = bench_orchestration(str(manifest), list(overrides or []), count)
    direct, flows = results
    _bench_table("lol bench orchestration", results, write_results("orchestration", results, {"manifest": str(manifest), "overrides": overrides, "count": count}))
    overhead = flows.seconds - direct.seconds
    server = flows.extra.get("ephemeral_server_start_s")
    out.print(f"orchestration overhead: {overhead:+.1f} s ({100 * overhead / direct.seconds:+.0f}% of the library run)"
              + (f"; the ephemeral server start took {server:.1f} s of it" if server else ""))
    return 0


@bench_app.command("faults")
def bench_faults_command(
    overrides: OverridesArg = None, manifest: BenchManifest = Path("manifests/tiny-shapes.yaml"),
    scenarios: Annotated[str, typer.Option(help="Comma-separated scenarios, or all: kill, concurrent-2, concurrent-4, job-exception, "
                                                "non-finite-loss, out-of-memory, scorer-crash, full-disk, flaky-store.")] = "all",
    trials: Annotated[Optional[list[str]], typer.Option(help="Seeded trials: N for every scenario, or SCENARIO=N; repeatable "
                                                             "(default: 10 kills, 2 of each other, 1 scorer crash).")] = None,
    lease: Annotated[float, typer.Option(help="Claim lease of the workers in seconds: a killed worker's claims expire this soon.")] = 2.0,
    mount: Annotated[bool, typer.Option(help="Full disk as a size-limited tmpfs (needs root); --no-mount: a write quota.")] = True,
    work_dir: Annotated[Optional[Path], typer.Option(help="Where the trials' stores go (default: a temp dir, removed after).")] = None,
) -> int:
    """Fault injection: workers killed, racing, failing, on a full disk or a flaky store; a table of the promises held."""
    import tempfile

    from pipeline.faults.report import rows, write_results
    from pipeline.faults.scenarios import SCENARIOS, run_scenarios, trial_counts

    loaded = load(manifest, overrides)
    if loaded.base.kind != "diffusion":
        raise ValueError(f"lol bench faults injects faults into diffusion smoke populations; {manifest} is {loaded.base.kind}")
    chosen = list(SCENARIOS) if scenarios.strip() == "all" else [s.strip() for s in scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown or not chosen:
        raise ValueError(f"--scenarios {scenarios!r}: choose from all, {', '.join(SCENARIOS)}")
    counts = trial_counts(chosen, _trials_option(trials or [], chosen))
    total = sum(counts.values())
    with tempfile.TemporaryDirectory(prefix="lol-bench-faults-", dir=work_dir) as tmp:
        lab = _fault_lab(manifest, loaded, list(overrides or []), Path(tmp), lease, mount)
        with _progress() as progress:
            task = progress.add_task("fault trials", total=total)
            done = run_scenarios(lab, chosen, counts, on_trial=lambda t: progress.update(
                task, advance=1, description=f"{t.scenario} ({t.variant}) {'✓' if t.ok else '✗'}"))
    table = Table(title=f"lol bench faults: {total} trials on a smoke population of {loaded.population.name}")
    for column in ("scenario", "variant", "trials", "promises held", "outcomes", "measured", "s/trial"):
        table.add_column(column, overflow="fold")
    for row in rows(done):
        table.add_row(row.scenario, row.variant, str(row.trials), f"{row.held} of {row.trials}", row.outcomes, row.measured,
                      f"{row.seconds:.1f}")
    out.print(table)
    for trial in (t for t in done if not t.ok):
        out.print(f"✗ {trial.scenario} ({trial.variant}) trial {trial.trial}: " + "; ".join(trial.problems), highlight=False)
    path = write_results(done, {"manifest": str(manifest), "overrides": overrides, "scenarios": chosen, "trials": counts,
                                "lease_s": lease, "mount": mount})
    out.print(f"results: {path}")
    return 0 if all(t.ok for t in done) else EXIT_PROBLEMS


def _trials_option(values: list[str], chosen: list[str]) -> dict[str, int]:
    """`--trials N` (every chosen scenario) and `--trials SCENARIO=N` (that one), later ones winning."""
    counts: dict[str, int] = {}
    for value in values:
        name, _, number = value.rpartition("=")
        if not number.strip().isdigit() or int(number) < 1 or (name and name not in chosen):
            raise ValueError(f"--trials {value!r}: give N ≥ 1, or SCENARIO=N with one of {', '.join(chosen)}")
        counts.update({name: int(number)} if name else dict.fromkeys(chosen, int(number)))
    return counts


def _fault_lab(manifest: Path, loaded: Manifest, overrides: list[str], work: Path, lease: float, mount: bool):
    """A FaultLab whose base is resolved once (a `tiny:` base is built or copied here, not in every trial's store)."""
    from pipeline.bases.loading import resolve_base
    from pipeline.faults.lab import FaultLab

    base, _ = resolve_base(loaded.base.model_dump(), Store(str(work / "bases")))
    pinned = [f"base.ref={base}", "base.size=full"] if Path(base).exists() else []
    return FaultLab(str(manifest), [*overrides, *pinned], work / "trials", lease_s=lease, mount=mount)


@bench_app.command("load")
def bench_load_command(
    sd_loras: Annotated[int, typer.Option(help="SD-1.4-shaped rank-4 LoRAs (random weights) to stream.")] = 2000,
    tiny_loras: Annotated[int, typer.Option(help="Tiny-world-shaped LoRAs to open as tensors.")] = 1000,
    work_dir: Annotated[Optional[Path], typer.Option(help="Where to write the test data (default: a temp dir).")] = None,
) -> int:
    """Reading published weights: tiny population as tensors; SD-shaped streamed vs per-file safetensors."""
    import tempfile

    from pipeline.bench import bench_load, write_results

    with tempfile.TemporaryDirectory(prefix="lol-bench-load-", dir=work_dir) as tmp:
        results = bench_load(sd_loras, tiny_loras, Path(tmp))
    _bench_table("lol bench load", results, write_results("load", results, {"sd_loras": sd_loras, "tiny_loras": tiny_loras}))
    per_file = next((m for m in results if m.mode.endswith("per-file")), None)
    streamed = next((m for m in results if m.mode.endswith("stream")), None)
    if per_file and streamed:
        out.print(f"streaming is {per_file.seconds / streamed.seconds:.2f}× the speed of per-file safetensors "
                  f"(peak RSS {streamed.peak_rss_mb:.0f} MB vs {per_file.peak_rss_mb:.0f} MB)")
    return 0


@bench_app.command("scaling")
def bench_scaling_command(
    models: Annotated[str, typer.Option(help="Comma-separated predictors.")] = "mlp,mlp_svd,mlp_oalign,mlp_dense,transformer,glnet",
    memory_gb: Annotated[float, typer.Option(help="Address-space limit per measurement.")] = 16.0,
) -> int:
    """Forward time and peak memory of each predictor on rank-4 LoRAs shaped like GPT-3 125M…175B."""
    import json as json_module
    import time

    from lol_models.scaling import GPT3_SIZES, as_rows, plot, scaling

    chosen = [m.strip() for m in models.split(",") if m.strip()]
    points = scaling(chosen, memory_limit_gb=memory_gb)
    table = Table(title="forward time (ms) / peak RSS (MB), batch 1, rank 4, one d×d LoRA per layer")
    table.add_column("model")
    for size in GPT3_SIZES:
        table.add_column(size, justify="right")
    for model in chosen:
        cells = []
        for size in GPT3_SIZES:
            point = next((p for p in points if p.model == model and p.size == size), None)
            cells.append("" if point is None else f"{point.forward_ms:.1f} / {point.peak_rss_mb:.0f}" if point.status == "ok" else point.status.split(":")[0])
        table.add_row(model, *cells)
    out.print(table)
    RESULTS = Path("bench/results")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (RESULTS / f"scaling-{stamp}.json").write_text(json_module.dumps({"memory_limit_gb": memory_gb, "points": as_rows(points)}, indent=1))
    plot(points, RESULTS / f"scaling-{stamp}.png")
    out.print(f"results: {RESULTS / f'scaling-{stamp}.json'} and .png")
    return 0


bases_app = typer.Typer(help="Build and list the built-in tiny bases (tiny:shapes-sd, tiny:shapes-clip, tiny:qa-lm).",
                        no_args_is_help=True)
app.add_typer(bases_app, name="bases")


@bases_app.command("build")
def bases_build(
    names: Annotated[Optional[list[str]], typer.Argument(help="Bases to build (default: all).", show_default=False)] = None,
    size: Annotated[str, typer.Option(help="full, or smoke (seconds; for tests).")] = "full",
    force: Annotated[bool, typer.Option(help="Rebuild even if the cache holds it.")] = False,
    ship: Annotated[bool, typer.Option(help="Also copy each build into pipeline/bases/shipped/ (maintainers: what the repository ships).")] = False,
    store: StoreOpt = None,
) -> int:
    """Pretrain each base once and cache it under {store}/bases/, keyed by its recipe hash."""
    from pipeline.bases import TINY_MODULES
    from pipeline.bases.cache import ensure_base, shipped_bytes, shipped_names
    from pipeline.bases.cache import ship as ship_base

    target = Store(store)
    table = Table(title=f"tiny bases in {target.url}")
    for column in ("base", "recipe", "from", "metrics"):
        table.add_column(column)
    for name in names or list(TINY_MODULES):
        with _progress() as progress:
            task = progress.add_task(f"tiny:{name.removeprefix('tiny:')}", total=None)
            built = ensure_base(name, target, size=size, force=force,
                                progress=lambda done, total, task=task: progress.update(task, completed=done, total=total),
                                log=lambda message: err.print(message, highlight=False))
        metrics = " ".join(f"{k}={v}" for k, v in sorted(built.metrics.items()) if not isinstance(v, (dict, list)))
        table.add_row(f"tiny:{built.name}", built.recipe.folder, built.source, metrics)
        if ship and built.name in shipped_names():
            err.print(f"shipped: {ship_base(built)}", highlight=False)
        elif ship:
            err.print(f"tiny:{built.name} is not shipped (SHIPPED = False in its module): built only", highlight=False)
    out.print(table)
    if ship:
        sizes = shipped_bytes()
        out.print(f"shipped weights: {sum(sizes.values()) / 1e6:.1f} MB in all ({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in sizes.items())})")
    return 0


@bases_app.command("evaluate")
def bases_evaluate(
    size: Annotated[str, typer.Option(help="full, or smoke (seconds; for tests).")] = "full",
    samples: Annotated[int, typer.Option(help="Images per caption for prompt following.")] = 8,
    effect_images: Annotated[int, typer.Option(help="Neutral-prompt images per LoRA for the colour effect.")] = 48,
    colours: Annotated[Optional[list[str]], typer.Option("--colour", help="Colours for the LoRA effect (default: all 8).")] = None,
    grid: Annotated[Optional[Path], typer.Option(help="Also save one generated image per caption as a PNG grid.")] = None,
    effect_grid: Annotated[Optional[Path], typer.Option(help="Also save neutral-prompt images without and with each colour's LoRA as a PNG.")] = None,
    output: Annotated[Path, typer.Option(help="Where to write the figures (JSON).")] = Path("bench/results/tiny-world-quality.json"),
    store: StoreOpt = None,
) -> int:
    """Measure tiny:shapes-sd: prompted colour/shape by tiny:shapes-clip and by pixels, and a LoRA's colour effect."""
    import json as json_module

    from pipeline.bases import shapes_clip, shapes_sd
    from pipeline.bases.cache import ensure_base
    from pipeline.bases.shapes_quality import evaluate_base
    from pipeline.data.shapes import COLORS

    unknown = sorted(set(colours or []) - set(COLORS))
    if unknown:
        raise typer.BadParameter(f"unknown colour(s) {unknown}; valid: {', '.join(COLORS)}", param_hint="--colour")
    target = Store(store)
    log = lambda message: err.print(message, highlight=False)  # noqa: E731
    sd = ensure_base("shapes-sd", target, size=size, log=log)
    clip = ensure_base("shapes-clip", target, size=size, log=log)
    pipe = shapes_sd.load(sd.path)
    with _progress() as progress:
        progress.add_task("generating and finetuning", total=None)
        result = evaluate_base(pipe, shapes_clip.load(clip.path), samples, effect_images, colours or COLORS,
                               effect_grid=effect_grid)
    result["bases"] = {"shapes-sd": sd.recipe.folder, "shapes-clip": clip.recipe.folder}
    table = Table(title=f"tiny:shapes-sd ({sd.recipe.folder})")
    for column in ("judge", "prompted colour", "prompted shape", "both", "LoRA colour ratio (min over colours)"):
        table.add_column(column)
    for judge in ("clip", "pixels"):
        pf = result["prompt_following"][judge]
        table.add_row(judge, f"{pf['color_accuracy']:.1%}", f"{pf['shape_accuracy']:.1%}", f"{pf['both_accuracy']:.1%}",
                      f"{result['lora_effect']['min_ratio'][judge]:.2f}×")
    out.print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json_module.dumps(result, indent=1))
    out.print(f"results: {output}")
    if grid is not None:
        shapes_sd.save_sample_grid(pipe, grid)
        out.print(f"samples: {grid}")
    if effect_grid is not None:
        out.print(f"LoRA effect samples: {effect_grid}")
    return 0


@bases_app.command("list")
def bases_list(store: StoreOpt = None) -> int:
    """The built bases the store holds."""
    target = Store(store, create=False)
    entries = target.list_dir("bases")
    for entry in entries:
        out.print(entry)
    if not entries:
        out.print(f"no built bases in {target.url}; `lol bases build` makes them")
    return 0


experiment_app = typer.Typer(help="LoL experiments beyond the main table: rank generalisation, transfer, speed.",
                             no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")


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
) -> int:
    """Train the predictors on some LoRA ranks of a published population, test on unseen ranks."""
    from lol_models.rank_generalisation import rank_generalisation
    from pipeline.stages import learn_target

    published, learn_dir, settings = learn_target(load(manifest, overrides), Store(store, create=False))
    result = rank_generalisation(published, settings, Path(learn_dir) / "ranks", train_rank, test_rank)
    out.print(_shift_table(f"rank generalisation: train {result.train_ranks}, test {result.test_ranks}", result.tasks, ("seen", "unseen")))
    out.print(f"results: {result.results_path}; figure: {result.figure_path}")
    return 0


@experiment_app.command("transfer")
def experiment_transfer(
    manifest: ManifestArg,
    to: Annotated[Path, typer.Option("--to", help="Manifest of the population to test on (e.g. its base's continued version).")],
    overrides: OverridesArg = None,
    store: StoreOpt = None,
) -> int:
    """Train the predictors on one published population, test on another (e.g. tiny-shapes → tiny-shapes-continued).

    `key=value` overrides apply to both manifests (e.g. learn.seeds=5)."""
    from lol_models.transfer import train_on_a_test_on_b
    from pipeline.stages import learn_target

    target = Store(store, create=False)
    source_manifest, target_manifest = load(manifest, overrides), load(to, overrides)
    published_a, _, settings = learn_target(source_manifest, target)
    published_b, learn_b, _ = learn_target(target_manifest, target)
    result = train_on_a_test_on_b(published_a, published_b, settings,
                                  Path(learn_b) / f"transfer-from-{source_manifest.population.name}")
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


@app.command("finetune")
def finetune_command(
    manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N jobs of the population.")] = None,
    shard: Annotated[Optional[str], typer.Option(help="Run shard i/n of the jobs (e.g. 2/4).")] = None,
) -> int:
    """Train one LoRA per job the store lacks (resumable), with a summary table."""
    loaded = load(manifest, overrides)
    summary = _run_finetune(loaded, Store(store), limit, shard)
    return EXIT_PROBLEMS if summary.failed else 0


def _run_finetune(loaded: Manifest, target: Store, limit: int | None = None, shard_spec: str | None = None):
    from pipeline.stages import finetune

    total = min(limit or loaded.count, loaded.count)
    with _progress() as progress:
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
    from pipeline.stages import score

    total = min(limit or loaded.count, loaded.count) * len(only or loaded.scorers)
    with _progress() as progress:
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

    from lol_models.data import PulledDataError, pull

    started = time.perf_counter()
    try:
        dataset = pull(repo_or_path, split=split, non_finite=non_finite)
    except PulledDataError as exc:
        raise ValueError(str(exc)) from None
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
def train_command(manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None) -> int:
    """Train every predictor of the manifest's `learn` section on every target, over seeds."""
    from pipeline.stages import learn_target, train

    loaded = load(manifest, overrides)
    target = Store(store)
    published, out_dir, settings = learn_target(loaded, target)
    with _progress() as progress:
        task = progress.add_task(f"training predictors on {loaded.population.name}", total=None)
        written = train(loaded, target, on_run=lambda predictor, name: progress.update(task, description=f"{predictor} on {name}", advance=1))
    out.print(f"trained {len(written)} predictor × task runs ({settings.seeds} seed(s) each) into {out_dir}/runs")
    return 0


@app.command("evaluate")
def evaluate_command(manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None) -> int:
    """Collect the trained predictors' test metrics into results.json and results.md."""
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


# ---------------------------------------------------------------- helpers


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True)


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


def _hint(exc: Exception) -> str | None:
    if isinstance(exc, ManifestError):
        return "fix the lines above; `lol validate FILE` re-checks without running anything"
    if isinstance(exc, StoreError):
        return "pass --store PATH_OR_URL or set LOL_STORE"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 problems found, 2 bad input)."""
    if os.environ.get("LOL_TORCH_THREADS"):  # small models on shared CPUs run faster on one thread
        import torch

        torch.set_num_threads(int(os.environ["LOL_TORCH_THREADS"]))
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="lol", standalone_mode=False)
    except (click.exceptions.Exit, typer.Exit) as exc:
        return exc.exit_code
    except (click.exceptions.Abort, typer.Abort):
        err.print("aborted")
        return 130
    except (click.ClickException, typer.TyperException) as exc:  # typer ≥ 0.2x raises its own copy of click's
        exc.show()
        return EXIT_BAD_INPUT
    except USER_ERRORS as exc:
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False)
        if (hint := _hint(exc)) is not None:
            err.print(f"hint: {hint}")
        return EXIT_BAD_INPUT
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

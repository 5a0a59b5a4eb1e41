"""`lol bench …`: the benchmarks (a plugin of the `lol` CLI, registered under the `lol.commands` entry points).

Results go to bench/results/ and a table; docs/performance.md summarises them.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from bench import BenchError
from bench.faults import SCENARIO_NAMES
from bench.measure import MODES
from bench.rehearsal import POPULATIONS
from lol_models.names import Predictor
from pipeline.cli.common import (
    EXIT_PROBLEMS,
    ManifestArg,
    OverridesArg,
    StoreOpt,
    load,
    out,
    progress_bar,
)
from pipeline.manifest import Manifest
from storage import Store

bench_app = typer.Typer(help="Benchmarks: results go to bench/results/ and a table.", no_args_is_help=True)
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


Mode = Enum("Mode", {m: m for m in MODES}, type=str)
ModesOpt = Annotated[Optional[list[Mode]], typer.Option("--mode", help="Measure this mode; repeatable (default: all).", show_default=False)]
PaperPopulation = Enum("PaperPopulation", {name: name for name in POPULATIONS}, type=str)
RehearsalScale = Enum("RehearsalScale", {name: name for name in ("exact", "small")}, type=str)
FaultScenario = Enum("FaultScenario", {name: name for name in SCENARIO_NAMES}, type=str)
UnetMode = Enum("UnetMode", {m: m for m in MODES if m != "process"}, type=str)


def chosen(values: list[Enum] | None, every: type[Enum]) -> list[str]:
    """The values of a repeatable choice option, in the choices' order; all of them when none was given."""
    return [m.value for m in every if m in (values or list(every))]


@bench_app.command("finetune")
def bench_finetune_command(
    overrides: OverridesArg = None, manifest: BenchManifest = Path("manifests/tiny-shapes.yaml"), count: BenchCount = 16,
    modes: ModesOpt = None,
) -> int:
    """LoRAs per hour and peak memory of finetuning, per mode, each in fresh processes."""
    from bench.measure import bench_finetune, write_results

    load(manifest, overrides)
    results = bench_finetune(str(manifest), list(overrides or []), count, chosen(modes, Mode))
    _bench_table("lol bench finetune", results, write_results("finetune", results, {"manifest": str(manifest), "overrides": overrides, "count": count}))
    return 0


@bench_app.command("labels")
def bench_labels_command(
    manifest: ManifestArg, overrides: OverridesArg = None, store: StoreOpt = None,
    output: Annotated[Optional[Path], typer.Option(help="JSON to write (default: bench/results/labels-{population}.json).")] = None,
    base: Annotated[bool, typer.Option("--base", help="Also score the base model without an adapter (loads it once per scorer).")] = False,
) -> int:
    """Are the labels informative? Spread of every label, its distinct values, Kendall τ against lr × steps/epochs, each
    hyperparameter and the other labels, and its mean per quintile of lr × steps/epochs."""
    from bench.measure import write_json
    from pipeline.label_stats import base_labels, label_statistics

    loaded = load(manifest, overrides)
    opened = Store(store, create=False)
    result = label_statistics(loaded, opened, base_labels(loaded, opened) if base else None)
    if not result["labels"]:
        raise BenchError(f"no scores stored for {loaded.population.name!r}; run `lol score {manifest}` first")
    table = Table(title=f"labels of {loaded.population.name} ({result['planned']} planned)")
    table.add_column("label", overflow="fold")  # long attribute tests wrap instead of being cut
    for column in ("n", "distinct", "base", "mean", "std", "min", "max", "τ vs lr×length (p)", "mean by lr×length quintile"):
        table.add_column(column, justify="right")
    for column, s in result["labels"].items():
        tau = s["kendall"].get("lr×length")
        table.add_row(column, str(s["count"]), str(s["distinct"]), f"{s['base']:.4g}" if "base" in s else "—", f"{s['mean']:.4g}",
                      f"{s['std']:.4g}", f"{s['min']:.4g}", f"{s['max']:.4g}", f"{tau['tau']:+.3f} ({tau['p_value']:.2g})" if tau else "—",
                      " ".join(f"{b['mean']:.3g}" for b in s["by_budget"]) or "—")
    out.print(table)
    name = f"labels-{loaded.population.name}"
    path = write_json(output.stem, result, output.parent, stamped=False) if output else write_json(name, result, stamped=False)
    out.print(f"results: {path}")
    return 0


@bench_app.command("score")
def bench_score_command(
    overrides: OverridesArg = None, manifest: BenchManifest = Path("manifests/tiny-shapes.yaml"), count: BenchCount = 16,
    modes: ModesOpt = None,
) -> int:
    """LoRAs per hour and peak memory of scoring, per mode (finetuning first, untimed)."""
    from bench.measure import bench_score, write_results

    load(manifest, overrides)
    results = bench_score(str(manifest), list(overrides or []), count, chosen(modes, Mode))
    _bench_table("lol bench score", results, write_results("score", results, {"manifest": str(manifest), "overrides": overrides, "count": count}))
    return 0


@bench_app.command("unet")
def bench_unet_command(
    config: Annotated[str, typer.Option(help="UNet shape: sd15 (SD-1.5, 512 px) or small.")] = "sd15",
    adapters: Annotated[int, typer.Option(help="LoRAs K per mode (batch 1 each).")] = 8,
    steps: Annotated[int, typer.Option(help="Optimizer steps per LoRA.")] = 10,
    device: Annotated[Optional[str], typer.Option(help="cuda or cpu (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or bf16.")] = "bf16",
    modes: Annotated[Optional[list[UnetMode]], typer.Option("--mode", help="Measure this mode; repeatable (default: both).",
                                                           show_default=False)] = None,
) -> int:
    """LoRA training throughput on an SD-shaped UNet with random weights: sequential vs cohort, TFLOP/s."""
    from bench.unet import bench_unet, write_unet_results

    results, facts = bench_unet(config, adapters, steps, device, dtype, tuple(chosen(modes, UnetMode)))
    table = Table(title=f"lol bench unet: {config}, {facts['device']}, {dtype}")
    for column in ("mode", "LoRAs", "steps", "seconds", "LoRA-steps/s", "TFLOP/s", "of peak", "peak MB"):
        table.add_column(column, justify="right")
    for m in results:
        share = f"{m.achieved_tflops / facts['peak_tflops']:.1%}" if facts["peak_tflops"] else "—"
        table.add_row(m.mode, str(m.adapters), str(m.steps), f"{m.seconds:.2f}", f"{m.adapter_steps_per_second:.2f}",
                      f"{m.achieved_tflops:.2f}", share, f"{m.peak_memory_mb:.0f}")
    out.print(table)
    out.print(f"results: {write_unet_results(config, results, facts)}")
    return 0


OrchestrationServer = Enum("OrchestrationServer", {name: name for name in ("ephemeral", "sqlite", "postgres")}, type=str)


@bench_app.command("orchestration")
def bench_orchestration_command(
    overrides: OverridesArg = None, manifest: BenchManifest = Path("manifests/tiny-shapes.yaml"), count: BenchCount = 8,
    server: Annotated[OrchestrationServer, typer.Option(help="ephemeral: the library vs `lol run` on a real model (COUNT "
                      "LoRAs); sqlite / postgres: a real `prefect server start` on that database, process work pool, "
                      "--workers real workers, --jobs jobs of a fixed-time bench trainer (bench/orchestration.py).")]
    = OrchestrationServer.ephemeral,
    jobs: Annotated[int, typer.Option(min=1, help="Server bench: jobs (tiny-shapes layout, fixed-time trainer).")] = 10000,
    workers: Annotated[int, typer.Option(min=1, help="Server bench: `prefect worker` processes, one flow run (shard) each.")] = 4,
    cohort_sizes: Annotated[Optional[list[int]], typer.Option("--cohort-size", help="Server bench: jobs per task; "
                            "repeatable, one fresh server per size (default: 1 and 16).", show_default=False)] = None,
    job_seconds: Annotated[float, typer.Option(min=0.0, help="Server bench: seconds the bench trainer takes per LoRA.")] = 0.05,
    library: Annotated[bool, typer.Option(help="Server bench: also run the shards as plain library processes (no Prefect).")]
    = True,
    work_dir: Annotated[Optional[Path], typer.Option(help="Server bench: where stores, databases and logs go (temp dirs, removed).")]
    = None,
    recommended_server_settings: Annotated[bool, typer.Option("--recommended-server-settings/--prefect-defaults", help="Server bench: start the server with "
                                          "flows/server_settings.py's settings (batched task-run recording); "
                                          "--prefect-defaults: with Prefect's own.")] = True,
) -> int:
    """The same population through the library and through the Prefect flows: the overhead; with --server sqlite|postgres,
    N jobs through a real Prefect server and workers (jobs/s, overhead per job, server RSS, database size, failures)."""
    if server is not OrchestrationServer.ephemeral:
        return _bench_orchestration_server(server.value, jobs, workers, cohort_sizes or [1, 16], job_seconds, library, work_dir,
                                           None if recommended_server_settings else {})
    from bench.measure import bench_orchestration, write_results

    load(manifest, overrides)
    results = bench_orchestration(str(manifest), list(overrides or []), count)
    direct, flows = results
    _bench_table("lol bench orchestration", results, write_results("orchestration", results, {"manifest": str(manifest), "overrides": overrides, "count": count}))
    overhead = flows.seconds - direct.seconds
    server_s = flows.extra.get("ephemeral_server_start_s")
    out.print(f"orchestration overhead: {overhead:+.1f} s ({100 * overhead / direct.seconds:+.0f}% of the library run)"
              + (f"; the ephemeral server start took {server_s:.1f} s of it" if server_s else ""))
    return 0


def _bench_orchestration_server(server: str, jobs: int, workers: int, cohort_sizes: list[int], job_seconds: float,
                                library: bool, work_dir: Path | None, server_env: dict[str, str] | None = None) -> int:
    from bench.orchestration import bench_server

    def show(arm: dict) -> None:
        s = arm.get("summary") or {}
        out.print(f"{arm['arm']} cohort {arm['cohort_size']}: " + (f"skipped ({arm['skipped']})" if arm.get("skipped") else
                  f"{arm.get('records')} of {jobs} LoRAs in {arm.get('wall_s')} s, {s.get('jobs_per_s')} jobs/s "
                  f"(sustained {s.get('sustained_jobs_per_s')}), overhead {s.get('steady_overhead_ms_per_job')} ms/job steady, "
                  f"failed {arm.get('failed_json')}, trained twice {arm.get('trained_twice')}"), highlight=False)

    arms, path = bench_server(server, jobs, workers, cohort_sizes, job_seconds, library=library, work_dir=work_dir, on_arm=show,
                              server_env=server_env)
    table = Table(title=f"lol bench orchestration --server {server}: {jobs} jobs, {workers} workers, {job_seconds} s per LoRA")
    for column in ("arm", "cohort", "LoRAs", "wall s", "jobs/s", "sustained", "overhead ms/job", "steady ms/job",
                   "server RSS MB", "DB MB", "task runs recorded", "failures"):
        table.add_column(column, justify="right")
    for arm in arms:
        s = arm.get("summary") or {}
        locked = sum(f.get("database is locked", 0) for f in (arm.get("log_failures") or {}).values())
        dropped = sum(f.get("events dropped by the server", 0) for f in (arm.get("log_failures") or {}).values())
        table.add_row(arm["arm"], str(arm["cohort_size"]), str(arm.get("records", "—")), str(arm.get("wall_s", "—")),
                      str(s.get("jobs_per_s", "—")), str(s.get("sustained_jobs_per_s", "—")), str(s.get("overhead_ms_per_job", "—")),
                      str(s.get("steady_overhead_ms_per_job", "—")),
                      f"{s.get('server_rss_mb_start', '—')} → {s.get('server_rss_mb_peak', '—')}",
                      f"{s.get('db_mb_start', '—')} → {s.get('db_mb_end', '—')}",
                      str((arm.get("task_runs") or {}).get("total", "—")),
                      arm.get("skipped") or f"{arm.get('failed_json', 0)} failed, {locked} locked, {dropped} events dropped")
    out.print(table)
    out.print(f"results: {path}")
    return 0


@bench_app.command("faults")
def bench_faults_command(
    overrides: OverridesArg = None, manifest: BenchManifest = Path("manifests/tiny-shapes.yaml"),
    scenarios: Annotated[Optional[list[FaultScenario]], typer.Option("--scenario", help="Run this scenario; repeatable (default: all).",
                                                                     show_default=False)] = None,
    trials: Annotated[Optional[list[str]], typer.Option(help="Seeded trials: N for every scenario, or SCENARIO=N; repeatable "
                                                             "(default: 10 kills, 2 of each other, 1 scorer crash).")] = None,
    lease: Annotated[float, typer.Option(help="Claim lease of the workers in seconds: a killed worker's claims expire this soon.")] = 2.0,
    mount: Annotated[bool, typer.Option(help="Full disk as a size-limited tmpfs (needs root); --no-mount: a write quota.")] = True,
    work_dir: Annotated[Optional[Path], typer.Option(help="Where the trials' stores go (default: a temp dir, removed after).")] = None,
) -> int:
    """Fault injection: workers killed, racing, failing, on a full disk or a flaky store; a table of the promises held."""
    import tempfile

    from bench.faults.report import rows, write_results
    from bench.faults.scenarios import run_scenarios, trial_counts

    loaded = load(manifest, overrides)
    if loaded.base.kind != "diffusion":
        raise BenchError(f"lol bench faults injects faults into diffusion smoke populations; {manifest} is {loaded.base.kind}")
    names = chosen(scenarios, FaultScenario)
    counts = trial_counts(names, _trials_option(trials or [], names))
    total = sum(counts.values())
    with tempfile.TemporaryDirectory(prefix="lol-bench-faults-", dir=work_dir) as tmp:
        lab = _fault_lab(manifest, loaded, list(overrides or []), Path(tmp), lease, mount)
        with progress_bar() as progress:
            task = progress.add_task("fault trials", total=total)
            done = run_scenarios(lab, names, counts, on_trial=lambda t: progress.update(
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
    path = write_results(done, {"manifest": str(manifest), "overrides": overrides, "scenarios": names, "trials": counts,
                                "lease_s": lease, "mount": mount})
    out.print(f"results: {path}")
    return 0 if all(t.ok for t in done) else EXIT_PROBLEMS


def _trials_option(values: list[str], chosen: list[str]) -> dict[str, int]:
    """`--trials N` (every chosen scenario) and `--trials SCENARIO=N` (that one), later ones winning."""
    counts: dict[str, int] = {}
    for value in values:
        name, _, number = value.rpartition("=")
        if not number.strip().isdigit() or int(number) < 1 or (name and name not in chosen):
            raise BenchError(f"--trials {value!r}: give N ≥ 1, or SCENARIO=N with one of {', '.join(chosen)}")
        counts.update({name: int(number)} if name else dict.fromkeys(chosen, int(number)))
    return counts


def _fault_lab(manifest: Path, loaded: Manifest, overrides: list[str], work: Path, lease: float, mount: bool):
    """A FaultLab whose base is resolved once (a `tiny:` base is built or copied here, not in every trial's store)."""
    from bench.faults.lab import FaultLab
    from pipeline.bases.loading import resolve_base

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

    from bench.measure import bench_load, write_results

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
    models: Annotated[Optional[list[Predictor]], typer.Option("--model", help="Measure this predictor; repeatable (default: all).",
                                                              show_default=False)] = None,
    memory_gb: Annotated[float, typer.Option(help="Address-space limit per measurement.")] = 16.0,
) -> int:
    """Forward time and peak memory of each predictor on rank-4 LoRAs shaped like GPT-3 125M…175B."""
    from bench.measure import write_json
    from lol_models.scaling import GPT3_SIZES, as_rows, plot, scaling

    predictors = chosen(models, Predictor)
    points = scaling(predictors, memory_limit_gb=memory_gb)
    table = Table(title="forward time (ms) / peak RSS (MB), batch 1, rank 4, one d×d LoRA per layer")
    table.add_column("model")
    for size in GPT3_SIZES:
        table.add_column(size, justify="right")
    for model in predictors:
        cells = []
        for size in GPT3_SIZES:
            point = next((p for p in points if p.model == model and p.size == size), None)
            cells.append("" if point is None else f"{point.forward_ms:.1f} / {point.peak_rss_mb:.0f}" if point.status == "ok" else point.status.split(":")[0])
        table.add_row(model, *cells)
    out.print(table)
    path = write_json("scaling", {"memory_limit_gb": memory_gb, "points": as_rows(points)})
    plot(points, path.with_suffix(".png"))
    out.print(f"results: {path} and .png")
    return 0


@bench_app.command("rehearsal")
def bench_rehearsal_command(
    scale: Annotated[RehearsalScale, typer.Option(help="exact: the SD-1.4 / Qwen2-0.5B / ViT-B-16 configs; small: reduced widths.")]
    = RehearsalScale.exact,
    populations: Annotated[Optional[list[PaperPopulation]], typer.Option("--population", help="Rehearse this population; "
                                                                         "repeatable (default: all three).", show_default=False)] = None,
    count: Annotated[int, typer.Option(min=1, help="LoRAs per population.")] = 8,
    paper_shapes: Annotated[bool, typer.Option("--paper-shapes", help="512 px and the paper's scorer settings (a GPU's work).")] = False,
) -> int:
    """The paper manifests on stand-ins (bench/rehearsal.py): CPU seconds and peak RSS per LoRA, per stage.

    Runs from a checkout (the stand-ins are built by tests/paper_standins.py)."""
    from bench.rehearsal import main

    return main(["--scale", scale.value, "--count", str(count), "--populations", ",".join(chosen(populations, PaperPopulation)),
                 *(["--paper-shapes"] if paper_shapes else [])])

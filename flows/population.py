"""Prefect flows for every stage of a population, and `run_population` composing them.

Each flow is a thin composition of `pipeline` calls. One task per cohort of jobs (the jobs trained
in the same passes, `pipeline.finetune.cohort`; one job when the manifest's cohort size is 1),
tagged `gpu`, with retries (`DEFAULT_RETRIES`); a task still failing after them fails its jobs —
reported by reason in the flow's outcomes — and the other tasks go on. A task or stage that failed
because the Prefect API refused it (429/5xx, as SQLite's write lock makes it answer) or could not be
reached is run again while the API has been unavailable for less than LOL_API_RETRY_S seconds
(flows/api_retries.py). Tasks receive the
manifest path, overrides, store URL and job indices — never tensors. Storage decides what is done, so a rerun after a crash runs only
what is missing (Prefect's result cache is not used for resumption). A worker process loads
each base / scorer once and reuses it for every task it runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections import Counter
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner  # noqa: E402

from flows.api_retries import ApiOutage, TaskDidNotRun, with_api_retries  # noqa: E402
from pipeline.finetune.runner import (  # noqa: E402
    JobOutcome,
    Outcome,
    cohort_sizer,
    default_lease_s,
    default_worker_name,
    failed,
    plan_cohorts,
    plan_jobs,
    run_job,
    run_jobs,
    settle_busy,
)
from pipeline.jobs import Job, expand, job_at, shard  # noqa: E402
from pipeline.manifest import Manifest  # noqa: E402
from pipeline.preflight import check_before_training, check_data_unchanged, finished_records  # noqa: E402
from pipeline.score import make_scorer, scorer_id  # noqa: E402
from pipeline.score.runner import score_jobs  # noqa: E402
from pipeline.stages import RUN_STAGES, evaluate, publish, report, train, trainer_factory  # noqa: E402
from storage import Store  # noqa: E402

DEFAULT_RETRIES = 2
DEFAULT_RETRY_DELAY_S = 10

# How many times each stage flow's body has started in this process: a stage whose subflow the API refused
# is run again only if its body never started (run_population).
_stage_bodies: Counter = Counter()

# Per-process caches: a worker sets a base (or scorer) up once and reuses it across tasks.
_cache: dict[tuple, Any] = {}
_cache_lock = threading.Lock()


def load_manifest(manifest: str, overrides: list[str] | None = None) -> tuple[Manifest, str]:
    """(manifest, its text) from a local path or any fsspec URL.

    The text is read on every call; what was parsed from the same text and overrides is reused
    (`_parsed`): every task of a flow loads the manifest, and parsing it (YAML with its checks,
    then validation) was the largest cost of a one-job task (bench/orchestration.py, issue #19).
    """
    if "://" in manifest:
        import fsspec

        with fsspec.open(manifest, "rt", encoding="utf-8") as handle:
            text = handle.read()
    else:
        with open(manifest, encoding="utf-8") as handle:
            text = handle.read()
    return _parsed(text, manifest, tuple(overrides or ())), text


@functools.lru_cache(maxsize=16)
def _parsed(text: str, source: str, overrides: tuple[str, ...]) -> Manifest:
    """`Manifest.from_text`, once per (text, source, overrides) in a process; manifests are frozen."""
    return Manifest.from_text(text, source=source, overrides=list(overrides))


def _task_runner(workers: int):
    """Local worker processes for one flow's tasks (None: run tasks one by one in this process).

    Each process keeps its own base / scorer cache across the tasks it runs; `_worker_environment`
    sets what the spawned processes inherit.
    """
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    if workers == 1:
        return None
    return _StopOnInterruptPool(max_workers=workers)


class _StopOnInterruptPool(ProcessPoolTaskRunner):
    """Prefect's process pool, except that a flow ending on an exception — SIGTERM (Prefect's TerminationSignal),
    Ctrl-C, a crash — terminates the worker processes rather than waiting for them. ProcessPoolExecutor's shutdown
    still runs every task already handed to its workers: a `lol run --workers 2` given SIGTERM went on training three
    more cohorts of 16 (about 8 minutes here). A worker killed mid-job leaves nothing a rerun cannot finish (its
    claims expire within one lease; docs/reliability.md), so stopping at once is safe."""

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        executor = getattr(self, "_executor", None)
        if exc_type is not None and executor is not None:
            for process in list((getattr(executor, "_processes", None) or {}).values()):
                with contextlib.suppress(OSError, ValueError):
                    process.terminate()
        super().__exit__(exc_type, exc_value, traceback)


@contextlib.contextmanager
def _worker_environment(workers: int):
    """What spawned worker processes inherit, restored afterwards.

    - `LOL_TORCH_THREADS` = cores / workers (read in each task), so workers do not oversubscribe;
    - in ephemeral mode, `PREFECT_API_URL` = this process's temporary API server: without it each
      worker would start a temporary server of its own, and its task runs would not be seen by
      the flow's.
    """
    if workers == 1:
        yield
        return
    from prefect.settings import get_current_settings

    wanted = {"LOL_TORCH_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
    if not get_current_settings().api.url:
        from prefect.server.api.server import SubprocessASGIServer

        wanted["PREFECT_API_URL"] = SubprocessASGIServer().api_url  # the running temporary server (a singleton)
    before = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _apply_thread_budget() -> None:
    if os.environ.get("LOL_TORCH_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["LOL_TORCH_THREADS"]))


def _cached(key: tuple, make):
    with _cache_lock:
        if key not in _cache:
            _cache[key] = make()
        return _cache[key]


def _trainer(manifest: Manifest, store: Store):
    def make():
        trainer = trainer_factory(manifest.base.kind)()
        trainer.setup(manifest, store)
        return trainer

    return _cached(("trainer", manifest.base.model_dump_json(), tuple(manifest.lora.target_modules), manifest.data.model_dump_json(), store.url), make)


def _scorer(manifest: Manifest, store: Store, spec):
    def make():
        scorer = make_scorer(spec)
        scorer.setup(manifest, store)
        return scorer

    return _cached(("scorer", scorer_id(spec), manifest.base.model_dump_json(), manifest.data.model_dump_json(), store.url), make)


# ---------------------------------------------------------------- tasks


@task(name="finetune-job", tags=["gpu"], retries=DEFAULT_RETRIES, retry_delay_seconds=DEFAULT_RETRY_DELAY_S)
def finetune_job(manifest: str, overrides: list[str], store: str | None, index: int) -> JobOutcome:
    """Train job `index` unless the store holds it; returns the outcome."""
    _apply_thread_budget()
    loaded, _ = load_manifest(manifest, overrides)
    target = Store(store)
    job = job_at(loaded, index)
    outcome = run_job(target.population(loaded.population.name), job, lambda: _trainer(loaded, target), default_worker_name())
    get_run_logger().info("job %s: %s", job.job_id, outcome)
    return outcome


@task(name="finetune-cohort", tags=["gpu"], retries=DEFAULT_RETRIES, retry_delay_seconds=DEFAULT_RETRY_DELAY_S)
def finetune_cohort(manifest: str, overrides: list[str], store: str | None, indices: list[int]) -> list[JobOutcome]:
    """Train jobs `indices` together (the cohort may split to fit memory); returns each job's outcome."""
    _apply_thread_budget()
    loaded, _ = load_manifest(manifest, overrides)
    target = Store(store)
    jobs = [job_at(loaded, index) for index in indices]
    sizer = cohort_sizer(loaded)
    done = dict((job.job_id, outcome) for job, outcome in run_jobs(target.population(loaded.population.name), jobs,
                                                                     lambda: _trainer(loaded, target), default_worker_name(),
                                                                     None, sizer))
    for note in sizer.notes:
        get_run_logger().warning(note)
    get_run_logger().info("cohort of %d: %s", len(jobs), dict(Counter(str(o) for o in done.values())))
    return [done[job.job_id] for job in jobs]


@task(name="score-cohort", tags=["gpu"], retries=DEFAULT_RETRIES, retry_delay_seconds=DEFAULT_RETRY_DELAY_S)
def score_cohort_task(manifest: str, overrides: list[str], store: str | None, indices: list[int]) -> list[dict[str, str]]:
    """Score jobs `indices` with every scorer that has not scored them yet, K LoRAs per pass where the
    scorer can; returns, per job, scorer id -> outcome."""
    _apply_thread_budget()
    loaded, _ = load_manifest(manifest, overrides)
    target = Store(store)
    population = target.population(loaded.population.name)
    jobs = [job_at(loaded, index) for index in indices]
    outcomes: list[dict[str, str]] = [{} for _ in jobs]
    position = {job.job_id: i for i, job in enumerate(jobs)}
    for spec in loaded.scorers:
        sid = scorer_id(spec)
        todo = []
        for job in jobs:
            if population.has_score(job.job_id, sid):
                outcomes[position[job.job_id]][sid] = "skipped"
            else:
                todo.append(job)
        if not todo:
            continue
        sizer = cohort_sizer(loaded)
        for job, outcome, _ in score_jobs(population, todo, spec, sid, _scorer(loaded, target, spec), sizer):
            outcomes[position[job.job_id]][sid] = outcome
        for note in sizer.notes:
            get_run_logger().warning(note)
    return outcomes


# ---------------------------------------------------------------- flows


def _run_units(task_fn, names: list[str], units: list, retries: int, workers: int, *args) -> list[tuple[Any, str | None]]:
    """Run `task_fn(*args, unit)` for every unit (a job index, or a cohort's indices): in this process
    one by one, or submitted to the flow's process pool when `workers` > 1. Per unit, in unit order:
    (its result, None), or (None, reason) when its task still failed after `retries` retries — the
    other units go on, and the flow reports the failure for each job of that unit. A unit the
    orchestration failed (the API refused it, Prefect did not run it) is run again while the units'
    shared outage clock allows (flows/api_retries.py)."""
    runners = [_retrying(task_fn, name, retries) for name in names]
    outage = ApiOutage()
    if workers == 1:
        return [_outcome(lambda runner=runner, unit=unit, name=name:
                         with_api_retries(lambda: _ran(runner(*args, unit)), name, outage), retries)
                for runner, unit, name in zip(runners, units, names)]
    from prefect.context import FlowRunContext
    from prefect.task_runners import ProcessPoolTaskRunner

    context = FlowRunContext.get()
    if context is None or not isinstance(context.task_runner, ProcessPoolTaskRunner):
        # threads would share one base model between jobs: never run jobs concurrently in-process
        raise ValueError(f"workers={workers} needs the flow to run with a ProcessPoolTaskRunner; "
                         "use run_population(..., workers=N) or `lol run --workers N`")
    submitted = [[runner.submit(*args, unit)] for runner, unit in zip(runners, units)]  # all at once: the pool runs them

    def result(runner, unit, first: list):
        return _ran(first.pop().result() if first else runner.submit(*args, unit).result())  # a repeat is submitted anew

    return [_outcome(lambda runner=runner, unit=unit, first=first, name=name:
                     with_api_retries(lambda: result(runner, unit, first), name, outage), retries)
            for runner, unit, first, name in zip(runners, units, submitted, names)]


def _ran(result: Any) -> Any:
    """A task's result; TaskDidNotRun when there is none. Every task here returns its jobs' outcomes, so a
    task that returns None did not run: Prefect ended it without calling it."""
    if result is None:
        raise TaskDidNotRun("task did not run: Prefect ended it without a result (e.g. its concurrency slot "
                            "could not be acquired)")
    return result


def _retrying(task_fn, name: str, retries: int):
    """`task_fn` named `name`, retried `retries` times, DEFAULT_RETRY_DELAY_S apart (read now, so tests can shorten it)."""
    return task_fn.with_options(task_run_name=name, retries=retries, retry_delay_seconds=DEFAULT_RETRY_DELAY_S)


def _outcome(call, retries: int) -> tuple[Any, str | None]:
    """(call(), None), or (None, why) when the task failed after its retries (or its worker process died),
    or the orchestration kept failing it (the API refused it, Prefect did not run it: the next run takes
    its jobs; bench/orchestration.py, issue #19)."""
    try:
        return call(), None
    except TaskDidNotRun as exc:
        return None, str(exc)
    except Exception as exc:
        message = str(exc).splitlines()[0][:200] if str(exc) else ""
        return None, f"task failed after {retries + 1} attempt(s): {type(exc).__name__}: {message}".rstrip(": ")


def _jobs(loaded: Manifest, limit: int | None, shard_spec: str | None) -> list[Job]:
    return shard(list(expand(loaded, limit=limit)), shard_spec)


@flow(name="finetune_population")
def finetune_population(manifest: str, overrides: list[str] | None = None, store: str | None = None,
                        limit: int | None = None, shard_spec: str | None = None,
                        retries: int = DEFAULT_RETRIES, busy_wait_s: float | None = None,
                        workers: int = 1) -> dict[str, int]:
    """Finetune every planned LoRA the store lacks, one task per cohort of jobs (`workers` local processes).

    Planning, the cohorts and the busy policy are the library's (`pipeline.finetune.runner`), as
    in `lol finetune`: a job claimed by another worker is waited for until it is done there or the
    claim expires (at most `busy_wait_s`, default three claim leases), then trained here.
    """
    _stage_bodies["finetune_population"] += 1
    overrides = list(overrides or [])
    loaded, text = load_manifest(manifest, overrides)
    target = Store(store)
    population = target.population(loaded.population.name)
    done, todo = plan_jobs(loaded, population, limit, shard_spec)
    if todo:  # bad data fails the flow before any task starts, and before anything is written
        check_before_training(loaded, population, todo)
    population.write_manifest(loaded.text_as_run(text, overrides, manifest))
    outcomes: Counter = Counter({Outcome.ALREADY_DONE.value: len(done)} if done else {})
    busy: list[Job] = []
    cohorts = plan_cohorts(todo, loaded, workers)
    names = [f"finetune-{c[0].job_id}" if len(c) == 1 else f"finetune-cohort-{c[0].job_id}-x{len(c)}" for c in cohorts]
    results = _run_units(finetune_cohort, names, [[job.index for job in c] for c in cohorts], retries, workers,
                         manifest, overrides, store)
    for cohort, (result, failure) in zip(cohorts, results):
        for job, outcome in zip(cohort, result or [failed(failure)] * len(cohort)):
            if outcome.kind is Outcome.BUSY:
                busy.append(job)
            else:
                outcomes[str(outcome)] += 1

    def retry(job: Job) -> JobOutcome:
        runner = _retrying(finetune_job, f"finetune-{job.job_id}", retries)
        outcome, failure = _outcome(lambda: with_api_retries(lambda: _ran(runner(manifest, overrides, store, job.index)),
                                                             f"finetune-{job.job_id}"), retries)
        return outcome or failed(failure)

    wait_s = busy_wait_s if busy_wait_s is not None else 3 * default_lease_s()
    for _, outcome in settle_busy(population, busy, retry, wait_s):
        outcomes[str(outcome)] += 1
    _artifact("finetune", loaded, outcomes)
    return dict(outcomes)


@flow(name="score_population")
def score_population(manifest: str, overrides: list[str] | None = None, store: str | None = None,
                     limit: int | None = None, shard_spec: str | None = None,
                     retries: int = DEFAULT_RETRIES, workers: int = 1) -> dict[str, int]:
    """Score every finetuned LoRA lacking a score, one task per cohort of jobs (`workers` local processes)."""
    _stage_bodies["score_population"] += 1
    overrides = list(overrides or [])
    loaded, _ = load_manifest(manifest, overrides)
    population = Store(store).population(loaded.population.name)
    check_data_unchanged(loaded, finished_records(population))  # labels of changed data would describe other data
    sids = [scorer_id(s) for s in loaded.scorers]
    outcomes: Counter = Counter()
    todo = []
    for job in _jobs(loaded, limit, shard_spec):
        if not population.is_done(job.job_id):  # verified, as `lol score` selects
            outcomes["not finetuned"] += 1
        elif all(population.has_score(job.job_id, sid) for sid in sids):
            outcomes["already scored"] += 1
        else:
            todo.append(job)
    cohorts = plan_cohorts(todo, loaded, workers)
    names = [f"score-{c[0].job_id}" if len(c) == 1 else f"score-cohort-{c[0].job_id}-x{len(c)}" for c in cohorts]
    for cohort, (result, failure) in zip(cohorts, _run_units(score_cohort_task, names, [[job.index for job in c] for c in cohorts],
                                                           retries, workers, manifest, overrides, store)):
        for per_job in result or [{"task": failure}] * len(cohort):
            for outcome in per_job.values():
                outcomes[outcome] += 1
    _artifact("score", loaded, outcomes, _label_table(loaded, population.store))
    return dict(outcomes)


def _label_table(loaded: Manifest, store: Store) -> str:
    """Markdown: every stored label's count, mean, std, range and Kendall τ against lr × steps/epochs."""
    from pipeline.label_stats import label_statistics

    rows = []
    for column, s in label_statistics(loaded, store)["labels"].items():
        tau = s["kendall"].get("lr×length")
        rows.append(f"| {column} | {s['count']} | {s['mean']:.4g} | {s['std']:.4g} | {s['min']:.4g} – {s['max']:.4g} | "
                    + (f"{tau['tau']:+.3f} (p={tau['p_value']:.2g})" if tau else "—") + " |")
    if not rows:
        return ""
    return ("\n## labels\n\n| label | n | mean | std | range | Kendall τ vs lr × length |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


@flow(name="publish_population")
def publish_population(manifest: str, overrides: list[str] | None = None, store: str | None = None) -> dict[str, Any]:
    """Write the population as a Hugging Face dataset folder (pushed when a token is set)."""
    _stage_bodies["publish_population"] += 1
    loaded, _ = load_manifest(manifest, list(overrides or []))
    summary = publish(loaded, Store(store))
    rows = "\n".join(f"| {name} | {count} |" for name, count in summary.rows.items())
    excluded = "\n".join(f"- {count} × {reason}" for reason, count in Counter(summary.excluded.values()).most_common())
    create_markdown_artifact(key=f"publish-{_slug(loaded)}", description=f"publish {loaded.population.name}",
                             markdown=f"# publish {loaded.population.name}\n\n| split | LoRAs |\n|---|---|\n{rows}\n\n"
                                      f"{excluded or 'every planned LoRA was published'}\n\n{summary.message}\n")
    return {"folder": summary.folder, "rows": summary.rows, "excluded": len(summary.excluded)}


@task(name="train-predictors", tags=["gpu"], retries=1)
def train_predictors(manifest: str, overrides: list[str], store: str | None, workers: int = 1) -> int:
    loaded, _ = load_manifest(manifest, overrides)
    return len(train(loaded, Store(store), workers=workers))


@flow(name="learn_population")
def learn_population(manifest: str, overrides: list[str] | None = None, store: str | None = None,
                     workers: int = 1) -> dict[str, Any]:
    """Train every predictor on every target of the published population (`workers` (predictor, target)
    units at once, in processes), evaluate, write the report."""
    _stage_bodies["learn_population"] += 1
    overrides = list(overrides or [])
    loaded, _ = load_manifest(manifest, overrides)
    runs = train_predictors(manifest, overrides, store, workers)
    results = evaluate(loaded, Store(store))
    path = report(loaded, Store(store))
    from lol_models.experiments import results_markdown

    create_markdown_artifact(key=f"learn-{_slug(loaded)}", description=f"learn {loaded.population.name}",
                             markdown=f"# learn {loaded.population.name}\n\n{results_markdown(results)}\n\nreport: {path}\n")
    return {"runs": runs, "report": str(path)}


ALL_STAGES = RUN_STAGES


@flow(name="run_population")
def run_population(manifest: str, overrides: list[str] | None = None, store: str | None = None,
                   limit: int | None = None, retries: int = DEFAULT_RETRIES,
                   stages: list[str] | None = None, workers: int = 1) -> dict[str, Any]:
    """The stages in order: finetune → score → publish → learn (train, evaluate, report).

    `stages` picks a subset (e.g. ["finetune", "score", "publish"]); each stage skips what the
    store already holds. `workers` > 1 runs finetune and score tasks, and the learn stage's (predictor,
    target) units, in that many local processes.
    """
    chosen = list(stages or ALL_STAGES)
    unknown = sorted(set(chosen) - set(ALL_STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(ALL_STAGES)}")
    results: dict[str, Any] = {}
    runner = _task_runner(workers)
    finetune_flow = finetune_population if runner is None else finetune_population.with_options(task_runner=runner)
    score_flow = score_population if runner is None else score_population.with_options(task_runner=_task_runner(workers))
    with _worker_environment(workers):
        if "finetune" in chosen:
            results["finetune"] = run_stage("finetune_population", lambda: finetune_flow(manifest, overrides, store, limit,
                                                                                     retries=retries, workers=workers))
        if "score" in chosen:
            results["score"] = run_stage("score_population", lambda: score_flow(manifest, overrides, store, limit,
                                                                            retries=retries, workers=workers))
    if "publish" in chosen:
        results["publish"] = run_stage("publish_population", lambda: publish_population(manifest, overrides, store))
    if "learn" in chosen:
        results["learn"] = run_stage("learn_population", lambda: learn_population(manifest, overrides, store, workers))
    return results


def run_stage(name: str, call):
    """A stage's subflow, created through the API: run again if the API refused it before its body
    started (a refusal after that fails the run as before; the next run finishes what is left)."""
    before = _stage_bodies[name]
    return with_api_retries(call, name, repeat_if=lambda: _stage_bodies[name] == before)


def _slug(loaded: Manifest) -> str:
    return "".join(c if c.isalnum() else "-" for c in loaded.population.name.lower())


def _artifact(stage: str, loaded: Manifest, outcomes: Counter, extra: str = "") -> None:
    table = "\n".join(f"| {outcome} | {count} |" for outcome, count in outcomes.most_common())
    create_markdown_artifact(key=f"{stage}-{_slug(loaded)}", description=f"{stage} {loaded.population.name}",
                             markdown=f"# {stage} {loaded.population.name}\n\n| outcome | jobs |\n|---|---|\n{table}\n{extra}")

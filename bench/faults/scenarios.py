"""The fault scenarios: real workers on a smoke population, a fault, then a rerun without it.

Each scenario runs seeded trials (`run_scenarios`), alternating its variants (cohorts / one job at
a time); a trial returns a `Trial`: whether every promise held, an outcome in a few words (what
the table counts) and the measured details. The promises (docs/reliability.md):

- **kill**: a worker SIGKILLed at a seeded random moment; after its claims expire, a second
  worker completes the population — every planned job then has exactly one record that
  verifies, the rerun trained exactly the jobs the dead worker had not committed, and no
  temporary file, claim or staging folder is left;
- **concurrent-2 / concurrent-4**: 2 or 4 workers on one population at once: every job is
  trained exactly once (trainings begun are counted by the trainer, not by records);
- **job-exception / non-finite-loss / out-of-memory**: a fault in one job (every job, for
  out-of-memory): that job fails with its reason in failed.json and in the summary, the others
  are trained, no job is tried more than the bound (1 + log2 K in a cohort of K: the cohort
  halves on out-of-memory; 2 when a cohort fails as a whole and its jobs train alone), and the
  rerun trains exactly the failed jobs;
- **scorer-crash**: the scorer raises on two LoRAs: they are listed as failed with the reason,
  the others are scored, and the rerun scores exactly those two;
- **full-disk**: the store on a disk that holds about half the population (a tmpfs, or a quota
  where mounting is refused): the worker ends normally, every job is a verified LoRA or a
  failure naming the full disk, interrupted commits are removed; after the disk grows the rerun
  completes the population;
- **flaky-store**: 10 % of the store's writes fail with EIO (claims, specs, adapters, records,
  failure records, renewals): the same promises as for the full disk.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.faults import SCENARIO_NAMES, worker
from bench.faults.checks import inspect_population
from bench.faults.disk import SmallDisk
from bench.faults.inject import EventLog
from bench.faults.lab import VARIANTS, FaultLab, trainings
from storage import Store

CONCURRENT = ("count=8", "data.subsets.num_groups=8")  # enough jobs for four workers
CONCURRENT_COHORT = 2  # cohorts small enough that concurrent workers interleave
FLAKY_RATE = 0.1
FAULT_REASONS = {"raise": "InjectedFault: injected: the job's data stream failed", "nan": "non-finite loss",
                 "oom": "OutOfMemoryError: CUDA out of memory (injected)"}


@dataclass
class Trial:
    scenario: str
    variant: str
    trial: int
    ok: bool
    outcome: str  # a few words, counted in the table
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # promises that did not hold

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    variants: tuple[str, ...]
    default_trials: int
    run: Callable[[FaultLab, int, str], Trial]


# ---------------------------------------------------------------- kill -9


def kill_trial(lab: FaultLab, trial: int, variant: str) -> Trial:
    """The worker is killed a seeded random delay after it has set its base up: uniform over 1.2 ×
    the time an undisturbed worker then works (claims, specs, training, commits, releases), so
    about one kill in six lands after it finished."""
    rng = random.Random(f"kill-{trial}")
    planned = lab.planned(variant)
    delay = rng.uniform(0.0, 1.2 * lab.reference(variant).work_seconds)
    folder = lab.folder(f"kill-{trial}")
    killed = lab.settings(folder, "killed", variant)
    process = worker.start(killed)
    _wait_for_setups(EventLog(killed.events), [process], 1)
    time.sleep(delay)
    process.kill()
    process.join()
    phase = kill_phase(EventLog(killed.events).read(), len(planned), process.exitcode == 0)
    manifest = lab.load(variant)
    before = inspect_population(manifest, killed.store, Path(killed.tmp_dir))
    waited = wait_for_claims(manifest, killed.store, lab.lease_s + 5)
    rerun = lab.settings(folder, "rerun", variant)
    summary = worker.run(rerun)
    after = inspect_population(manifest, rerun.store, Path(rerun.tmp_dir))
    missing = sorted(set(planned) - set(before.verified))
    problems = after.problems() + _differ("rerun trained", sorted(summary["trained"]), "the jobs not committed", missing)
    problems += [f"rerun failures: {summary['failed']}"] if summary["failed"] else []
    return Trial("kill", variant, trial, not problems, f"killed {phase}", details={
        "delay_s": round(delay, 3), "committed_before": len(before.verified), "interrupted_commits": len(before.leftovers),
        "tmp_files_before": len(before.tmp_files), "claims_left_by_the_dead": len(before.live_claims),
        "staging_folders_left_by_the_dead": len(before.dead_staging), "waited_for_claims_s": round(waited, 2),
        "rerun_trained": len(summary["trained"]), "verified_after": len(after.verified), "planned": len(planned)},
        problems=problems)


def kill_phase(events: list[dict[str, Any]], planned: int, finished: bool) -> str:
    """Where in its run a worker was killed, from its events."""
    kinds = [e["event"] for e in events]
    if finished or "done" in kinds:
        return "after it finished"
    if "setup" not in kinds:
        return "while starting (loading the base)"
    begun, ended = kinds.count("train"), kinds.count("outcome")
    if not begun:
        return "while claiming"
    if ended >= planned:
        return "after its last job, before exiting"
    return "while training or committing"


def wait_for_claims(manifest, store_url: str, timeout_s: float) -> float:
    """Seconds spent waiting until no live claim is left (a dead worker's expire within a lease)."""
    population = Store(store_url, create=False).population(manifest.population.name)
    started = time.monotonic()
    while population.active_claims() and time.monotonic() - started < timeout_s:
        time.sleep(0.1)
    return time.monotonic() - started


# ---------------------------------------------------------------- concurrent workers


def concurrent_trial(lab: FaultLab, trial: int, variant: str, workers: int) -> Trial:
    extra = CONCURRENT + ((f"execution.cohort_size={CONCURRENT_COHORT}",) if variant == "cohort" else ())
    planned = lab.planned(variant, extra)
    folder = lab.folder(f"concurrent-{workers}-{trial}")
    go = folder / "go"
    settings = [lab.settings(folder, f"worker-{i}", variant, extra=extra, go=str(go), lease_s=max(lab.lease_s, 30.0))
                for i in range(workers)]
    processes = [worker.start(s) for s in settings]
    _wait_for_setups(EventLog(settings[0].events), processes, workers)
    go.write_text("go")  # every worker has loaded its base: they claim at the same moment
    for process in processes:
        process.join(600)
    summaries = [worker.result(s, p.exitcode) for s, p in zip(settings, processes)]
    counts = trainings(settings[0].events)
    after = inspect_population(lab.load(variant, extra), settings[0].store, Path(settings[0].tmp_dir))
    twice = sorted(job for job, n in counts.items() if n > 1)
    problems = after.problems() + [f"trained {counts[j]} times: {j}" for j in twice]
    problems += _differ("jobs trained", sorted(counts), "planned", sorted(planned))
    problems += [f"{s['failed']}" for s in summaries if s["failed"]]
    by_worker = [len(s["trained"]) for s in summaries]
    outcome = "every job trained once" if not twice else f"{len(twice)} job(s) trained more than once"
    return Trial(f"concurrent-{workers}", variant, trial, not problems, outcome, details={
        "planned": len(planned), "trainings": sum(counts.values()), "trained_by_worker": by_worker,
        "workers_that_trained": sum(1 for n in by_worker if n), "busy_by_worker": [s["busy"] for s in summaries]},
        problems=problems)


def _wait_for_setups(events: EventLog, processes, workers: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(e["event"] == "setup" for e in events.read()) < workers:
        if any(p.exitcode is not None for p in processes) or time.monotonic() > deadline:
            return  # a worker died or hangs: the trial's checks will say so
        time.sleep(0.05)


# ---------------------------------------------------------------- faults in jobs


def job_fault_trial(lab: FaultLab, trial: int, variant: str, fault: str, every_job: bool = False) -> Trial:
    rng = random.Random(f"{fault}-{trial}")
    planned = lab.planned(variant)
    victims = sorted(planned) if every_job else [rng.choice(planned)]
    folder = lab.folder(f"{fault}-{trial}")
    faulty = lab.settings(folder, "faulty", variant, job_faults={job: fault for job in victims})
    first = worker.run(faulty)
    manifest = lab.load(variant)
    state = inspect_population(manifest, faulty.store, Path(faulty.tmp_dir))
    tries = trainings(faulty.events)
    reason = FAULT_REASONS[fault]
    bound = _tries_bound(variant, fault, len(planned), lab.load(variant).execution.requested_cohort_size)
    problems = _differ("failed jobs", sorted(first["failed"]), "the faulty jobs", victims)
    problems += [f"{job}: summary says {first['failed'].get(job)!r}, failed.json {state.failures.get(job)!r}; expected {reason!r}"
                 for job in victims if first["failed"].get(job) != reason or state.failures.get(job) != reason]
    problems += _differ("verified jobs", sorted(state.verified), "the others", sorted(set(planned) - set(victims)))
    problems += [f"{job} tried {n} times (bound {bound})" for job, n in tries.items() if n > bound]
    problems += [p for p in state.problems() if "without a LoRA" not in p]
    rerun = lab.settings(folder, "rerun", variant)
    summary = worker.run(rerun)
    after = inspect_population(manifest, rerun.store, Path(rerun.tmp_dir))
    retried = {job: n - tries.get(job, 0) for job, n in trainings(rerun.events).items() if n > tries.get(job, 0)}
    problems += after.problems() + _differ("rerun trained", sorted(retried), "the faulty jobs", victims)
    outcome = f"{len(victims)} of {len(planned)} failed: {reason.split(':')[0]}"
    return Trial(fault_scenario_name(fault), variant, trial, not problems, outcome, details={
        "planned": len(planned), "faulty": len(victims), "reason": reason, "max_tries_per_job": max(tries.values(), default=0),
        "tries_bound": bound, "trained_first": len(first["trained"]), "rerun_trained": len(summary["trained"])},
        problems=problems)


def fault_scenario_name(fault: str) -> str:
    return {"raise": "job-exception", "nan": "non-finite-loss", "oom": "out-of-memory"}[fault]


def _tries_bound(variant: str, fault: str, planned: int, requested: int) -> int:
    """How often the runner may begin training one job: once alone; in a cohort of K, once more
    after a whole-cohort failure, or log2 K more as the cohort halves on out-of-memory."""
    if variant != "cohort":
        return 1
    k = min(planned, requested)
    return 1 + math.ceil(math.log2(k)) if fault == "oom" else 2


# ---------------------------------------------------------------- scorer crash


def scorer_crash_trial(lab: FaultLab, trial: int, variant: str) -> Trial:
    rng = random.Random(f"scorer-{trial}")
    planned = lab.planned(variant)
    victims = sorted(rng.sample(planned, 2))
    folder = lab.folder(f"scorer-crash-{trial}")
    store = lab.copy_reference(variant, folder)
    first = worker.run(lab.settings(folder, "crashing", variant, stage="score", crash_scorer_on=tuple(victims)))
    manifest = lab.load(variant)
    state = inspect_population(manifest, str(store))
    failed = sorted(key.split("/")[0] for key in first["failed"])
    problems = _differ("unscored jobs", failed, "the crashed ones", victims)
    problems += [f"{key}: {reason!r}" for key, reason in first["failed"].items() if "InjectedFault" not in reason]
    scored = next(iter(state.scored.values()), [])
    problems += _differ("scored jobs", sorted(scored), "the others", sorted(set(planned) - set(victims)))
    summary = worker.run(lab.settings(folder, "rerun", variant, stage="score"))
    after = inspect_population(manifest, str(store))
    problems += [f"rerun failures: {summary['failed']}"] if summary["failed"] else []
    problems += _differ("scored after the rerun", sorted(next(iter(after.scored.values()), [])), "planned", sorted(planned))
    rescored = sum(summary["scored"].values())
    problems += [] if rescored == len(victims) else [f"the rerun scored {rescored}, not the {len(victims)} crashed"]
    return Trial("scorer-crash", variant, trial, not problems, f"{len(first['failed'])} of {len(planned)} not scored",
                 details={"planned": len(planned), "crashed": len(victims), "rerun_scored": rescored}, problems=problems)


# ---------------------------------------------------------------- store faults


def full_disk_trial(lab: FaultLab, trial: int, variant: str) -> Trial:
    reference = lab.reference(variant)
    folder = lab.folder(f"full-disk-{trial}")
    with SmallDisk(folder / "disk", reference.pages // 2, quota=reference.bytes // 2, mount=lab.mount) as disk:
        full = lab.settings(folder, "full", variant, store=disk.folder / "store", store_fault=disk.store_fault)
        first = worker.run(full)
        disk.grow(8 * reference.pages)  # the fault removed: room for everything
        rerun = lab.settings(folder, "rerun", variant, store=disk.folder / "store", store_fault=disk.store_fault)
        return _store_fault_outcome(lab, trial, variant, "full-disk", full, first, rerun, ("No space left", "Errno 28"),
                                    {"disk": disk.kind, "disk_bytes": reference.pages // 2 if disk.kind == "tmpfs"
                                     else reference.bytes // 2, "population_bytes": reference.bytes})


def flaky_store_trial(lab: FaultLab, trial: int, variant: str) -> Trial:
    folder = lab.folder(f"flaky-store-{trial}")
    flaky = lab.settings(folder, "flaky", variant, store_fault={"kind": "flaky", "rate": FLAKY_RATE, "seed": trial})
    first = worker.run(flaky)
    return _store_fault_outcome(lab, trial, variant, "flaky-store", flaky, first, lab.settings(folder, "rerun", variant),
                                ("injected I/O error", "Errno 5"), {"write_fail_rate": FLAKY_RATE})


def _store_fault_outcome(lab: FaultLab, trial: int, variant: str, scenario: str, faulty: worker.WorkerSettings, first: dict[str, Any],
                         rerun: worker.WorkerSettings, signs: tuple[str, ...], details: dict[str, Any]) -> Trial:
    """Checks after a store fault: each job a verified LoRA or a failure naming the fault, nothing
    half-written; then `rerun` (the fault removed) completes the population."""
    planned = lab.planned(variant)
    manifest = lab.load(variant)
    state = inspect_population(manifest, faulty.store, Path(faulty.tmp_dir))
    problems = _differ("jobs done or failed", sorted(set(state.verified) | set(first["failed"])), "planned", sorted(planned))
    problems += [f"{job}: {reason!r} does not name the fault" for job, reason in first["failed"].items()
                 if not any(sign in reason for sign in signs)]
    problems += [f"{job}: failed but stored" for job in first["failed"] if job in state.verified]
    problems += [p for p in state.problems() if "without a LoRA" not in p]
    recorded = sum(1 for job in first["failed"] if state.failures.get(job))
    summary = worker.run(rerun)
    after = inspect_population(manifest, rerun.store, Path(rerun.tmp_dir))
    problems += after.problems() + _differ("rerun trained", sorted(summary["trained"]), "the failed jobs", sorted(first["failed"]))
    outcome = f"{len(first['failed'])} of {len(planned)} failed"
    return Trial(scenario, variant, trial, not problems, outcome, details={
        **details, "planned": len(planned), "trained_first": len(first["trained"]), "failed_first": len(first["failed"]),
        "failures_in_failed_json": recorded, "failed_writes": first.get("failed_writes", 0),
        "rerun_trained": len(summary["trained"])}, problems=problems)


# ---------------------------------------------------------------- registry and running


BOTH = tuple(VARIANTS)
SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("kill", "kill -9 a finetuning worker at a random moment, then rerun", BOTH, 10, kill_trial),
    Scenario("concurrent-2", "two workers on one population at once", BOTH, 2,
             lambda lab, t, v: concurrent_trial(lab, t, v, 2)),
    Scenario("concurrent-4", "four workers on one population at once", BOTH, 2,
             lambda lab, t, v: concurrent_trial(lab, t, v, 4)),
    Scenario("job-exception", "one job's training raises", BOTH, 2, lambda lab, t, v: job_fault_trial(lab, t, v, "raise")),
    Scenario("non-finite-loss", "one job's loss is NaN", BOTH, 2, lambda lab, t, v: job_fault_trial(lab, t, v, "nan")),
    Scenario("out-of-memory", "every job runs out of memory (bounded retries)", BOTH, 2,
             lambda lab, t, v: job_fault_trial(lab, t, v, "oom", every_job=True)),
    Scenario("scorer-crash", "the scorer raises on two LoRAs", ("cohort",), 1, scorer_crash_trial),
    Scenario("full-disk", "the store's disk holds half the population", BOTH, 2, full_disk_trial),
    Scenario("flaky-store", f"{FLAKY_RATE:.0%} of store writes fail (EIO)", BOTH, 2, flaky_store_trial),
)}


assert tuple(SCENARIOS) == SCENARIO_NAMES, "bench/faults/__init__.py lists the scenarios, in this order"


def run_scenarios(lab: FaultLab, names: Iterable[str] | None = None, trials: int | Mapping[str, int] | None = None,
                  on_trial: Callable[[Trial], None] | None = None) -> list[Trial]:
    """Seeded trials of each scenario, alternating its variants: `trials` of each (an int), or per
    scenario name (a mapping); a scenario not given runs its own default count."""
    chosen = list(names or SCENARIOS)
    unknown = [n for n in chosen if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown fault scenario(s) {unknown}; scenarios: {', '.join(SCENARIOS)}")
    counts = trial_counts(chosen, trials)
    results = []
    for name in chosen:
        scenario = SCENARIOS[name]
        for t in range(counts[name]):
            variant = scenario.variants[t % len(scenario.variants)]
            started = time.monotonic()
            result = scenario.run(lab, t, variant)
            result.seconds = round(time.monotonic() - started, 2)
            results.append(result)
            if on_trial is not None:
                on_trial(result)
    return results


def trial_counts(names: Iterable[str], trials: int | Mapping[str, int] | None = None) -> dict[str, int]:
    """Trials per scenario: each scenario's default, or `trials` for all, or `trials[name]`."""
    if isinstance(trials, Mapping):
        return {name: int(trials.get(name, SCENARIOS[name].default_trials)) for name in names}
    return {name: int(trials or SCENARIOS[name].default_trials) for name in names}


def _differ(what: str, got: list[str], expected_what: str, expected: list[str]) -> list[str]:
    return [] if got == expected else [f"{what} {got} ≠ {expected_what} {expected}"]



"""Run the finetuning jobs of a population: claim, train, commit — or record the failure.

The runner is the same for every model kind; a `Trainer` (chosen by the base's kind)
does the model work. Storage decides what is done, so a rerun after a crash trains only
what is missing, and claims keep two workers off the same job.

A failure fails its job alone and the population goes on: an exception or a non-finite loss in
training, or a write the store refuses (a full disk, an I/O error) while claiming, preparing or
committing. Each is recorded in the job's failed.json with its reason (and in the summary, also
when the store cannot take even that write). The runner retries nothing by itself except the
jobs of a cohort that ran out of memory, in halved cohorts down to one job: bounded. A killed
worker leaves a claim that expires, and staging folders the next run on the host removes.

This module is the one orchestration core: `lol finetune` (`finetune_population`) and the Prefect
flows (`flows/population.py`) plan with `plan_jobs` / `plan_cohorts`, train through `run_jobs` /
`run_job`, and settle jobs another worker holds with `settle_busy` — so both treat a claimed job
the same way. Each job ends with a `JobOutcome`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from pipeline.cohort.sizing import CohortSizer, is_out_of_memory
from pipeline.finetune import staging
from pipeline.jobs import Job, expand, shard
from pipeline.manifest import Manifest
from storage import Claim, Store, StoreError

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; the job fails, the population goes on."""


class Trainer(Protocol):
    """Loads a base once (`setup`), then trains one job at a time (`run`)."""

    def setup(self, manifest: Manifest, store: Store) -> None:
        """Load the base and check the manifest against it (target modules, data) before any job."""
        ...

    def run(self, job: Job, out_dir: Path) -> dict[str, Any]:
        """Train `job`, save its peft adapter under `out_dir/adapter/`, return its metrics."""
        ...


@runtime_checkable
class CohortTrainer(Trainer, Protocol):
    """A trainer that can also train several jobs in the same passes (`pipeline.finetune.cohort`);
    `run_jobs` forms cohorts only for these. It may declare `member_bytes` (memory per member,
    for the cohort sizer) and `device`."""

    def train_cohort(self, tasks: Sequence[Any]) -> dict[str, dict[str, Any] | Exception]:
        """Train each task's job; {job id: metrics, or the exception that job alone raised}."""
        ...


class Outcome(Enum):
    """What became of one job in one run."""

    TRAINED = "trained"
    ALREADY_DONE = "already done"  # the store held it when the run planned
    DONE_ELSEWHERE = "done by another worker"  # finished by another worker while this run got to it
    BUSY = "busy"  # another worker holds its claim right now (settled by `settle_busy`)
    CLAIMED_ELSEWHERE = "claimed by another worker"  # still claimed when `settle_busy` gave up waiting
    FAILED = "failed"  # with the reason (also in the job's failed.json)


@dataclass(frozen=True)
class JobOutcome:
    """A job's `Outcome`, with the reason when it failed. `str()` is what summaries count by."""

    kind: Outcome
    reason: str = ""

    def __str__(self) -> str:
        return self.reason if self.kind is Outcome.FAILED else self.kind.value


TRAINED, ALREADY_DONE, DONE_ELSEWHERE = JobOutcome(Outcome.TRAINED), JobOutcome(Outcome.ALREADY_DONE), JobOutcome(Outcome.DONE_ELSEWHERE)
BUSY, CLAIMED_ELSEWHERE = JobOutcome(Outcome.BUSY), JobOutcome(Outcome.CLAIMED_ELSEWHERE)


def failed(reason: str) -> JobOutcome:
    return JobOutcome(Outcome.FAILED, reason)


@dataclass
class FinetuneSummary:
    notes: list[str] = field(default_factory=list)  # e.g. cohorts reduced to fit memory
    planned: int = 0
    trained: list[str] = field(default_factory=list)
    skipped: int = 0  # already done, or done by another worker meanwhile
    busy: int = 0  # still claimed by another worker when the wait for it ran out
    failed: dict[str, str] = field(default_factory=dict)  # job_id -> reason
    seconds: float = 0.0

    def add(self, job: Job, outcome: JobOutcome) -> None:
        if outcome.kind is Outcome.TRAINED:
            self.trained.append(job.job_id)
        elif outcome.kind in (Outcome.ALREADY_DONE, Outcome.DONE_ELSEWHERE):
            self.skipped += 1
        elif outcome.kind in (Outcome.BUSY, Outcome.CLAIMED_ELSEWHERE):
            self.busy += 1
        else:
            self.failed[job.job_id] = outcome.reason

    @property
    def loras_per_minute(self) -> float:
        return 60 * len(self.trained) / self.seconds if self.seconds else 0.0


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def finetune_population(
    manifest: Manifest,
    store: Store,
    trainer_factory: Callable[[], Trainer],
    limit: int | None = None,
    shard_spec: str | None = None,
    worker: str | None = None,
    lease_s: float | None = None,
    on_job: Callable[[Job, str], None] | None = None,
    cohort_size: int | None = None,
    busy_wait_s: float | None = None,
    check_pending: Callable[[Any, list[Job]], None] | None = None,
) -> FinetuneSummary:
    """Train every planned job the store lacks. `on_job(job, outcome)` reports progress.

    Jobs train in cohorts (`pipeline.finetune.cohort`) sized by the manifest's `execution`
    section (or `cohort_size`), one at a time when the size is 1 or the trainer has no cohorts.
    Jobs another worker holds are settled by `settle_busy` (waited for, at most `busy_wait_s`).
    `check_pending(population, jobs)` may raise before any job of the plan runs (`pipeline.preflight`).
    """
    started = time.perf_counter()
    worker = worker or default_worker_name()
    population = store.population(manifest.population.name)
    done, pending = plan_jobs(manifest, population, limit, shard_spec)
    if pending and check_pending is not None:  # e.g. bad data: raises before the base loads or anything is written
        check_pending(population, pending)
    summary = FinetuneSummary(planned=len(done) + len(pending), skipped=len(done))
    trainer: Trainer | None = None

    def get_trainer() -> Trainer:  # load the base only when there is work
        nonlocal trainer
        if trainer is None:
            trainer = trainer_factory()
            trainer.setup(manifest, store)
        return trainer

    sizer = cohort_sizer(manifest, cohort_size)
    busy = []
    for job, outcome in run_jobs(population, pending, get_trainer, worker, lease_s, sizer):
        if outcome.kind is Outcome.BUSY:
            busy.append(job)
            continue
        summary.add(job, outcome)
        _report(on_job, job, outcome)
    retry = lambda job: run_job(population, job, get_trainer, worker, lease_s)  # noqa: E731
    wait_s = busy_wait_s if busy_wait_s is not None else 3 * (lease_s or default_lease_s())
    for job, outcome in settle_busy(population, busy, retry, wait_s):
        summary.add(job, outcome)
        _report(on_job, job, outcome)
    summary.notes = sizer.notes
    summary.seconds = time.perf_counter() - started
    return summary


def plan_jobs(manifest: Manifest, population, limit: int | None = None,
              shard_spec: str | None = None) -> tuple[list[Job], list[Job]]:
    """(done, to do): the planned jobs (the first `limit`, this worker's `shard_spec`) that the
    store holds, and those it lacks (or holds damaged)."""
    jobs = shard(list(expand(manifest, limit=limit)), shard_spec)
    done = [job for job in jobs if population.is_done(job.job_id)]
    held = {job.job_id for job in done}
    return done, [job for job in jobs if job.job_id not in held]


def plan_cohorts(jobs: Sequence[Job], manifest: Manifest, workers: int) -> list[list[Job]]:
    """Task units for `workers` parallel workers: jobs of similar length together, cohorts of the
    manifest's size, at least one per worker; one job per unit when the cohort size is 1. Longest
    cohorts first, so that no worker starts a long one while the others run out of work."""
    requested = manifest.execution.requested_cohort_size
    if requested == 1 or not jobs:
        return [[job] for job in jobs]
    ordered = sorted(jobs, key=cohort_order, reverse=True)  # a partial cohort, if any, holds the shortest jobs
    size = max(1, min(requested, math.ceil(len(ordered) / workers)))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def settle_busy(population, busy: Sequence[Job], retry: Callable[[Job], JobOutcome], wait_s: float | None = None,
                poll_s: float = 2.0) -> Iterator[tuple[Job, JobOutcome]]:
    """Jobs another worker held when this run reached them: wait until each is done there
    (DONE_ELSEWHERE) or its claim expires (a dead worker's: `retry` trains it here), polling every
    `poll_s`; after `wait_s` (default three claim leases) a job still claimed is CLAIMED_ELSEWHERE."""
    queue = list(busy)
    deadline = time.monotonic() + (wait_s if wait_s is not None else 3 * default_lease_s())
    while queue:
        job = queue.pop(0)
        if population.is_done(job.job_id):
            yield job, DONE_ELSEWHERE
            continue
        outcome = retry(job)
        if outcome.kind is not Outcome.BUSY:
            yield job, outcome
        elif time.monotonic() < deadline:
            queue.append(job)
            time.sleep(poll_s)
        else:
            yield job, CLAIMED_ELSEWHERE


def cohort_sizer(manifest: Manifest, cohort_size: int | None = None) -> CohortSizer:
    execution = manifest.execution
    return CohortSizer(cohort_size or execution.requested_cohort_size, execution.memory_fraction)


def planned_micro_steps(job: Job) -> float:
    """How many forward/backward passes the job takes: steps × accumulation, or epochs × batches
    per epoch where the job trains for epochs (batches from the size of its data subset; a source
    without a per-source cap counts as one example, which keeps the order by number of sources)."""
    hp, data = job.spec.hyperparameters, job.spec.data
    accumulation = float(hp.get("gradient_accumulation") or 1)
    if hp.get("steps"):
        return float(hp["steps"]) * accumulation
    examples = ((data.get("examples_per_source") or 1) * len(data.get("sources") or ())
                or (data.get("images_per_class") or 1) * len(data.get("classes") or ())
                or data.get("group_size") or 0)
    batches = math.ceil(examples / int(hp.get("batch_size") or 1)) if examples else 1
    return float(hp.get("epochs") or 1) * batches


def cohort_order(job: Job) -> tuple:
    """Jobs of similar length share a cohort, so its batch stays full until the end."""
    return (planned_micro_steps(job), str(job.spec.hyperparameters.get("batch_size")), job.index)


def run_jobs(population, jobs: Sequence[Job], get_trainer: Callable[[], Trainer], worker: str,
             lease_s: float | None, sizer: CohortSizer) -> Iterator[tuple[Job, JobOutcome]]:
    """Train `jobs` (in cohorts where the sizer and the trainer allow): yields (job, outcome) as they finish.

    First removes what killed workers left: their staging folders on this host, and expired
    claims (see `sweep_leftovers`).
    """
    queue = sorted(jobs, key=cohort_order) if sizer.requested > 1 else list(jobs)
    if queue:
        sweep_leftovers(population)
    while queue:
        trainer = get_trainer()
        k = sizer.size(getattr(trainer, "member_bytes", None), getattr(trainer, "device", torch.device("cpu")))
        if k == 1 or not isinstance(trainer, CohortTrainer):
            job = queue.pop(0)
            yield job, run_job(population, job, get_trainer, worker, lease_s)
            continue
        cohort, queue = queue[:k], queue[k:]
        try:
            yield from run_cohort(population, cohort, trainer, worker, lease_s)
        except CohortOutOfMemory:
            sizer.out_of_memory(len(cohort))
            queue = cohort + queue


def sweep_leftovers(population) -> None:
    """Remove the staging folders of dead workers of this host and the population's expired claims."""
    for folder in staging.sweep():
        log.info("removed %s, left by a worker that died", folder)
    try:
        population.sweep_claims()
    except OSError as exc:  # tidying only: expired claims are taken over anyway
        log.warning("could not remove expired claims: %s", exc)


class CohortOutOfMemory(RuntimeError):
    """A cohort did not fit in memory; its jobs are retried in smaller cohorts."""


def run_cohort(population, jobs: Sequence[Job], trainer, worker: str, lease_s: float | None = None) -> list[tuple[Job, JobOutcome]]:
    """Claim the jobs that are not done or busy, train them in one cohort, commit each (or record its failure).

    Outcomes are those of `run_job`. A cohort that fails as a whole (not one member) falls back to
    training its jobs one at a time, so one job's bug cannot fail the others.
    """
    lease_s = lease_s or default_lease_s()
    outcomes: list[tuple[Job, JobOutcome]] = []
    with contextlib.ExitStack() as stack:
        claims: dict[str, Claim] = {}
        for job in jobs:
            if population.is_done(job.job_id):
                outcomes.append((job, DONE_ELSEWHERE))
                continue
            outcome, claim = _claim(population, job, worker, lease_s)
            if claim is None:
                outcomes.append((job, outcome))
                continue
            stack.enter_context(population.holding(claim, lease_s))
            if population.is_done(job.job_id):  # finished by another worker meanwhile
                outcomes.append((job, DONE_ELSEWHERE))
                continue
            claims[job.job_id] = claim
        staged, tasks = {}, []
        by_id = {job.job_id: job for job in jobs}
        for job_id in claims:
            job = by_id[job_id]
            try:
                _prepare(population, job)
            except (OSError, StoreError) as exc:  # the store refused a write: this job fails, the others go on
                outcomes.append((job, _record_failure(population, job, exc, "preparing the job folder")))
                continue
            staged[job_id] = stack.enter_context(staging.job_dir(job_id))
            try:
                tasks.append(trainer.cohort_task(job, staged[job_id]))
            except Exception as exc:  # this job cannot start; the others can
                outcomes.append((job, _record_failure(population, job, exc)))
        if not tasks:
            return outcomes
        try:
            results = trainer.train_cohort(tasks)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise CohortOutOfMemory(str(exc)) from exc
            log.warning("cohort of %d failed as a whole (%s); training its jobs one at a time", len(tasks), exc)
            return outcomes + [(by_id[t.key], _train_one(trainer, by_id[t.key], population, worker, claims[t.key], lease_s))
                               for t in tasks]
        for task in tasks:
            job, result = by_id[task.key], results[task.key]
            if isinstance(result, Exception):
                outcomes.append((job, _record_failure(population, job, result)))
            else:
                outcomes.append((job, _commit(population, job, staged[job.job_id], result, worker, claims[job.job_id], lease_s)))
    return outcomes


def default_lease_s() -> float:
    """Claim lease: `$LOL_CLAIM_LEASE_S`, else 120 s (renewed every third of it while training)."""
    return float(os.environ.get("LOL_CLAIM_LEASE_S", "120"))


def run_job(population, job: Job, get_trainer: Callable[[], Trainer], worker: str, lease_s: float | None = None) -> JobOutcome:
    """Claim one job and train it unless it is done: TRAINED, DONE_ELSEWHERE, BUSY or a failure.

    The claim is renewed in the background while the job trains and released after, so a
    worker that dies mid-job leaves a claim that expires within one lease.
    """
    lease_s = lease_s or default_lease_s()
    if population.is_done(job.job_id):
        return DONE_ELSEWHERE
    outcome, claim = _claim(population, job, worker, lease_s)
    if claim is None:
        return outcome
    with population.holding(claim, lease_s):
        if population.is_done(job.job_id):  # finished by another worker meanwhile
            return DONE_ELSEWHERE
        trainer = get_trainer()
        try:
            _prepare(population, job)
        except (OSError, StoreError) as exc:
            return _record_failure(population, job, exc, "preparing the job folder")
        return _train_one(trainer, job, population, worker, claim, lease_s)


def _claim(population, job: Job, worker: str, lease_s: float) -> tuple[JobOutcome | None, Claim | None]:
    """(None, claim), (BUSY, None) when another worker holds it, or (a failure, None) when the
    store refused the claim (nothing is written for the job then: it is not ours)."""
    try:
        claim = population.claim(job.job_id, worker, lease_s)
    except OSError as exc:
        return failed(f"store error while claiming: {_short(exc)} [failed.json not written: the job was not claimed]"), None
    return (None, claim) if claim is not None else (BUSY, None)


def _prepare(population, job: Job) -> None:
    """Nothing an earlier attempt (or damage: another job's files, a link) left, and the job's spec in its folder."""
    population.clear_partial(job.job_id)
    population.write_spec(job.job_id, job.to_json())


def _train_one(trainer: Trainer, job: Job, population, worker: str, claim: Claim, lease_s: float) -> JobOutcome:
    """TRAINED, BUSY (the claim was lost), or a failure (its reason recorded in failed.json)."""
    with staging.job_dir(job.job_id) as tmp:
        try:
            metrics = trainer.run(job, tmp)
        except Exception as exc:  # one job's bug must not stop the population
            return _record_failure(population, job, exc)
        return _commit(population, job, tmp, metrics, worker, claim, lease_s)


def _commit(population, job: Job, staged: Path, metrics: dict[str, Any], worker: str, claim: Claim, lease_s: float) -> JobOutcome:
    """Commit a trained job if its claim is still ours: TRAINED, BUSY, or a failure.

    A worker whose lease ran out while training (a stalled process) may have lost the job to
    another worker; committing then would store a second copy over the other's, so it yields.
    A commit the store refuses (a full disk) is failed, and what it wrote is removed again.
    """
    try:
        ours = population.renew(claim, lease_s)  # the job is ours for the next lease: time to commit
    except OSError as exc:
        return _record_failure(population, job, exc, "renewing the claim before committing")
    if not ours:
        log.warning("job %s: the claim was lost while training (lease %.0f s); not committing", job.job_id, lease_s)
        return BUSY
    try:
        population.commit(job.job_id, staged, {**metrics, "worker": worker})
    except OSError as exc:
        with contextlib.suppress(OSError):
            population.clear_partial(job.job_id)
        return _record_failure(population, job, exc, "committing")
    return TRAINED


def _record_failure(population, job: Job, exc: BaseException, during: str = "") -> JobOutcome:
    """Write failed.json for `job`; returns the failure with its short reason (noting when failed.json could not be written)."""
    if isinstance(exc, NonFiniteLoss):
        reason, detail = "non-finite loss", str(exc)
    else:
        reason = f"{'store error while ' + during + ': ' if during else ''}{_short(exc)}"
        detail = "".join(traceback.format_exception(exc)) if exc.__traceback__ else repr(exc)
    try:
        population.write_failed(job.job_id, reason, detail)
    except (OSError, StoreError) as write_error:  # e.g. the disk that failed the job is still full
        log.warning("job %s failed (%s) and failed.json could not be written: %s", job.job_id, reason, write_error)
        return failed(f"{reason} [failed.json not written: {_short(write_error)}]")
    return failed(reason)


def _short(exc: BaseException) -> str:
    """`Type: first line of the message` (at most 200 characters of it)."""
    message = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {message}".rstrip(": ")


def _report(on_job: Callable[[Job, str], None] | None, job: Job, outcome: JobOutcome) -> None:
    if on_job is not None:
        on_job(job, str(outcome))

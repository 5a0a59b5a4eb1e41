"""Run the finetuning jobs of a population: claim, train, commit — or record the failure.

The runner is the same for every model kind; a `Trainer` (chosen by the base's kind)
does the model work. Storage decides what is done, so a rerun after a crash trains only
what is missing, and claims keep two workers off the same job.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.jobs import Job, expand, shard
from pipeline.manifest import Manifest
from storage import Store


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


@dataclass
class FinetuneSummary:
    planned: int = 0
    trained: list[str] = field(default_factory=list)
    skipped: int = 0  # already done
    busy: int = 0  # claimed by another worker
    failed: dict[str, str] = field(default_factory=dict)  # job_id -> reason
    seconds: float = 0.0

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
) -> FinetuneSummary:
    """Train every planned job the store lacks. `on_job(job, outcome)` reports progress."""
    started = time.perf_counter()
    worker = worker or default_worker_name()
    jobs = shard(list(expand(manifest, limit=limit)), shard_spec)
    population = store.population(manifest.population.name)
    summary = FinetuneSummary(planned=len(jobs))
    pending = [job for job in jobs if not population.is_done(job.job_id)]
    summary.skipped = len(jobs) - len(pending)
    trainer: Trainer | None = None

    def get_trainer() -> Trainer:  # load the base only when there is work
        nonlocal trainer
        if trainer is None:
            trainer = trainer_factory()
            trainer.setup(manifest, store)
        return trainer

    for job in pending:
        outcome = run_job(population, job, get_trainer, worker, lease_s)
        if outcome == "trained":
            summary.trained.append(job.job_id)
        elif outcome == "busy":
            summary.busy += 1
        elif outcome == "skipped":
            summary.skipped += 1
        else:
            summary.failed[job.job_id] = outcome
        _report(on_job, job, outcome)
    summary.seconds = time.perf_counter() - started
    return summary


def default_lease_s() -> float:
    """Claim lease: `$LOL_CLAIM_LEASE_S`, else 120 s (renewed every third of it while training)."""
    return float(os.environ.get("LOL_CLAIM_LEASE_S", "120"))


def run_job(population, job: Job, get_trainer: Callable[[], Trainer], worker: str, lease_s: float | None = None) -> str:
    """Claim one job and train it unless it is done: 'trained', 'skipped', 'busy' or a failure reason.

    The claim is renewed in the background while the job trains and released after, so a
    worker that dies mid-job leaves a claim that expires within one lease.
    """
    lease_s = lease_s or default_lease_s()
    if population.is_done(job.job_id):
        return "skipped"
    claim = population.claim(job.job_id, worker, lease_s)
    if claim is None:
        return "busy"
    with population.holding(claim, lease_s):
        if population.is_done(job.job_id):  # finished by another worker meanwhile
            return "skipped"
        trainer = get_trainer()
        population.write_spec(job.job_id, job.to_json())
        population.clear_partial(job.job_id)
        return _train_one(trainer, job, population, worker)


def _train_one(trainer: Trainer, job: Job, population, worker: str) -> str:
    """'trained', or the failure reason recorded in failed.json."""
    with tempfile.TemporaryDirectory(prefix=f"lol-job-{job.job_id}-") as tmp:
        try:
            metrics = trainer.run(job, Path(tmp))
        except NonFiniteLoss as exc:
            population.write_failed(job.job_id, "non-finite loss", str(exc))
            return "non-finite loss"
        except Exception as exc:  # one job's bug must not stop the population
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}".rstrip(": ")
            population.write_failed(job.job_id, reason, traceback.format_exc())
            return reason
        population.commit(job.job_id, tmp, {**metrics, "worker": worker})
    return "trained"


def _report(on_job: Callable[[Job, str], None] | None, job: Job, outcome: str) -> None:
    if on_job is not None:
        on_job(job, outcome)

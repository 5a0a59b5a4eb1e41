"""A real finetuning (or scoring) worker in its own process, with faults injected.

`start(settings)` forks a worker from a fork server that has imported torch, diffusers and the
pipeline once (`bench.faults.zygote`), so a worker starts in a fraction of a second and can
be SIGKILLed like any process; `run(settings)` waits for it and returns its summary. The worker
runs the library (`finetune_population`, `score_population`) as `lol finetune` / `lol score`
do, with an `injecting_trainer` that logs each training it begins to the shared event log.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRELOAD = ["bench.faults.zygote"]


class WorkerFailed(RuntimeError):
    """A worker exited with an error (not killed by the scenario)."""


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process needs; picklable, passed to the forked child."""

    manifest: str
    overrides: tuple[str, ...]
    store: str
    folder: str  # the worker's own files: its log and result
    tmp_dir: str  # its temporary folder, where its staging folders go (shared by a trial's workers, as /tmp on a host)
    stage: str = "finetune"  # or "score"
    lease_s: float = 10.0  # claim lease (short, so a killed worker's claims expire soon)
    events: str | None = None  # shared EventLog file
    name: str | None = None  # worker name on claims; default host-pid
    job_faults: dict[str, str] = field(default_factory=dict)  # job id -> raise | nan | oom
    crash_scorer_on: tuple[str, ...] = ()
    store_fault: dict[str, Any] | None = None  # see bench.faults.inject.open_store
    go: str | None = None  # wait for this file after setup

    @property
    def result_path(self) -> Path:
        return Path(self.folder) / f"result-{self.label}.json"

    @property
    def log_path(self) -> Path:
        return Path(self.folder) / f"log-{self.label}.txt"

    @property
    def label(self) -> str:
        return self.name or self.stage


def start(settings: WorkerSettings) -> multiprocessing.process.BaseProcess:
    """A started worker process (forked from the warm fork server)."""
    Path(settings.folder).mkdir(parents=True, exist_ok=True)
    Path(settings.tmp_dir).mkdir(parents=True, exist_ok=True)
    process = _context().Process(target=main, args=(settings,), name=f"lol-fault-worker-{settings.label}", daemon=False)
    process.start()
    return process


def warm_up() -> None:
    """Start the fork server now (it imports the pipeline: seconds), so that no measured run pays for it."""
    process = _context().Process(target=_nothing, name="lol-fault-warm-up")
    process.start()
    process.join()


def _nothing() -> None:
    pass


def run(settings: WorkerSettings, timeout_s: float = 600) -> dict[str, Any]:
    """Run a worker to its end and return its summary; `WorkerFailed` (with its log) if it failed."""
    process = start(settings)
    process.join(timeout_s)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise WorkerFailed(f"worker {settings.label} ran past {timeout_s:.0f} s:\n{tail(settings.log_path)}")
    return result(settings, process.exitcode)


def result(settings: WorkerSettings, exitcode: int | None) -> dict[str, Any]:
    if exitcode != 0 or not settings.result_path.exists():
        raise WorkerFailed(f"worker {settings.label} exited {exitcode}:\n{tail(settings.log_path)}")
    return json.loads(settings.result_path.read_text())


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def main(settings: WorkerSettings) -> None:
    """The worker process: run the stage, write its summary JSON."""
    log = open(settings.log_path, "a", buffering=1)  # the process's stdout and stderr from here on
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    import logging

    import torch

    torch.set_num_threads(1)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, stream=log, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tempfile.tempdir = settings.tmp_dir  # this worker's staging folders live here
    started = time.perf_counter()
    summary = finetune(settings) if settings.stage == "finetune" else score(settings)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    summary["pid"] = os.getpid()
    tmp = settings.result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, settings.result_path)


def finetune(settings: WorkerSettings) -> dict[str, Any]:
    from bench.faults.inject import EventLog, injecting_trainer, open_store
    from pipeline.finetune.runner import finetune_population
    from pipeline.manifest import Manifest
    from pipeline.stages import trainer_factory

    manifest = Manifest.from_yaml(settings.manifest, overrides=list(settings.overrides))
    store = open_store(settings.store, settings.store_fault)
    events = EventLog(settings.events) if settings.events else None
    trainer = injecting_trainer(trainer_factory(manifest.base.kind), settings.job_faults, events,
                                Path(settings.go) if settings.go else None)

    def on_job(job, outcome: str) -> None:
        if events is not None:
            events.write("outcome", job.job_id, outcome)

    summary = finetune_population(manifest, store, trainer, worker=settings.name, lease_s=settings.lease_s, on_job=on_job)
    if events is not None:
        events.write("done")
    return {"trained": summary.trained, "failed": summary.failed, "busy": summary.busy, "skipped": summary.skipped,
            "notes": summary.notes, "failed_writes": getattr(store, "failed_writes", 0)}


def score(settings: WorkerSettings) -> dict[str, Any]:
    from bench.faults.inject import CrashingScorer, open_store
    from pipeline.manifest import Manifest
    from pipeline.score import make_scorer
    from pipeline.score.runner import score_population

    manifest = Manifest.from_yaml(settings.manifest, overrides=list(settings.overrides))
    store = open_store(settings.store, settings.store_fault)
    summary = score_population(manifest, store, scorer_factory=lambda spec: CrashingScorer(make_scorer(spec), set(settings.crash_scorer_on)))
    return {"scored": summary.scored, "skipped": summary.skipped, "unfinished": summary.unfinished,
            "failed": {f"{job_id}/{sid}": reason for (job_id, sid), reason in summary.failed.items()}}


def _context():
    """The fork-server context, preloading the pipeline once (every worker is forked from it)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context

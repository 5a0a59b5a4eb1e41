"""Faults put into real workers: in training, in scoring, and in the store.

- `injecting_trainer(cls, faults, events)`: a subclass of a diffusion trainer that logs every
  training it begins (`train` events: the count of trainer invocations per job) and makes the
  jobs named in `faults` fail — `raise` (their data stream raises), `nan` (their regression
  targets are NaN, so the loss is not finite) or `oom` (their data stream runs out of memory);
- `CrashingScorer`: a scorer that raises for chosen jobs;
- `FlakyStore`: writes fail with an I/O error at a seeded rate;
- `QuotaStore`: writes fail with ENOSPC once the store holds `quota` bytes (where a size-limited
  tmpfs cannot be mounted, `bench.faults.disk`);
- `EventLog`: JSON lines appended by any number of processes.

The faults reach the model code only through its public seams (`stream`, `run`,
`cohort_task`, the scorer protocol, `Store.write_bytes`); nothing here edits model code.
"""

from __future__ import annotations

import errno
import json
import os
import random
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from storage import Store

JOB_FAULTS = ("raise", "nan", "oom")


class InjectedFault(RuntimeError):
    """An exception a fault scenario raised on purpose."""


class EventLog:
    """One JSON object per line, appended with O_APPEND by any number of processes (whole lines)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, event: str, job: str = "", detail: str = "") -> None:
        line = json.dumps({"t": round(time.time(), 4), "pid": os.getpid(), "event": event, "job": job,
                           "detail": detail[:300]}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


class FaultyStream:
    """A job's training stream that fails: every `draw()` raises, or returns NaN targets."""

    def __init__(self, inner: Any, fault: str):
        assert fault in JOB_FAULTS, fault
        self._inner, self.fault = inner, fault

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def draw(self):
        if self.fault == "raise":
            raise InjectedFault("injected: the job's data stream failed")
        if self.fault == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        *inputs, target = self._inner.draw()
        return (*inputs, torch.full_like(target, float("nan")))


def injecting_trainer(trainer_cls: type, faults: Mapping[str, str] | None = None, events: EventLog | None = None,
                      go: Path | None = None) -> type:
    """A subclass of `trainer_cls` (a trainer whose jobs draw batches from `stream(examples, hp, seed)`)
    that logs `setup` and `train JOB` events and injects `faults[job_id]` into those jobs' streams.

    With `go`, `setup` waits for that file to exist, so that concurrent workers start together.
    """
    faults = dict(faults or {})
    unknown = {f for f in faults.values() if f not in JOB_FAULTS}
    if unknown:
        raise ValueError(f"unknown job fault(s) {sorted(unknown)}; faults: {', '.join(JOB_FAULTS)}")
    if not hasattr(trainer_cls, "stream"):
        raise ValueError(f"{trainer_cls.__name__} has no stream(examples, hp, seed) to inject faults into")

    class Injecting(trainer_cls):
        def setup(self, manifest, store) -> None:
            super().setup(manifest, store)
            self._job_by_seed: dict[int, str] = {}
            _log(events, "setup")
            while go is not None and not go.exists():
                time.sleep(0.01)

        def run(self, job, out_dir):
            self._begin(job)
            return super().run(job, out_dir)

        def cohort_task(self, job, out_dir):
            self._begin(job)
            return super().cohort_task(job, out_dir)

        def _begin(self, job) -> None:
            self._job_by_seed[job.spec.seed] = job.job_id
            _log(events, "train", job.job_id)

        def stream(self, examples, hp, seed):
            data = super().stream(examples, hp, seed)
            fault = faults.get(self._job_by_seed.get(seed, ""))
            return FaultyStream(data, fault) if fault else data

    Injecting.__name__ = Injecting.__qualname__ = f"Injecting{trainer_cls.__name__}"
    return Injecting


class CrashingScorer:
    """Wraps a scorer; scoring any job of `crash_on` raises `InjectedFault` (alone or in a cohort)."""

    def __init__(self, inner: Any, crash_on: set[str]):
        self.inner, self.crash_on = inner, set(crash_on)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def setup(self, manifest, store) -> None:
        self.inner.setup(manifest, store)

    def score(self, job, adapter_dir):
        self._check([job])
        return self.inner.score(job, adapter_dir)

    @property
    def score_cohort(self):
        inner = self.inner.score_cohort  # AttributeError for scorers that score one LoRA at a time

        def score_cohort(jobs, adapter_dirs):
            self._check(jobs)
            return inner(jobs, adapter_dirs)

        return score_cohort

    def _check(self, jobs) -> None:
        crashed = [job.job_id for job in jobs if job.job_id in self.crash_on]
        if crashed:
            raise InjectedFault(f"injected: the scorer crashed on {', '.join(crashed)}")


class FlakyStore(Store):
    """A store whose writes fail with EIO at `rate` (drawn from a seeded generator)."""

    def __init__(self, url: str, rate: float, seed: int = 0):
        self.rate, self.failed_writes, self._rng = 0.0, 0, random.Random(seed)
        super().__init__(url)  # the layout file of a fresh store is written without faults
        self.rate = rate

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.rate and self._rng.random() < self.rate:
            self.failed_writes += 1
            raise OSError(errno.EIO, f"injected I/O error writing {rel}")
        super().write_bytes(rel, data)


class QuotaStore(Store):
    """A local store on a disk that holds `quota` bytes: a write that would pass it fails with ENOSPC."""

    def __init__(self, url: str, quota: int):
        self.quota = None
        super().__init__(url)
        assert self.is_local, "QuotaStore needs a local store"
        self.quota = quota

    def used(self) -> int:
        return sum(_size(path) for path in _files(Path(self.root)))

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.quota is not None and self.used() + len(data) > self.quota:
            raise OSError(errno.ENOSPC, f"No space left on device (quota of {self.quota} bytes) writing {rel}")
        super().write_bytes(rel, data)


def open_store(url: str, fault: Mapping[str, Any] | None = None) -> Store:
    """The store at `url`, plain or with a store fault: {"kind": "flaky", "rate", "seed"} or {"kind": "quota", "bytes"}."""
    if not fault:
        return Store(url)
    if fault["kind"] == "flaky":
        return FlakyStore(url, float(fault["rate"]), int(fault.get("seed", 0)))
    if fault["kind"] == "quota":
        return QuotaStore(url, int(fault["bytes"]))
    raise ValueError(f"unknown store fault {fault['kind']!r}; store faults: flaky, quota")


def _files(root: Path) -> Iterator[Path]:
    for folder, _, files in os.walk(root):
        for name in files:
            yield Path(folder) / name


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # removed while we walked (a released claim, a temporary file)
        return 0


def _log(events: EventLog | None, event: str, job: str = "") -> None:
    if events is not None:
        events.write(event, job)

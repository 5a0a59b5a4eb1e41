"""One population's area of the store: job specs, committed LoRAs, failures, scores, claims."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.store import _TMP_MARK, StoreError, check_name, sha256_bytes

if TYPE_CHECKING:
    from storage.store import Store

RECORD = "record.json"
FAILED = "failed.json"
SPEC = "spec.json"
_memory_claim_locks: dict[str, threading.Lock] = {}


@dataclass(frozen=True)
class Problem:
    """Something `verify` found wrong with a stored artifact."""

    job_id: str
    path: str
    kind: str  # "corrupt" | "missing" | "unreadable"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.job_id}/{self.path}: {self.kind}{' (' + self.detail + ')' if self.detail else ''}"


@dataclass
class Claim:
    job_id: str
    worker: str
    token: str
    expires: float


@dataclass
class StatusReport:
    """State of every planned job: done, failed, claimed (in flight) or pending."""

    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # job_id -> reason
    claimed: dict[str, str] = field(default_factory=dict)  # job_id -> worker
    pending: list[str] = field(default_factory=list)
    unplanned: list[str] = field(default_factory=list)  # records of jobs not in this plan

    @property
    def failures_by_reason(self) -> Counter:
        return Counter(self.failed.values())


class PopulationStore:
    """Paths and operations under `{store}/populations/{name}/`."""

    def __init__(self, store: Store, name: str):
        self.store, self.name = store, name
        self.prefix = f"populations/{name}"

    def rel(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    def job_rel(self, job_id: str, *parts: str) -> str:
        return self.rel("jobs", check_name(job_id, "job id"), *parts)

    # ------------------------------------------------------------ manifest and specs

    def write_manifest(self, text: str) -> None:
        self.store.write_bytes(self.rel("manifest.yaml"), text.encode())

    def write_spec(self, job_id: str, spec_json: str) -> None:
        rel = self.job_rel(job_id, SPEC)
        if not self.store.exists(rel):
            self.store.write_bytes(rel, spec_json.encode())

    def read_spec(self, job_id: str) -> dict:
        return self.store.read_json(self.job_rel(job_id, SPEC))

    def job_ids(self) -> list[str]:
        """Every job folder in the store (done or not), sorted."""
        return self.store.list_dir(self.rel("jobs"))

    # ------------------------------------------------------------ records

    def record(self, job_id: str) -> dict | None:
        """The job's record, or None if it has not completed (or the record is unreadable)."""
        rel = self.job_rel(job_id, RECORD)
        try:
            return self.store.read_json(rel)
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return None

    def is_done(self, job_id: str, verify: bool = False) -> bool:
        if self.record(job_id) is None:
            return False
        return not verify or not self.verify_job(job_id)

    def clear_partial(self, job_id: str) -> None:
        """Remove what an interrupted attempt left (anything but spec.json and failed.json).

        Call only while holding the job's claim and only for a job with no record.
        """
        assert self.record(job_id) is None, "clear_partial() on a completed job"
        for path in self.store.list_files(self.job_rel(job_id)):
            if path not in (SPEC, FAILED):
                self.store.delete(self.job_rel(job_id, path))

    def commit(self, job_id: str, staged_dir: str | Path, metrics: dict[str, Any]) -> dict:
        """Copy every file of `staged_dir` into the job folder, then write `record.json` last.

        The record holds the sha256 and size of every file (spec.json included), so a crash at
        any point leaves either no record (the job reruns) or a complete, verifiable LoRA.
        """
        staged_dir = Path(staged_dir)
        files: dict[str, dict[str, Any]] = {}
        for local in sorted(p for p in staged_dir.rglob("*") if p.is_file()):
            rel_name = local.relative_to(staged_dir).as_posix()
            if rel_name in (RECORD, FAILED, SPEC):
                raise StoreError(f"staged file {rel_name!r} would overwrite a bookkeeping file")
            data = local.read_bytes()
            self.store.write_bytes(self.job_rel(job_id, rel_name), data)
            files[rel_name] = {"sha256": sha256_bytes(data), "size": len(data)}
        spec = self.store.read_bytes(self.job_rel(job_id, SPEC))
        files[SPEC] = {"sha256": sha256_bytes(spec), "size": len(spec)}
        record = {"job_id": job_id, "population": self.name, "files": files, "metrics": metrics,
                  "committed_at": time.time()}
        self.store.write_json(self.job_rel(job_id, RECORD), record)
        self.store.delete(self.job_rel(job_id, FAILED))
        return record

    def verify_job(self, job_id: str) -> list[Problem]:
        """Re-hash every file the record lists."""
        rel = self.job_rel(job_id, RECORD)
        try:
            record = self.store.read_json(rel)
        except FileNotFoundError:
            return [Problem(job_id, RECORD, "missing")]
        except (ValueError, UnicodeDecodeError) as exc:
            return [Problem(job_id, RECORD, "unreadable", str(exc)[:80])]
        problems = []
        for name, meta in sorted(record.get("files", {}).items()):
            try:
                data = self.store.read_bytes(self.job_rel(job_id, name))
            except FileNotFoundError:
                problems.append(Problem(job_id, name, "missing"))
                continue
            if len(data) != meta.get("size") or sha256_bytes(data) != meta.get("sha256"):
                problems.append(Problem(job_id, name, "corrupt", f"sha256 {sha256_bytes(data)[:12]}… ≠ recorded {str(meta.get('sha256'))[:12]}…"))
        return problems

    def verify(self, job_ids: Iterable[str] | None = None) -> Iterator[tuple[str, list[Problem]]]:
        """(job_id, problems) for every job with a record (or the given ids)."""
        for job_id in job_ids if job_ids is not None else self.job_ids():
            if job_ids is None and not self.store.exists(self.job_rel(job_id, RECORD)):
                continue
            yield job_id, self.verify_job(job_id)

    # ------------------------------------------------------------ failures

    def write_failed(self, job_id: str, reason: str, detail: str = "", **extra: Any) -> None:
        previous = self.failure(job_id) or {}
        self.store.write_json(self.job_rel(job_id, FAILED), {
            "job_id": job_id, "reason": reason, "detail": detail[-4000:], "failed_at": time.time(),
            "attempts": int(previous.get("attempts", 0)) + 1, **extra,
        })

    def failure(self, job_id: str) -> dict | None:
        try:
            return self.store.read_json(self.job_rel(job_id, FAILED))
        except (FileNotFoundError, ValueError):
            return None

    # ------------------------------------------------------------ scores

    def score_rel(self, job_id: str, scorer_id: str) -> str:
        return self.job_rel(job_id, "scores", f"{check_name(scorer_id, 'scorer id')}.json")

    def write_score(self, job_id: str, scorer_id: str, payload: dict) -> None:
        self.store.write_json(self.score_rel(job_id, scorer_id), payload)

    def read_score(self, job_id: str, scorer_id: str) -> dict | None:
        try:
            return self.store.read_json(self.score_rel(job_id, scorer_id))
        except (FileNotFoundError, ValueError):
            return None

    def has_score(self, job_id: str, scorer_id: str) -> bool:
        return self.store.exists(self.score_rel(job_id, scorer_id))

    # ------------------------------------------------------------ claims

    def claim(self, job_id: str, worker: str, lease_s: float = 3600.0) -> Claim | None:
        """Take the job for `worker` unless another worker holds an unexpired claim.

        Returns the claim, or None if someone else holds it. A claim past its expiry (a dead
        worker's) is taken over. Claiming again as the same worker renews the lease.
        """
        rel = self.rel("claims", check_name(job_id, "job id"))
        with self._claims_lock():
            current = self._read_claim(job_id)
            if current and current.worker != worker and current.expires > time.time():
                return None
            claim = Claim(job_id, worker, uuid.uuid4().hex, time.time() + lease_s)
            self.store.write_json(rel, claim.__dict__)
        if not self.store.is_local:
            # Object stores have no lock: read back, the last writer wins and the others yield.
            confirmed = self._read_claim(job_id)
            if confirmed is None or confirmed.token != claim.token:
                return None
        return claim

    def renew(self, claim: Claim, lease_s: float) -> bool:
        """Extend our claim's lease; False if it is no longer ours (expired and taken over)."""
        with self._claims_lock():
            current = self._read_claim(claim.job_id)
            if current is None or current.token != claim.token:
                return False
            claim.expires = time.time() + lease_s
            self.store.write_json(self.rel("claims", claim.job_id), claim.__dict__)
            return True

    @contextlib.contextmanager
    def holding(self, claim: Claim, lease_s: float) -> Iterator[None]:
        """Renew `claim` in the background (every lease/3) while the body runs; release it after.

        A worker that dies stops renewing, so its claim expires within `lease_s` and another
        worker takes the job over.
        """
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(lease_s / 3):
                if not self.renew(claim, lease_s):
                    return

        beat = threading.Thread(target=heartbeat, name=f"claim-{claim.job_id}", daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            self.release(claim)

    def release(self, claim: Claim) -> None:
        """Drop the claim if it is still ours."""
        with self._claims_lock():
            current = self._read_claim(claim.job_id)
            if current is not None and current.token == claim.token:
                self.store.delete(self.rel("claims", claim.job_id))

    def active_claims(self) -> dict[str, Claim]:
        now = time.time()
        claims = {}
        for job_id in self.store.list_dir(self.rel("claims")):
            if job_id.startswith(".") or _TMP_MARK in job_id:
                continue
            claim = self._read_claim(job_id)
            if claim is not None and claim.expires > now:
                claims[job_id] = claim
        return claims

    def _read_claim(self, job_id: str) -> Claim | None:
        try:
            return Claim(**self.store.read_json(self.rel("claims", job_id)))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    @contextlib.contextmanager
    def _claims_lock(self) -> Iterator[None]:
        """Serialise claim updates: flock on local disks, a process lock for memory://."""
        if self.store.is_local:
            directory = self.store.local_path(self.rel("claims"))
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        else:
            lock = _memory_claim_locks.setdefault(self.store.path(self.rel("claims")), threading.Lock())
            with lock:
                yield

    # ------------------------------------------------------------ status

    def status(self, planned_ids: list[str]) -> StatusReport:
        report = StatusReport()
        claims = self.active_claims()
        planned = set(planned_ids)
        for job_id in planned_ids:
            if self.store.exists(self.job_rel(job_id, RECORD)):
                report.done.append(job_id)
            elif job_id in claims:
                report.claimed[job_id] = claims[job_id].worker
            elif (failure := self.failure(job_id)) is not None:
                report.failed[job_id] = failure.get("reason", "unknown")
            else:
                report.pending.append(job_id)
        report.unplanned = [j for j in self.job_ids() if j not in planned and self.store.exists(self.job_rel(j, RECORD))]
        return report


"""One population's area of the store: job specs, committed LoRAs, failures, scores, claims.

`record.json` and score files are sealed (storage/seal.py): a changed byte anywhere in a job
folder — weights, config, spec, record or label — is found by `verify`, and a LoRA that does
not verify is not done: the next `lol finetune` clears it and trains it again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.locks import file_lock
from storage.seal import CorruptFile, seal, unseal
from storage.store import _TMP_MARK, StoreError, check_name, check_rel, sha256_bytes

if TYPE_CHECKING:
    from storage.store import Store

RECORD = "record.json"
FAILED = "failed.json"
SPEC = "spec.json"
SCORES = "scores"
# Keys of the records and scores written before seals existed (read as they are).
LEGACY_RECORD_KEYS = frozenset({"job_id", "population", "files", "metrics", "committed_at"})
LEGACY_SCORE_KEYS = frozenset({"job_id", "scorer", "scorer_id", "settings", "labels", "versions", "scored_at"})
_memory_claim_locks: dict[str, threading.Lock] = {}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """Something `verify` found wrong with a stored artifact."""

    job_id: str
    path: str
    kind: str  # "corrupt" | "missing" | "unexpected" | "incomplete" | "unsafe"
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
        """Write the spec unless the store holds exactly these bytes (a damaged copy is replaced)."""
        rel = self.job_rel(job_id, SPEC)
        try:
            if self.store.read_bytes(rel) == spec_json.encode():
                return
        except FileNotFoundError:
            pass
        self.store.write_bytes(rel, spec_json.encode())

    def read_spec(self, job_id: str) -> dict:
        return self.store.read_json(self.job_rel(job_id, SPEC))

    def job_ids(self) -> list[str]:
        """Every job folder in the store (done or not), sorted."""
        return self.store.list_dir(self.rel("jobs"))

    # ------------------------------------------------------------ records

    def record(self, job_id: str) -> dict | None:
        """The job's record, or None if it has not completed (or the record is damaged)."""
        try:
            return unseal(self.store.read_bytes(self.job_rel(job_id, RECORD)), LEGACY_RECORD_KEYS)
        except (FileNotFoundError, CorruptFile):
            return None

    def is_done(self, job_id: str, verify: bool | None = None) -> bool:
        """Whether the job's LoRA exists: a record whose files verify.

        `verify=None` (the default) re-hashes every file on local disks and compares sizes on
        object stores (hashing would download every adapter); True always hashes; False trusts
        the record.
        """
        if self.record(job_id) is None:
            return False
        if verify is False:
            return True
        return not self.verify_job(job_id, hashes=verify or self.store.is_local)

    def clear_partial(self, job_id: str) -> None:
        """Remove what an interrupted attempt — or a damaged LoRA — left (all but spec.json and failed.json).

        Call only while holding the job's claim, for a job found not done (a LoRA that does not
        verify is not done, so its record goes too). The record goes first, so a crash midway
        leaves a job that is plainly not done.
        """
        self.store.delete(self.job_rel(job_id, RECORD))
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
        self.store.write_bytes(self.job_rel(job_id, RECORD), seal(record))
        self.store.delete(self.job_rel(job_id, FAILED))
        return record

    def verify_job(self, job_id: str, hashes: bool = True) -> list[Problem]:
        """Problems of the job's LoRA: its record, every file the record lists, files it does not list.

        `hashes=False` compares sizes only (no download on object stores). Scores are checked
        by `verify_scores`: a damaged label is rescored, it does not make the LoRA retrain.
        """
        try:
            record = unseal(self.store.read_bytes(self.job_rel(job_id, RECORD)), LEGACY_RECORD_KEYS)
        except FileNotFoundError:
            return [Problem(job_id, RECORD, "missing")]
        except CorruptFile as exc:
            return [Problem(job_id, RECORD, "corrupt", str(exc)[:80])]
        except StoreError as exc:
            return [Problem(job_id, RECORD, "unsafe", str(exc)[:120])]
        listed = record.get("files")
        if not isinstance(listed, dict):
            return [Problem(job_id, RECORD, "corrupt", "no file list")]
        problems = []
        for name, meta in sorted(listed.items()):
            try:
                check_rel(name)
                if hashes:
                    data = self.store.read_bytes(self.job_rel(job_id, name))
                    size, digest = len(data), sha256_bytes(data)
                else:
                    size, digest = self.store.size(self.job_rel(job_id, name)), meta.get("sha256")
            except FileNotFoundError:
                problems.append(Problem(job_id, name, "missing"))
                continue
            except StoreError as exc:
                problems.append(Problem(job_id, name, "unsafe", str(exc)[:120]))
                continue
            if size != meta.get("size") or digest != meta.get("sha256"):
                problems.append(Problem(job_id, name, "corrupt", f"{size} bytes, sha256 {str(digest)[:12]}… ≠ "
                                        f"recorded {meta.get('size')} bytes, {str(meta.get('sha256'))[:12]}…"))
        for name in self.store.list_files(self.job_rel(job_id)):
            if name not in listed and name not in (RECORD, FAILED) and not _is_score_file(name) and _TMP_MARK not in name:
                problems.append(Problem(job_id, name, "unexpected", "a file the record does not list"))
        return problems

    def verify_scores(self, job_id: str) -> list[Problem]:
        """Problems of the job's score files (each is sealed)."""
        problems = []
        for name in self.store.list_dir(self.job_rel(job_id, SCORES)):
            if _TMP_MARK in name:
                continue
            try:
                unseal(self.store.read_bytes(self.job_rel(job_id, SCORES, name)), LEGACY_SCORE_KEYS)
            except CorruptFile as exc:
                problems.append(Problem(job_id, f"{SCORES}/{name}", "corrupt", str(exc)[:80]))
            except StoreError as exc:
                problems.append(Problem(job_id, f"{SCORES}/{name}", "unsafe", str(exc)[:120]))
            except (FileNotFoundError, IsADirectoryError):
                problems.append(Problem(job_id, f"{SCORES}/{name}", "unexpected", "not a score file"))
        return problems

    def leftovers(self, job_id: str) -> list[str]:
        """Files of a job without a record beyond its spec and failure: what a dead commit, or a
        deleted record, leaves. Empty for a job that has a record or is claimed right now."""
        if self.store.exists(self.job_rel(job_id, RECORD)) or job_id in self.active_claims():
            return []
        return [f for f in self.store.list_files(self.job_rel(job_id)) if f not in (SPEC, FAILED) and _TMP_MARK not in f]

    def damage(self, job_id: str) -> list[Problem]:
        """Everything wrong with one stored job: its LoRA, its scores, or files left without a record."""
        if self.store.exists(self.job_rel(job_id, RECORD)):
            return self.verify_job(job_id) + self.verify_scores(job_id)
        left = self.leftovers(job_id)
        if left:
            return [Problem(job_id, RECORD, "incomplete", f"{len(left)} file(s) such as {left[0]} but no record "
                            "(an interrupted commit or a deleted record)")]
        return []

    def verify(self, job_ids: Iterable[str] | None = None) -> Iterator[tuple[str, list[Problem]]]:
        """(job_id, problems) for every stored job (of `job_ids`, default all) that holds a LoRA or its remains."""
        for job_id in job_ids if job_ids is not None else self.job_ids():
            if self.store.exists(self.job_rel(job_id, RECORD)) or self.leftovers(job_id):
                yield job_id, self.damage(job_id)

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
        self.store.write_bytes(self.score_rel(job_id, scorer_id), seal(payload))

    def read_score(self, job_id: str, scorer_id: str) -> dict | None:
        """The stored score, or None if there is none or it is damaged (then it is scored again)."""
        try:
            return unseal(self.store.read_bytes(self.score_rel(job_id, scorer_id)), LEGACY_SCORE_KEYS)
        except (FileNotFoundError, CorruptFile):
            return None

    def has_score(self, job_id: str, scorer_id: str) -> bool:
        """A score that reads back intact; a damaged one counts as missing, so a rerun rescores it."""
        return self.read_score(job_id, scorer_id) is not None

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
        worker takes the job over. A renewal that fails to write (a full disk, a store error) is
        logged and tried again a third of a lease later; one that finds the claim taken over stops.
        A release that fails is logged: the claim then expires within one lease.
        """
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(lease_s / 3):
                try:
                    if not self.renew(claim, lease_s):
                        log.warning("claim on %s was taken over (lease of %.0f s ran out)", claim.job_id, lease_s)
                        return
                except OSError as exc:
                    log.warning("could not renew the claim on %s: %s; retrying", claim.job_id, exc)

        beat = threading.Thread(target=heartbeat, name=f"claim-{claim.job_id}", daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            try:
                self.release(claim)
            except OSError as exc:
                log.warning("could not release the claim on %s (it expires within %.0f s): %s", claim.job_id, lease_s, exc)

    def release(self, claim: Claim) -> None:
        """Drop the claim if it is still ours."""
        with self._claims_lock():
            current = self._read_claim(claim.job_id)
            if current is not None and current.token == claim.token:
                self.store.delete(self.rel("claims", claim.job_id))

    def sweep_claims(self) -> int:
        """Remove expired claims and the temporary files of claim writes a killed worker left;
        returns how many files went. Claims are only written under the claims lock, so a
        temporary file found while holding it belongs to a writer that died."""
        removed = 0
        with self._claims_lock():
            now = time.time()
            for name in self.store.list_dir(self.rel("claims")):
                if name.startswith("."):
                    continue
                if _TMP_MARK in name:
                    self.store.delete(self.rel("claims", name))
                    removed += 1
                    continue
                claim = self._read_claim(name)
                if claim is None or claim.expires <= now:
                    self.store.delete(self.rel("claims", name))
                    removed += 1
        return removed

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
            with file_lock(directory / ".lock"):
                yield
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



def _is_score_file(name: str) -> bool:
    folder, _, file = name.partition("/")
    return folder == SCORES and file.endswith(".json") and "/" not in file

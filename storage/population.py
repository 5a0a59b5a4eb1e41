"""One population's area of the store: job specs, committed LoRAs, failures, scores, claims.

`record.json` and score files are sealed (storage/seal.py): a changed byte anywhere in a job
folder — weights, config, spec, record or label — is found by `verify`, and a LoRA that does
not verify is not done: the next `lol finetune` clears it and trains it again.

Content is bound to identity: `spec.json` hashes to its folder's job id, and the record and
every score name the job (and population) of the folder they are in, so a job folder swapped
with another's, or a file copied from one job to another, is damage — not a valid LoRA. A
symbolic link anywhere in a job folder is damage too. Files without a seal (written before
seals existed) are refused unless migrated once with `reseal` (`lol verify --reseal`).

Damage is per job: every per-job read here turns a refused path into that job's problem, so
one bad job never stops `verify`, `status`, `finetune` or `publish` from seeing the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.listing import CONCURRENCY
from storage.paths import TMP_MARK, StoreError, check_name, check_rel, sha256_bytes
from storage.seal import CorruptFile, seal, unseal

if TYPE_CHECKING:
    from storage.store import Store

RECORD = "record.json"
FAILED = "failed.json"
SPEC = "spec.json"
SCORES = "scores"
# Keys of the records and scores written before seals existed (read only by `reseal`).
LEGACY_RECORD_KEYS = frozenset({"job_id", "population", "files", "metrics", "committed_at"})
LEGACY_SCORE_KEYS = frozenset({"job_id", "scorer", "scorer_id", "settings", "labels", "versions", "scored_at"})
# A claim's `expires` may lie at most its lease (itself at most MAX_LEASE_S) plus this margin for
# clocks that differ between hosts beyond now; a claim further ahead is stale (swept, taken over).
CLOCK_SKEW_S = 300.0
MAX_BOOKKEEPING_BYTES = 16 << 20  # spec, record, score, claim and failure files are far smaller
MAX_LEASE_S = 3600.0  # claims renew every third of their lease, so no worker needs a longer one
_memory_claim_locks: dict[str, threading.Lock] = {}
_NO_FOLDER: frozenset[str] = frozenset()
_UNUSUAL = object()  # a job folder `status` examines path by path (see `_job_entries`)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """Something `verify` found wrong with a stored artifact."""

    job_id: str
    path: str
    kind: str  # "corrupt" | "missing" | "unexpected" | "incomplete" | "unsafe" | "mismatch" | "unsealed"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.job_id}/{self.path}: {self.kind}{' (' + self.detail + ')' if self.detail else ''}"


@dataclass
class Claim:
    job_id: str
    worker: str
    token: str
    expires: float
    lease_s: float = 0.0  # 0: written before leases were recorded; the reader's bound then is MAX_LEASE_S
    # On S3: the ETag of the claim object as this worker last wrote it (never stored in the object).
    etag: str = field(default="", repr=False, compare=False)

    def is_live(self, now: float) -> bool:
        """Unexpired, and not further ahead than its lease allows (an absurd expiry is stale)."""
        lease = self.lease_s if 0 < self.lease_s <= MAX_LEASE_S else MAX_LEASE_S
        return now < self.expires <= now + lease + CLOCK_SKEW_S


@dataclass
class StatusReport:
    """State of every planned job: done, failed, claimed (in flight) or pending."""

    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # job_id -> reason
    claimed: dict[str, str] = field(default_factory=dict)  # job_id -> worker
    pending: list[str] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)  # job_id -> why its folder cannot be read safely
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
        """The job's record, or None if it has not completed (or the record is damaged, unsealed,
        another job's, or reached through a link)."""
        try:
            record = self._read_record(job_id)
        except (OSError, CorruptFile, StoreError):  # absent, a folder or FIFO in its place, damaged, foreign
            return None
        return record

    def _read_record(self, job_id: str) -> dict:
        """The sealed record of this folder's job; CorruptFile if it is not (FileNotFoundError, StoreError)."""
        if self.store.is_link(self.job_rel(job_id)):
            raise StoreError(f"job folder {job_id} is a symbolic link")
        record = unseal(self.store.read_bytes(self.job_rel(job_id, RECORD), max_bytes=MAX_BOOKKEEPING_BYTES))
        mismatch = _identity_mismatch(record, job_id, self.name)
        if mismatch:
            raise CorruptFile(f"record of {mismatch}")
        return record

    def _read_score(self, job_id: str, scorer_id: str) -> dict:
        """The sealed score of this folder's job by `scorer_id`; CorruptFile if it is not."""
        score = unseal(self.store.read_bytes(self.score_rel(job_id, scorer_id), max_bytes=MAX_BOOKKEEPING_BYTES))
        mismatch = _identity_mismatch(score, job_id, self.name)
        if mismatch or score.get("scorer_id") != scorer_id:
            raise CorruptFile(f"score of {mismatch or 'scorer ' + repr(score.get('scorer_id'))}")
        return score

    def spec_problem(self, job_id: str, data: bytes | None = None) -> str:
        """Why the folder's spec.json (or `data`, its bytes already read) is not this job's ('' if
        it is): its id, population and content hash."""
        try:
            if data is None:
                data = self.store.read_bytes(self.job_rel(job_id, SPEC), max_bytes=MAX_BOOKKEEPING_BYTES)
            spec = json.loads(data)
        except FileNotFoundError:
            return "no spec.json"
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # StoreError is a ValueError
            return f"spec.json is not JSON (or not a file): {str(exc)[:60] or type(exc).__name__}"
        except OSError as exc:
            return f"spec.json cannot be read: {type(exc).__name__}"
        if not isinstance(spec, dict) or not isinstance(spec.get("spec"), dict):
            return "spec.json holds no job spec"
        mismatch = _identity_mismatch(spec, job_id, self.name)
        if mismatch:
            return f"spec.json is the spec of {mismatch}"
        try:
            digest = hashlib.sha256(_canonical_json(spec["spec"]).encode()).hexdigest()
        except ValueError:
            return "spec.json holds values that are not canonical JSON"
        if not digest.startswith(job_id):
            return f"spec.json's content hashes to {digest[:len(job_id)]}, not to its job id {job_id}"
        return ""

    def is_done(self, job_id: str, verify: bool | None = None) -> bool:
        """Whether the job's LoRA exists: a record whose files verify.

        `verify=None` (the default) re-hashes every file on local disks and compares sizes on
        object stores (hashing would download every adapter); True always hashes; False trusts
        the record.
        """
        if self.record(job_id) is None or (verify is not False and self.spec_problem(job_id)):
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
        folder = self.job_rel(job_id)
        if self.store.is_link(folder) or self._not_a_folder(job_id):  # a link or a file: unlink it, start afresh
            self.store.delete(folder)
            return
        self.store.delete(self.job_rel(job_id, RECORD))
        for link in self.store.links_under(folder):  # unlinked, never followed
            self.store.delete(f"{folder}/{link}")
        for path in self.store.list_files(folder):
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

    def verify_job(self, job_id: str, hashes: bool = True, objects: dict[str, int] | None = None) -> list[Problem]:
        """Problems of the job's LoRA: its record, every file the record lists, files it does not list.

        `hashes=False` compares sizes only (no download on object stores). Scores are checked
        by `verify_scores`: a damaged label is rescored, it does not make the LoRA retrain.
        `objects` ({path in the job folder: size}, from `object_listing` on an object store) stands
        in for the per-file size requests and the folder's listing; every file is still read.
        """
        try:
            links = self.store.links_under(self.job_rel(job_id))
        except StoreError as exc:
            return [Problem(job_id, "", "unsafe", str(exc)[:120])]
        if "" in links:
            return [Problem(job_id, "", "unsafe", "the job folder is a symbolic link")]
        problems = [Problem(job_id, link, "unsafe", "a symbolic link in a job folder") for link in links]
        try:
            record = unseal(self.store.read_bytes(self.job_rel(job_id, RECORD), max_bytes=MAX_BOOKKEEPING_BYTES))
        except FileNotFoundError:
            return problems + [Problem(job_id, RECORD, "missing")]
        except OSError as exc:  # a folder (or a folder above it is a file)
            return problems + [Problem(job_id, RECORD, "corrupt", f"not a readable file: {type(exc).__name__}")]
        except CorruptFile as exc:
            kind = "unsealed" if _is_legacy(self.store, self.job_rel(job_id, RECORD), LEGACY_RECORD_KEYS) else "corrupt"
            return problems + [Problem(job_id, RECORD, kind, str(exc)[:80] if kind == "corrupt" else
                                       "written before seals existed: `lol verify --reseal` checks and seals it")]
        except StoreError as exc:
            return problems + [Problem(job_id, RECORD, "unsafe", str(exc)[:120])]
        mismatch = _identity_mismatch(record, job_id, self.name)
        if mismatch:
            return problems + [Problem(job_id, RECORD, "mismatch", f"the record of {mismatch}")]
        spec_data = None  # on an object store spec.json is read once, for its identity and its checksum
        if objects is not None and objects.get(SPEC, MAX_BOOKKEEPING_BYTES + 1) <= MAX_BOOKKEEPING_BYTES:
            with contextlib.suppress(OSError, StoreError):
                spec_data = self.store.read_bytes(self.job_rel(job_id, SPEC), max_bytes=MAX_BOOKKEEPING_BYTES)
        spec_problem = self.spec_problem(job_id, spec_data)
        if spec_problem:
            problems.append(Problem(job_id, SPEC, "mismatch", spec_problem))
        listed = record.get("files")
        if not isinstance(listed, dict):
            return problems + [Problem(job_id, RECORD, "corrupt", "no file list")]
        for name, meta in sorted(listed.items()):
            if name in links:  # named above; never read through
                continue
            try:
                check_rel(name)
                size, digest = self._size(job_id, name, objects), meta.get("sha256")
                if hashes and size == meta.get("size"):  # never read more than the record lists
                    data = spec_data if name == SPEC and spec_data is not None else \
                        self.store.read_bytes(self.job_rel(job_id, name), max_bytes=size)
                    size, digest = len(data), sha256_bytes(data)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                problems.append(Problem(job_id, name, "missing"))
                continue
            except (OSError, TypeError) as exc:
                problems.append(Problem(job_id, name, "corrupt", f"cannot be read: {type(exc).__name__}"))
                continue
            except StoreError as exc:
                problems.append(Problem(job_id, name, "unsafe", str(exc)[:120]))
                continue
            if size != meta.get("size") or digest != meta.get("sha256"):
                problems.append(Problem(job_id, name, "corrupt", f"{size} bytes, sha256 {str(digest)[:12]}… ≠ "
                                        f"recorded {meta.get('size')} bytes, {str(meta.get('sha256'))[:12]}…"))
        for name in sorted(objects) if objects is not None else self.store.list_files(self.job_rel(job_id)):
            if name not in listed and name not in links and name not in (RECORD, FAILED) and not _is_score_file(name) and TMP_MARK not in name:
                problems.append(Problem(job_id, name, "unexpected", "a file the record does not list"))
        return problems

    def verify_scores(self, job_id: str, objects: dict[str, int] | None = None) -> list[Problem]:
        """Problems of the job's score files (each is sealed); `objects` as in `verify_job`."""
        problems = []
        try:
            names = self._score_names(job_id, objects)
        except StoreError as exc:
            return [Problem(job_id, SCORES, "unsafe", str(exc)[:120])]
        for name in names:
            if TMP_MARK in name:
                continue
            try:
                if not name.endswith(".json"):
                    raise FileNotFoundError(name)
                self._read_score(job_id, name.removesuffix(".json"))
            except CorruptFile as exc:
                legacy = _is_legacy(self.store, self.job_rel(job_id, SCORES, name), LEGACY_SCORE_KEYS)
                problems.append(Problem(job_id, f"{SCORES}/{name}", "unsealed" if legacy else "corrupt",
                                        "written before seals existed: `lol verify --reseal` checks and seals it"
                                        if legacy else str(exc)[:80]))
            except StoreError as exc:
                problems.append(Problem(job_id, f"{SCORES}/{name}", "unsafe", str(exc)[:120]))
            except OSError:
                problems.append(Problem(job_id, f"{SCORES}/{name}", "unexpected", "not a score file"))
        return problems

    def leftovers(self, job_id: str, objects: dict[str, int] | None = None, claims: set[str] | None = None) -> list[str]:
        """Files of a job without a record beyond its spec and failure: what a dead commit, or a
        deleted record, leaves. Empty for a job that has a record or is claimed right now.
        With `objects` and `claims` (from `object_listing`) only this job's claim is read, if it has one."""
        if objects is None:
            if self._has_record_file(job_id) or job_id in self.active_claims():
                return []
            files = self.store.list_files(self.job_rel(job_id))
        else:
            if RECORD in objects or (job_id in (claims or ()) and self._live_claim(job_id) is not None):
                return []
            files = sorted(objects)
        return [f for f in files if f not in (SPEC, FAILED) and TMP_MARK not in f]

    def damage(self, job_id: str, objects: dict[str, int] | None = None, claims: set[str] | None = None) -> list[Problem]:
        """Everything wrong with one stored job: its LoRA, its scores, or files left without a record.

        On an object store `objects` and `claims` (from `object_listing`) spare the per-file
        requests. A listing is not a snapshot, though (a commit may land between its pages), so
        a job in which it finds anything wrong is examined again path by path, and only what that
        finds is reported: the listing can spare requests, never decide that a job is damaged.
        """
        if objects is not None and not self.store.is_local:
            try:
                if RECORD in objects:
                    found = self.verify_job(job_id, objects=objects) + self.verify_scores(job_id, objects)
                else:
                    found = self.leftovers(job_id, objects, claims)
            except StoreError:
                found = True
            if not found:
                return []
        return self._damage_by_path(job_id)

    def _damage_by_path(self, job_id: str) -> list[Problem]:
        try:
            if self.store.is_link(self.job_rel(job_id)):
                return [Problem(job_id, "", "unsafe", "the job folder is a symbolic link")]
            if self._not_a_folder(job_id):
                return [Problem(job_id, "", "unsafe", "the job's folder is a file (or FIFO, device)")]
            if self._has_record_file(job_id):
                return self.verify_job(job_id) + self.verify_scores(job_id)
            left = self.leftovers(job_id)
        except StoreError as exc:
            return [Problem(job_id, "", "unsafe", str(exc)[:120])]
        if left:
            return [Problem(job_id, RECORD, "incomplete", f"{len(left)} file(s) such as {left[0]} but no record "
                            "(an interrupted commit or a deleted record)")]
        return []

    def verify(self, job_ids: Iterable[str] | None = None, scored: dict[str, set[str]] | None = None,
               listing: tuple[dict[str, dict[str, int]], set[str]] | None = None) -> Iterator[tuple[str, list[Problem]]]:
        """(job_id, problems) for every stored job (of `job_ids`, default all) that holds a LoRA or its remains.

        With `scored`, each job that holds a record and has no problem gets the scorer ids of its
        score files there (all of which verified). On an object store the jobs and claims folders
        are listed once (`object_listing`, or `listing`: what it returned) and jobs are checked
        `CONCURRENCY` at a time, in order.
        """
        if not self.store.is_local:
            yield from self._verify_objects(job_ids, scored, listing)
            return
        for job_id in job_ids if job_ids is not None else self.job_ids():
            try:
                check_name(job_id, "job id")
                if self._not_a_folder(job_id):
                    yield job_id, [Problem(job_id, "", "unsafe", "the job's folder is a file (or FIFO, device)")]
                    continue
                holds = self.store.is_link(self.job_rel(job_id)) or self._has_record_file(job_id) or self.leftovers(job_id)
            except StoreError as exc:
                yield job_id, [Problem(job_id, "", "unsafe", str(exc)[:120])]
                continue
            if holds:
                problems = self.damage(job_id)
                if scored is not None and not problems and self._has_record_file(job_id):
                    scored[job_id] = {n.removesuffix(".json") for n in self.store.list_dir(self.job_rel(job_id, SCORES))}
                yield job_id, problems

    def _verify_objects(self, job_ids: Iterable[str] | None, scored: dict[str, set[str]] | None,
                        listing: tuple[dict[str, dict[str, int]], set[str]] | None) -> Iterator[tuple[str, list[Problem]]]:
        jobs, claims = listing if listing is not None else self.object_listing()
        ids = list(job_ids) if job_ids is not None else sorted(jobs)

        def check(job_id: str) -> list[Problem] | None:
            try:
                check_name(job_id, "job id")
            except StoreError as exc:
                return [Problem(job_id, "", "unsafe", str(exc)[:120])]
            objects = jobs.get(job_id, {})
            if RECORD not in objects and not self.leftovers(job_id, objects, claims):
                return None
            problems = self.damage(job_id, objects, claims)
            if scored is not None and not problems and RECORD in objects:
                scored[job_id] = {n.removesuffix(".json") for n in self._score_names(job_id, objects)}
            return problems

        with ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="verify") as pool:
            for job_id, problems in zip(ids, pool.map(check, ids)):
                if problems is not None:
                    yield job_id, problems

    def _size(self, job_id: str, name: str, objects: dict[str, int] | None) -> int:
        """The size of the job's file `name`: from `objects` if given (FileNotFoundError if not there)."""
        if objects is None:
            return self.store.size(self.job_rel(job_id, name))
        if name not in objects:
            raise FileNotFoundError(name)
        return objects[name]

    def _score_names(self, job_id: str, objects: dict[str, int] | None) -> list[str]:
        """Names directly under the job's scores folder (files and folders), sorted."""
        if objects is None:
            return self.store.list_dir(self.job_rel(job_id, SCORES))
        self.job_rel(job_id, SCORES)  # the job id's checks
        return sorted({rel[len(SCORES) + 1:].split("/", 1)[0] for rel in objects
                       if rel.startswith(f"{SCORES}/") and len(rel) > len(SCORES) + 1})

    def _live_claim(self, job_id: str) -> Claim | None:
        claim = self._read_claim(job_id)
        return claim if claim is not None and claim.is_live(time.time()) else None

    def _has_record_file(self, job_id: str) -> bool:
        path = self.store.path(self.job_rel(job_id, RECORD))
        return self.store.fs.isfile(path) if self.store.is_local else self.store.fs.exists(path)

    def _not_a_folder(self, job_id: str) -> bool:
        """The job's path holds a file (or anything but a folder) where its folder should be."""
        path = self.store.path(self.job_rel(job_id))
        return self.store.is_local and self.store.fs.exists(path) and not self.store.fs.isdir(path)

    def reseal(self, job_ids: Iterable[str] | None = None) -> dict[str, list[str]]:
        """One-time migration: seal the records and scores written before seals existed.

        A file is sealed only if it has exactly the old key set, names this folder's job (and the
        score its scorer id), and — for a record — every file it lists verifies and the spec is
        the job's. Returns {job_id: [resealed paths]}; anything else is left for `verify` to name.
        """
        ids = list(job_ids if job_ids is not None else self.job_ids())
        if any(self.record(job_id) is not None for job_id in ids):
            raise StoreError(f"population {self.name!r} already holds sealed records, so it was written after seals "
                             "existed: an unsealed file in it is damage, not an old file; `--reseal` migrates only "
                             "populations written before seals (`lol finetune` / `lol score` repair damage)")
        done: dict[str, list[str]] = {}
        for job_id in ids:
            try:
                check_name(job_id, "job id")
                if self.store.is_link(self.job_rel(job_id)):
                    continue
                sealed = self._reseal_job(job_id)
            except (StoreError, FileNotFoundError):
                continue
            if sealed:
                done[job_id] = sealed
        return done

    def _reseal_job(self, job_id: str) -> list[str]:
        sealed = []
        rel = self.job_rel(job_id, RECORD)
        record = _legacy_value(self.store, rel, LEGACY_RECORD_KEYS)
        if record is not None and not _identity_mismatch(record, job_id, self.name) and not self.spec_problem(job_id):
            self.store.write_bytes(rel, seal(record))
            if self.verify_job(job_id):  # a listed file does not verify: put the unsealed record back
                self.store.write_json(rel, record)
            else:
                sealed.append(RECORD)
        for name in self.store.list_dir(self.job_rel(job_id, SCORES)):
            rel = self.job_rel(job_id, SCORES, name)
            score = _legacy_value(self.store, rel, LEGACY_SCORE_KEYS)
            if score is not None and not _identity_mismatch(score, job_id, self.name) and f"{score.get('scorer_id')}.json" == name:
                self.store.write_bytes(rel, seal(score))
                sealed.append(f"{SCORES}/{name}")
        return sealed

    # ------------------------------------------------------------ failures

    def write_failed(self, job_id: str, reason: str, detail: str = "", **extra: Any) -> None:
        previous = self.failure(job_id) or {}
        self.store.write_json(self.job_rel(job_id, FAILED), {
            "job_id": job_id, "reason": reason, "detail": detail[-4000:], "failed_at": time.time(),
            "attempts": int(previous.get("attempts", 0)) + 1, **extra,
        })

    def failure(self, job_id: str) -> dict | None:
        """The job's failed.json (None if absent, unreadable, or another job's)."""
        try:
            failure = json.loads(self.store.read_bytes(self.job_rel(job_id, FAILED), max_bytes=MAX_BOOKKEEPING_BYTES))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            return None
        if not isinstance(failure, dict) or failure.get("job_id") != job_id:
            return None
        failure["reason"] = str(failure.get("reason", "unknown"))[:500]
        return failure

    # ------------------------------------------------------------ scores

    def score_rel(self, job_id: str, scorer_id: str) -> str:
        return self.job_rel(job_id, "scores", f"{check_name(scorer_id, 'scorer id')}.json")

    def write_score(self, job_id: str, scorer_id: str, payload: dict) -> None:
        """Seal and write a score; it names its job, population and scorer id (checked on every read)."""
        assert payload.get("job_id") == job_id and payload.get("scorer_id") == scorer_id, "a score names its job and scorer"
        self.store.write_bytes(self.score_rel(job_id, scorer_id), seal({**payload, "population": self.name}))

    def read_score(self, job_id: str, scorer_id: str) -> dict | None:
        """The stored score, or None if there is none or it is damaged, unsealed or another job's
        (then it is scored again)."""
        try:
            return self._read_score(job_id, scorer_id)
        except (OSError, CorruptFile, StoreError):
            return None

    def has_score(self, job_id: str, scorer_id: str) -> bool:
        """A score that reads back intact; a damaged one counts as missing, so a rerun rescores it."""
        return self.read_score(job_id, scorer_id) is not None

    # ------------------------------------------------------------ claims

    def claim(self, job_id: str, worker: str, lease_s: float = 3600.0) -> Claim | None:
        """Take the job for `worker` unless another worker holds an unexpired claim.

        Returns the claim, or None if someone else holds it. A claim past its expiry (a dead
        worker's) is taken over. Claiming again as the same worker renews the lease. Of workers
        racing for one job exactly one wins: under a lock on local disks and memory://, by
        conditional writes on S3 (see `_put_claim_if`).
        """
        check_name(job_id, "job id")
        lease_s = min(float(lease_s), MAX_LEASE_S)
        claim = Claim(job_id, worker, uuid.uuid4().hex, time.time() + lease_s, lease_s)
        if self._object_claims():
            claim.etag = self._put_claim_if(job_id, _free_for(worker), claim) or ""
            return claim if claim.etag else None
        with self._claims_lock():
            if not _free_for(worker)(self._read_claim(job_id)):
                return None
            self.store.write_bytes(self.rel("claims", job_id), _claim_bytes(claim))
        return claim

    def renew(self, claim: Claim, lease_s: float) -> bool:
        """Extend our claim's lease; False if it is no longer ours (expired and taken over)."""
        lease_s = min(float(lease_s), MAX_LEASE_S)
        renewed = Claim(claim.job_id, claim.worker, claim.token, time.time() + lease_s, lease_s)
        if self._object_claims():
            etag = self._replace_own_claim(claim, renewed)
            ours, claim.etag = etag is not None, etag or claim.etag
        else:
            with self._claims_lock():
                ours = _held_by(claim.token)(self._read_claim(claim.job_id))
                if ours:
                    self.store.write_bytes(self.rel("claims", claim.job_id), _claim_bytes(renewed))
        if ours:
            claim.expires, claim.lease_s = renewed.expires, renewed.lease_s
        return ours

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
        """Drop the claim if it is still ours (on S3: mark it ended, see `sweep_claims`)."""
        if self._object_claims():
            ended = Claim(claim.job_id, claim.worker, claim.token, 0.0, claim.lease_s)
            self._replace_own_claim(claim, ended)
            return
        with self._claims_lock():
            if _held_by(claim.token)(self._read_claim(claim.job_id)):
                self.store.delete(self.rel("claims", claim.job_id))

    def sweep_claims(self) -> int:
        """Remove expired claims and the temporary files of claim writes a killed worker left;
        returns how many files went. Claims are only written under the claims lock, so a
        temporary file found while holding it belongs to a writer that died.

        On S3 nothing is removed: an ended or expired claim stays, one small object per job, and
        is taken over in place (If-Match); deleting it could delete the claim a racing worker
        has just written over it. Its writes are single PUTs, so they leave no temporary files.
        """
        if self._object_claims():
            return 0
        removed = 0
        with self._claims_lock():
            now = time.time()
            for name in self.store.list_dir(self.rel("claims")):
                if name.startswith("."):
                    continue
                if TMP_MARK in name:
                    self.store.delete(self.rel("claims", name))
                    removed += 1
                    continue
                claim = self._read_claim(name)
                if claim is None or not claim.is_live(now):
                    self.store.delete(self.rel("claims", name))
                    removed += 1
        return removed

    def active_claims(self) -> dict[str, Claim]:
        now = time.time()
        claims = {}
        for job_id in self.store.list_dir(self.rel("claims")):
            if job_id.startswith(".") or TMP_MARK in job_id:
                continue
            claim = self._read_claim(job_id)
            if claim is not None and claim.is_live(now):
                claims[job_id] = claim
        return claims

    def _read_claim(self, job_id: str) -> Claim | None:
        """The claim file's claim, or None if absent or not a claim of this job (unreadable, wrong types)."""
        try:
            return _parse_claim(self.store.read_bytes(self.rel("claims", job_id), max_bytes=MAX_BOOKKEEPING_BYTES), job_id)
        except (OSError, StoreError):
            return None

    def _object_claims(self) -> bool:
        """Whether claims here are conditional writes (S3), not lock-serialised (local disks, memory://).
        The object store is probed on first use: ConditionalWritesUnsupported where it lacks them."""
        if self.store.is_local or self.store.is_memory:
            return False
        self.store.conditional_writes(self.rel("claims"))
        return True

    def _replace_own_claim(self, claim: Claim, new: Claim) -> str | None:
        """Write `new` over our claim on S3 (a renewal or release); its new ETag, or None if the
        claim is no longer ours. One conditional PUT on the ETag of our last write: the object is
        then byte for byte what we wrote, so still ours. If that is refused (the claim changed —
        taken over, or our last write's answer was lost) or no ETag is known, the claim is read
        and its token checked (`_put_claim_if`), as for any other claim write."""
        if claim.etag:
            writes = self.store.conditional_writes(self.rel("claims"))
            etag = writes.replace(self.store.path(self.rel("claims", claim.job_id)), _claim_bytes(new), claim.etag)
            if etag is not None:
                return etag
        return self._put_claim_if(claim.job_id, _held_by(claim.token), new)

    def _put_claim_if(self, job_id: str, replaceable: Callable[[Claim | None], bool], new: Claim) -> str | None:
        """Write `new` as the job's claim if `replaceable(current claim)`, atomically on S3: created
        only if no claim object exists (If-None-Match: *), else replacing only the object read
        (If-Match: its ETag) — so of two workers that read the same claim, one writes. The new
        ETag, or None if `replaceable` said no or another worker's write came first."""
        writes = self.store.conditional_writes(self.rel("claims"))
        path = self.store.path(self.rel("claims", job_id))
        current = writes.read(path)
        if not replaceable(_parse_claim(current.data, job_id) if current else None):
            return None
        data = _claim_bytes(new)
        etag = writes.create(path, data) if current is None else writes.replace(path, data, current.etag)
        if etag is not None:
            return etag
        # Refused: another worker's write came first — or ours landed and only its answer was
        # lost (the client retried it). The claim object tells which.
        again = writes.read(path)
        return again.etag if again is not None and again.data == data else None

    @contextlib.contextmanager
    def _claims_lock(self) -> Iterator[None]:
        """Serialise claim updates: flock on local disks, a process lock for memory://."""
        if self.store.is_local:
            with self.store.lock(self.rel("claims", ".lock")):
                yield
        else:
            assert self.store.is_memory, "claims on object stores are conditional writes, not locked"
            lock = _memory_claim_locks.setdefault(self.store.path(self.rel("claims")), threading.Lock())
            with lock:
                yield

    # ------------------------------------------------------------ status

    def status(self, planned_ids: list[str]) -> StatusReport:
        """The state of every planned job, from one listing of the jobs folder (and of the claims;
        on object stores both at once, in concurrent parts: `object_listing`).

        Reads only what the listing cannot tell: the claim of a job without a record that holds
        one, the failure of a job without a record or live claim that holds one. On local disks a
        job folder that is a link, a file or holds anything but a plain `record.json` file is
        examined as before, one path at a time (`_job_state`), so damage is found as it always was.
        """
        report = StatusReport()
        if self.store.is_local:
            entries, default = self._job_entries()
            claim_names = set(self.store.list_dir(self.rel("claims")))
        else:
            jobs, claims = self.object_listing()
            entries = {job_id: frozenset(files.keys() & {RECORD, FAILED}) for job_id, files in jobs.items()}
            default, claim_names = _NO_FOLDER, claims
        now = time.time()
        for job_id in planned_ids:
            names = entries.get(job_id, default)
            if names is _UNUSUAL:
                state, detail = self._job_state(job_id)
                if state == "damaged":
                    report.damaged[job_id] = detail
                    continue
                has_record, has_failure = state == "done", True
            else:
                has_record, has_failure = RECORD in names, FAILED in names
            if has_record:
                report.done.append(job_id)
                continue
            claim = self._read_claim(job_id) if job_id in claim_names else None
            if claim is not None and claim.is_live(now):
                report.claimed[job_id] = claim.worker
            elif has_failure and (failure := self.failure(job_id)) is not None:
                report.failed[job_id] = failure.get("reason", "unknown")
            else:
                report.pending.append(job_id)
        planned = set(planned_ids)
        report.unplanned = sorted(j for j, names in entries.items() if j not in planned and (
            _safe_has_record(self, j) if names is _UNUSUAL else RECORD in names))
        return report

    def _job_state(self, job_id: str) -> tuple[str, str]:
        """('damaged', why) | ('done', '') | ('open', '') of one job, path by path (links and files
        where folders belong are damage; a record file makes it done)."""
        try:
            has_record = not self.store.is_link(self.job_rel(job_id)) and self._has_record_file(job_id)
        except StoreError as exc:
            return "damaged", str(exc)[:200]
        if self.store.is_link(self.job_rel(job_id)):
            return "damaged", "the job folder is a symbolic link"
        if self._not_a_folder(job_id):
            return "damaged", "the job's folder is a file"
        return ("done" if has_record else "open"), ""

    def object_listing(self) -> tuple[dict[str, dict[str, int]], set[str]]:
        """On an object store: ({job folder name: {path in the folder: size}}, {claim name}) of every
        object under the population's jobs and claims folders, both listed at once by concurrent
        listings (`Store.list_trees`): no request per job."""
        jobs, claims = self.store.list_trees(self.rel("jobs"), self.rel("claims"))
        by_job: dict[str, dict[str, int]] = {}
        for rel, size in jobs.items():
            job_id, _, rest = rel.partition("/")
            by_job.setdefault(job_id, {})[rest] = size
        return by_job, {rel.split("/", 1)[0] for rel in claims}

    def _job_entries(self) -> tuple[dict[str, frozenset[str] | object], frozenset[str] | object]:
        """On a local disk: ({job folder name: the bookkeeping files in it (of record.json,
        failed.json)}, what a job not listed maps to) from a scan of the jobs folder and an lstat
        of each job's two files. A job whose folder (or a folder above it) is a link, is not a
        folder, or whose record is not a plain file maps to `_UNUSUAL`: the caller examines it
        path by path."""
        jobs = self.rel("jobs")
        assert self.store.is_local, "object stores are listed by object_listing()"
        try:
            if self.store.is_link(jobs):
                raise StoreError("the jobs folder is reached through a link")
            scan = list(os.scandir(self.store.path(jobs)))
        except (StoreError, NotADirectoryError):  # every job path by path, as each may lead through the link
            with contextlib.suppress(StoreError):
                return {name: _UNUSUAL for name in self.job_ids()}, _UNUSUAL
            return {}, _UNUSUAL
        except FileNotFoundError:
            return {}, _NO_FOLDER
        entries: dict[str, frozenset[str] | object] = {}
        for entry in scan:
            if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                entries[entry.name] = _UNUSUAL
                continue
            names = set()
            for name in (RECORD, FAILED):
                try:
                    mode = os.lstat(os.path.join(entry.path, name)).st_mode
                except FileNotFoundError:
                    continue
                if name == RECORD and not stat.S_ISREG(mode):
                    names = None
                    break
                names.add(name)
            entries[entry.name] = _UNUSUAL if names is None else frozenset(names)
        return entries, _NO_FOLDER


def _free_for(worker: str) -> Callable[[Claim | None], bool]:
    """Whether a job with this claim (None: none) may be claimed by `worker`: unless another
    worker's claim on it is live."""
    return lambda current: current is None or current.worker == worker or not current.is_live(time.time())


def _held_by(token: str) -> Callable[[Claim | None], bool]:
    """Whether this claim is still the one with `token` (not expired and taken over)."""
    return lambda current: current is not None and current.token == token


CLAIM_FIELDS = ("job_id", "worker", "token", "expires", "lease_s")  # what a claim object holds (not the ETag)


def _claim_bytes(claim: Claim) -> bytes:
    return (json.dumps({name: getattr(claim, name) for name in CLAIM_FIELDS}, indent=2, sort_keys=True) + "\n").encode()


def _parse_claim(data: bytes, job_id: str) -> Claim | None:
    """The claim in `data` if it is a well-formed claim of `job_id`, else None."""
    try:
        value = json.loads(data)
        claim = Claim(**{name: value[name] for name in CLAIM_FIELDS if name in value})
        if set(value) - set(CLAIM_FIELDS):
            return None  # not a claim this store wrote
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError, RecursionError):
        return None
    numbers_ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
                     for v in (claim.expires, claim.lease_s))
    if claim.job_id != job_id or not isinstance(claim.token, str) or not numbers_ok:
        return None
    return claim


def _identity_mismatch(value: dict, job_id: str, population: str) -> str:
    """'' if `value` names `job_id` (and `population`, when it names one); else whose it is."""
    named_job, named_population = value.get("job_id"), value.get("population", population)
    if named_job == job_id and named_population == population:
        return ""
    return f"job {str(named_job)[:40]!r} of population {str(named_population)[:60]!r}, not of {job_id} in {population!r}"


def _canonical_json(value: Any) -> str:
    """The job id's hash input (as `pipeline.jobs.canonical_json` writes it)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _legacy_value(store: Store, rel: str, keys: frozenset[str]) -> dict | None:
    """The JSON object at `rel` if it is an unsealed file with exactly `keys`, else None."""
    try:
        value = json.loads(store.read_bytes(rel, max_bytes=MAX_BOOKKEEPING_BYTES))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):  # StoreError is a ValueError
        return None
    return value if isinstance(value, dict) and set(value) == keys else None


def _is_legacy(store: Store, rel: str, keys: frozenset[str]) -> bool:
    return _legacy_value(store, rel, keys) is not None


def _safe_has_record(population: PopulationStore, job_id: str) -> bool:
    try:
        return not population.store.is_link(population.job_rel(job_id)) and population._has_record_file(job_id)
    except StoreError:
        return False


def _is_score_file(name: str) -> bool:
    folder, _, file = name.partition("/")
    return folder == SCORES and file.endswith(".json") and "/" not in file

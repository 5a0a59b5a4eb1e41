"""Conditional writes on S3: create an object only if it is absent, replace it only if unchanged.

What makes job claims hold on an object store, where nothing can be locked: a claim is taken
with `PutObject` + `If-None-Match: *` (the store refuses it if any claim exists) and renewed,
released or taken over with `PutObject` + `If-Match: <ETag>` (refused if the claim changed since
it was read). Of two workers racing for one job, the store lets exactly one write through.

A store that ignored these headers would let both through, silently; so each `Store` checks its
object store once with a probe (`S3ConditionalWrites.probe`) before its first claim and refuses
to claim (`ConditionalWritesUnsupported`) where the probe fails. AWS S3 and MinIO implement
conditional PutObject; other fsspec object stores (gcs://, az://…) have no claims here yet.

Imports the standard library and fsspec; s3fs (the `s3` extra) is the store's own filesystem.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from typing import Any

from fsspec.asyn import sync

from storage.paths import StoreError

LOST = (409, 412)  # 412 PreconditionFailed; 409 ConditionalRequestConflict (a racing conditional write)
STALE_ETAG = '"0123456789abcdef0123456789abcdef"'  # the ETag of no object the probe wrote
UNSUPPORTED = (400, 501)  # the store rejects the condition headers (InvalidArgument, NotImplemented)


class ConditionalWritesUnsupported(StoreError):
    """The store cannot create-if-absent and replace-if-unchanged, so claims would not hold on it."""


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the ETag of exactly those bytes (read in one GET)."""

    data: bytes
    etag: str


class S3ConditionalWrites:
    """Create-if-absent and replace-if-unchanged of small objects, over an s3fs filesystem's client.

    `create` and `replace` return the new ETag, or None where the store refused the write
    because of its condition (another writer got there first); other errors raise OSError.
    Paths are the filesystem's (`bucket/key`).
    """

    def __init__(self, fs: Any):
        self.fs = fs

    def read(self, path: str) -> Versioned | None:
        """The object's bytes and ETag, or None if there is none."""
        return sync(self.fs.loop, self._read, path)

    def create(self, path: str, data: bytes) -> str | None:
        """Write `data` only if no object is at `path`: the new ETag, or None if one is."""
        return self._put(path, data, IfNoneMatch="*")

    def replace(self, path: str, data: bytes, etag: str) -> str | None:
        """Write `data` only if the object is still the one with `etag`: the new ETag, or None if
        it changed or is gone."""
        return self._put(path, data, IfMatch=etag)

    def probe(self, folder: str) -> None:
        """Check that the store honours both conditions, on a scratch object in `folder` (removed
        after); ConditionalWritesUnsupported naming what it got wrong."""
        path = f"{folder.rstrip('/')}/.conditional-writes-probe-{uuid.uuid4().hex}"
        try:
            problem = self._probe(path)
        except OSError as exc:
            if _status(exc) not in UNSUPPORTED:
                raise  # unreachable, denied…: said as it is, not as missing support
            problem = f"it rejected a conditional PutObject ({exc})"
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)
        if problem:
            raise ConditionalWritesUnsupported(
                f"the object store at s3://{folder} does not honour conditional writes: {problem}. "
                "Claims on an object store need PutObject with If-None-Match: * and If-Match: <ETag> (AWS S3 and "
                "MinIO have both; an old botocore drops them unsent: pip install -U s3fs); without them two "
                "workers could train one job, so no job is claimed here — use a store that has them, or a local "
                "(shared) disk")

    def _probe(self, path: str) -> str:
        """'' if the store honours both conditions on `path` (absent before), else what it got wrong."""
        first = self.create(path, b"1")
        if first is None:
            return "it refused to create a new object (If-None-Match: *)"
        if self.create(path, b"2") is not None:
            return "it let a second create-if-absent through (If-None-Match: *)"
        if self.replace(path, b"3", STALE_ETAG) is not None:
            return "it let a replace with a stale ETag through (If-Match)"
        if self.replace(path, b"4", first) is None:
            return "it refused a replace with the current ETag (If-Match)"
        if getattr(self.read(path), "data", None) != b"4":
            return "a conditional replace did not store its bytes"
        return ""

    def _put(self, path: str, data: bytes, **condition: str) -> str | None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            answer = sync(self.fs.loop, self.fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except OSError as exc:
            if _status(exc) in LOST or ("IfMatch" in condition and isinstance(exc, FileNotFoundError)):
                return None
            raise
        finally:
            self.fs.invalidate_cache(path)
        return answer["ETag"]

    async def _read(self, path: str) -> Versioned | None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            answer = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        try:
            return Versioned(await answer["Body"].read(), answer["ETag"])
        finally:
            answer["Body"].close()


def object_claims(fs: Any) -> S3ConditionalWrites:
    """The conditional writes claims use on the object store `fs` (not yet probed);
    ConditionalWritesUnsupported for a store other than S3."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "s3" in protocols and hasattr(fs, "_call_s3"):
        return S3ConditionalWrites(fs)
    raise ConditionalWritesUnsupported(
        f"claims on a {protocols[0]}:// store are not supported: claims need a local (shared) disk, memory:// "
        "(one process) or an S3 store with conditional writes (AWS S3, MinIO); without them two workers could "
        "train one job")


def _status(exc: BaseException) -> int | None:
    """The HTTP status of the S3 answer behind `exc` (s3fs keeps botocore's error as the cause)."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        seen = seen.__cause__
    return None

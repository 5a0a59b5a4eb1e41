"""The store: where populations, base models and published datasets live.

One `Store` over a local directory or any fsspec URL (`memory://`, `s3://bucket/prefix`).
Layout (DESIGN §4)::

    {root}/FORMAT.json                              # {"store_format": 1} (stores before it: LAYOUT.json)
    {root}/populations/{population}/manifest.yaml
    {root}/populations/{population}/jobs/{job_id}/spec.json
    {root}/populations/{population}/jobs/{job_id}/adapter/...
    {root}/populations/{population}/jobs/{job_id}/record.json     # written last
    {root}/populations/{population}/jobs/{job_id}/failed.json
    {root}/populations/{population}/jobs/{job_id}/scores/{scorer_id}.json
    {root}/populations/{population}/claims/{job_id}
    {root}/bases/…   {root}/published/{population}/…

Every write is atomic: a temporary name then a rename on local disks, one put on object
stores. A LoRA exists iff its `record.json` exists and the checksums in it verify.

Every path goes through `path(rel)`, which keeps it inside the store: `rel` may not be
absolute or hold a `..` component, and on local disks the resolved path (symlinks followed)
must lie under the resolved root, so a symlink planted in the store cannot lead a read
outside it. Writes and deletes are stricter (`write_path`): on local disks no folder between
the root and the target may be a symbolic link at all, so a link planted in the store — even
one that points inside it — is never followed by a write, a rename, a lock or a delete; a
target that is itself a link is replaced or unlinked, never written through. Imports only the
standard library and fsspec.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.conditional import S3ConditionalWrites, object_claims
from storage.listing import is_folder_marker, list_objects
from storage.locks import file_lock
from storage.paths import TMP_MARK, StoreError, check_name, check_rel, sha256_bytes
from storage.population import PopulationStore

__all__ = ["DEFAULT_STORE", "STORE_FORMAT", "STORE_FORMAT_FILE", "Store", "StoreError", "TMP_MARK", "check_name",
           "check_rel", "resolve_store_url", "sha256_bytes"]

if TYPE_CHECKING:
    from storage.population import PopulationStore

STORE_FORMAT = 1  # the version of this file layout; a store written by a later one is refused
STORE_FORMAT_FILE = "FORMAT.json"
LEGACY_FORMAT_FILE, LEGACY_FORMAT_KEY = "LAYOUT.json", "layout_version"  # what stores written before FORMAT.json hold
DEFAULT_STORE = "./lol-store"
COPY_BLOCK_BYTES = 1 << 20  # `upload_file` reads a local file this much at a time
UPLOAD_PART_BYTES = 8 << 20  # S3: a file of two parts or more is uploaded in parts of this size (S3's least is 5 MiB)
UPLOAD_PARTS_AT_ONCE = 2  # S3: parts of one upload in flight (held in memory) at once
def resolve_store_url(url: str | None = None) -> str:
    """`--store URL`, else `$LOL_STORE`, else `./lol-store`."""
    return url or os.environ.get("LOL_STORE") or DEFAULT_STORE




@contextlib.contextmanager
def _replacing(target: str) -> Iterator[Any]:
    """A binary handle whose content replaces local file `target` atomically when the block ends:
    written to a temporary name beside it, fsynced, renamed; removed if the block fails."""
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f"{os.path.basename(target)}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

class Store:
    """A store rooted at a local path or fsspec URL."""

    def __init__(self, url: str | None = None, create: bool = True):
        self.url = resolve_store_url(url)
        self.fs, self.root = _filesystem(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._real_root = os.path.realpath(self.root) if self.is_local else None
        self._conditional: S3ConditionalWrites | None = None  # probed on first use (claims)
        self._check_format(create)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ------------------------------------------------------------ format

    def _check_format(self, create: bool) -> None:
        """Refuse a store written by a later store format; write FORMAT.json into a new store."""
        try:
            for name, key in ((STORE_FORMAT_FILE, "store_format"), (LEGACY_FORMAT_FILE, LEGACY_FORMAT_KEY)):
                path = self.path(name)
                if not self.fs.exists(path):
                    continue
                try:
                    version = int(json.loads(self.fs.cat_file(path)).get(key, 0))
                except (AttributeError, TypeError, RecursionError, UnicodeDecodeError):
                    raise StoreError(f"store {self.url}: {name} is not a store format file "
                                     f'(expected {{"{key}": {STORE_FORMAT}}})') from None
                if version > STORE_FORMAT:
                    raise StoreError(
                        f"store {self.url} was written with store format {version}, but this lol-pipeline "
                        f"reads formats ≤ {STORE_FORMAT}; upgrade lol-pipeline, or use another --store"
                    )
                return
            if create:
                self.fs.makedirs(self.root, exist_ok=True)
                self.write_json(STORE_FORMAT_FILE, {"store_format": STORE_FORMAT})
        except StoreError:
            raise
        except (OSError, ValueError) as exc:
            raise StoreError(f"store {self.url} is not reachable or not writable: {exc}") from None

    # ------------------------------------------------------------ primitives

    def path(self, *parts: str) -> str:
        """The full path of `parts` (joined with '/'), refused if it would leave the store."""
        if not parts:
            return self.root
        full = "/".join([self.root.rstrip("/"), *(check_rel(p) for p in parts)])
        if self.is_local:
            real = os.path.realpath(full)
            if real != self._real_root and not real.startswith(self._real_root.rstrip(os.sep) + os.sep):
                raise StoreError(f"{'/'.join(parts)!r} resolves to {real}, outside the store {self._real_root} "
                                 "(a symlink leaves the store); remove the link or use another --store")
        return full

    def write_path(self, rel: str) -> str:
        """The full path of `rel` for a write, rename, lock or delete: `path(rel)`'s checks, and on
        local disks no folder from the root down to `rel`'s parent may be a symbolic link (the
        target itself may be one: it is then replaced or unlinked, never written through)."""
        full = "/".join([self.root.rstrip("/"), check_rel(rel)])
        if self.is_local:
            parts = [p for p in rel.split("/") if p not in ("", ".")]
            current = self.root.rstrip("/") or "/"
            for index, part in enumerate(parts[:-1]):
                current = os.path.join(current, part)
                if os.path.islink(current):
                    target = os.path.realpath(current)
                    inside = target == self._real_root or target.startswith(self._real_root.rstrip(os.sep) + os.sep)
                    where = "inside the store" if inside else f"to {target}, outside the store {self._real_root}"
                    raise StoreError(f"{'/'.join(parts[:index + 1])!r} is a symbolic link {where}; the store never "
                                     f"writes or deletes through links, so {rel!r} was not touched — remove the link "
                                     "(`lol verify` lists such damage)")
            parent = os.path.realpath(os.path.dirname(full))
            if parent != self._real_root and not parent.startswith(self._real_root.rstrip(os.sep) + os.sep):
                raise StoreError(f"{rel!r} resolves to {parent}, outside the store {self._real_root}")
        return full

    def is_link(self, rel: str) -> bool:
        """Whether `rel` or a folder above it (below the root) is a symbolic link; False on object stores."""
        if not self.is_local:
            return False
        current = self.root.rstrip("/") or "/"
        for part in check_rel(rel).split("/"):
            if part in ("", "."):
                continue
            current = os.path.join(current, part)
            if os.path.islink(current):
                return True
        return False

    def links_under(self, rel: str) -> list[str]:
        """Symbolic links at or below `rel` (paths relative to `rel`, '' for `rel` itself); [] on object stores."""
        if not self.is_local:
            return []
        base = "/".join([self.root.rstrip("/"), check_rel(rel)])
        if os.path.islink(base):
            return [""]
        found = []
        for folder, dirs, files in os.walk(base, followlinks=False):
            for name in dirs + files:
                full = os.path.join(folder, name)
                if os.path.islink(full):
                    found.append(os.path.relpath(full, base).replace(os.sep, "/"))
        return sorted(found)

    @contextlib.contextmanager
    def lock(self, rel: str) -> Iterator[None]:
        """An exclusive `flock` on the local file `rel` (created if missing, never through a link)."""
        assert self.is_local, "lock() needs a local store"
        path = self.write_path(rel)
        if os.path.islink(path):
            raise StoreError(f"lock file {rel!r} is a symbolic link; the store never opens a lock through a link — remove it")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            lock = file_lock(path)  # O_NOFOLLOW: a link planted after the check is refused, not followed
            lock.__enter__()
        except (IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
            raise StoreError(f"lock file {rel!r} cannot be opened ({exc.strerror}); remove what stands there") from None
        try:
            yield
        finally:
            lock.__exit__(None, None, None)

    @property
    def is_s3(self) -> bool:
        """An S3 store (s3fs)."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        return "s3" in protocols and hasattr(self.fs, "_call_s3")

    @property
    def is_memory(self) -> bool:
        """A `memory://` store: one process's, so a process lock serialises its claims."""
        return "memory" in (self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,))

    def conditional_writes(self, probe_folder: str) -> S3ConditionalWrites:
        """Create-if-absent and replace-if-unchanged on this object store (what claims need where
        nothing can be locked), checked once by a probe in `probe_folder`;
        `ConditionalWritesUnsupported` (a StoreError) where the store lacks them."""
        if self._conditional is None:
            writes = object_claims(self.fs)
            writes.probe(self.path(probe_folder))
            self._conditional = writes
        return self._conditional

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def size(self, rel: str) -> int:
        """Size in bytes (no download on object stores); FileNotFoundError if absent."""
        return int(self.fs.size(self.path(rel)))

    def read_bytes(self, rel: str, max_bytes: int | None = None) -> bytes:
        """The file's bytes. On local disks only a regular file is read (a FIFO or device would
        block or never end: IsADirectoryError for a folder, StoreError otherwise), and with
        `max_bytes` a larger file is refused (StoreError) before any of it is read. On S3 a read
        with `max_bytes` is one ranged GET of at most `max_bytes` + 1 bytes, a larger file refused
        (without it, s3fs asks for the size first: a HEAD, then the GET)."""
        path = self.path(rel)
        if self.is_local:
            info = os.stat(path)  # FileNotFoundError when absent
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(f"{rel!r} is a folder, not a file")
            if not stat.S_ISREG(info.st_mode):
                raise StoreError(f"{rel!r} is not a regular file (a FIFO, socket or device); remove it")
            if max_bytes is not None and info.st_size > max_bytes:
                raise StoreError(f"{rel!r} holds {info.st_size} bytes, more than the {max_bytes} expected")
            with open(path, "rb") as handle:
                return handle.read()
        if max_bytes is not None and self.is_s3:
            try:
                data = self.fs.cat_file(path, start=0, end=max_bytes + 1)
            except FileNotFoundError:
                raise
            except OSError:  # e.g. S3's answer to a range of an empty object: read it whole
                data = None
            if data is not None:
                if len(data) > max_bytes:
                    raise StoreError(f"{rel!r} holds more than the {max_bytes} bytes expected")
                return data
        return self.fs.cat_file(path)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write atomically: readers see the old content or the new, never a prefix."""
        target = self.write_path(rel)
        if self.is_local:
            with _replacing(target) as handle:
                handle.write(data)
        else:
            self.fs.pipe_file(target, data)  # one PUT: an object is whole or absent

    def write_json(self, rel: str, value: Any) -> None:
        self.write_bytes(rel, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def upload_file(self, local_path: str | Path, rel: str) -> str:
        """Copy a local file into the store atomically, a block at a time (never the whole file in
        memory); returns its sha256.

        Local disks: copied to a temporary name, fsynced, renamed. S3: one PUT for a file under two
        parts, else a multipart upload of UPLOAD_PART_BYTES parts, UPLOAD_PARTS_AT_ONCE in flight
        (the object appears whole when the upload completes; a failed one is aborted). Other object
        stores: fsspec's `put_file` (written in blocks, committed when closed).
        """
        local_path = Path(local_path)
        target = self.write_path(rel)
        digest = hashlib.sha256()
        if not self.is_local:
            with open(local_path, "rb") as source:
                for block in iter(lambda: source.read(COPY_BLOCK_BYTES), b""):
                    digest.update(block)
            parts = {"chunksize": UPLOAD_PART_BYTES, "max_concurrency": UPLOAD_PARTS_AT_ONCE} if self.is_s3 else {}
            self.fs.put_file(str(local_path), target, **parts)
            return digest.hexdigest()
        with open(local_path, "rb") as source, _replacing(target) as handle:
            for block in iter(lambda: source.read(COPY_BLOCK_BYTES), b""):
                digest.update(block)
                handle.write(block)
        return digest.hexdigest()

    def download_dir(self, rel: str, local_dir: str | Path) -> Path:
        """Copy a store folder to a local folder (a no-op copy for local stores is still a copy)."""
        local_dir = Path(local_dir)
        for path in self.list_files(rel):
            target = local_dir / check_rel(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(f"{rel}/{path}"))
        return local_dir

    def delete(self, rel: str) -> None:
        """Remove a file or folder; a symbolic link is unlinked, never followed (nor are links inside a folder)."""
        path = self.write_path(rel)
        if self.is_local:
            if os.path.islink(path) or os.path.isfile(path):
                os.unlink(path)
            elif os.path.isdir(path):
                shutil.rmtree(path)  # does not follow the links it finds inside
            return
        if not self.fs.exists(path):
            return
        folders = []
        if self.is_s3:  # SeaweedFS keeps emptied folders (listed under their parents) until their markers are deleted
            found = self.fs.find(path, withdirs=True, detail=True)
            folders = [p for p, info in found.items() if info.get("type") == "directory"]
            if self.fs._strip_protocol(path).rstrip("/") not in found:  # `path` is a folder, not one file
                folders.append(path)
        self.fs.rm(path, recursive=True)
        if self.is_s3:
            for folder in sorted(set(folders), key=lambda p: -p.count("/")):  # the deepest first
                bucket, key, _ = self.fs.split_path(folder)
                if key.strip("/"):
                    self.fs.call_s3("delete_object", Bucket=bucket, Key=f"{key.strip('/')}/")  # absent: S3 answers 204

    def list_dir(self, rel: str) -> list[str]:
        """Names directly under `rel` (files and folders), sorted; [] if it does not exist."""
        path = self.path(rel)
        if not self.fs.exists(path):
            return []
        itself = self.fs._strip_protocol(path).rstrip("/")
        entries = [self.fs._strip_protocol(entry).rstrip("/") for entry in self.fs.ls(path, detail=False)]
        # An object store may list a folder's own marker ("rel/") under it: SeaweedFS does for an emptied folder.
        names = [entry.rsplit("/", 1)[-1] for entry in entries if entry != itself]
        return sorted(n for n in names if n)

    def list_files(self, rel: str) -> list[str]:
        """Every file under `rel`, as paths relative to it, sorted; symlinked folders are not entered."""
        base = self.path(rel).rstrip("/")
        if not self.fs.exists(base):
            return []
        if self.is_local:
            found_local = []
            for folder, _, files in os.walk(base, followlinks=False):
                found_local += [os.path.relpath(os.path.join(folder, f), base).replace(os.sep, "/") for f in files]
            return sorted(found_local)
        found = self.fs.find(base, detail=True)
        prefix_len = len(self.fs._strip_protocol(base).rstrip("/")) + 1
        return sorted(self.fs._strip_protocol(f)[prefix_len:] for f, info in found.items()
                      if info.get("type") != "directory" and len(self.fs._strip_protocol(f)) >= prefix_len
                      and not is_folder_marker(str(info.get("Key", f)), int(info.get("size") or 0)))

    def list_trees(self, *rels: str) -> list[dict[str, int]]:
        """For each folder `rel` of an object store, {path below it: size} of every object under it,
        all folders listed at once in concurrent listings (storage/listing.py); {} where there is none."""
        assert not self.is_local, "list_trees() lists object stores (local folders are scanned where they are read)"
        return list_objects(self.fs, [self.path(rel).rstrip("/") for rel in rels])

    def local_write_dir(self, rel: str) -> Path:
        """The on-disk folder `rel` for a caller that writes files into it (only local stores):
        neither it nor a folder above it may be a link (see `write_path`)."""
        assert self.is_local, "local_write_dir() needs a local store"
        folder = Path(os.path.dirname(self.write_path(f"{check_rel(rel)}/_")))
        links = self.links_under(rel)
        if links:  # the caller writes with plain file calls: no link may stand anywhere below
            raise StoreError(f"{rel}/{links[0]} is a symbolic link inside the store; the store never writes through "
                             "links — remove it")
        return folder

    def local_path(self, rel: str) -> Path:
        """The on-disk path of `rel`; only for local stores."""
        assert self.is_local, "local_path() needs a local store"
        return Path(self.path(rel))

    # ------------------------------------------------------------ areas

    def population(self, name: str) -> PopulationStore:
        return PopulationStore(self, check_name(name, "population name"))

    def list_populations(self) -> list[str]:
        return self.list_dir("populations")


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except ImportError as exc:
        protocol = url.split("://", 1)[0]
        extra = " (pip install 'lol-pipeline[s3]')" if protocol in ("s3", "s3a") else ""
        raise StoreError(f"store URL {url!r} needs a filesystem package that is not installed{extra}: {exc}") from None
    except ValueError as exc:
        known = ", ".join(sorted(p for p in fsspec.available_protocols() if p in ("file", "memory", "s3", "gcs", "az", "abfs")))
        raise StoreError(f"store URL {url!r} is not usable: {exc}; use a local path or a URL with one of: {known}") from None
    if fs.protocol in ("http", "https") or "http" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        raise StoreError(f"store URL {url!r} is read-only (http); use a local path or an object store URL such as s3://bucket/prefix")
    return fs, root

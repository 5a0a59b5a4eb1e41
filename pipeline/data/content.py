"""What identifies a dataset's content independent of where and when it was copied.

`datasets`' own `_fingerprint` hashes file paths and modification times, so a copy of the same
folder on another worker (or a `touch`) gets another one. These identify the bytes instead:

- a `folder:` dataset: sha256 over every data file below the folder (relative path and the
  file's own sha256), in sorted order — the same on every machine that holds the same files (files
  `datasets` would not read, such as notes.txt or Thumbs.db, are left out);
- an `hf:` dataset: the commit its revision resolved to in the local hub cache (a commit pins
  the repo's content), where the cache records one.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

CHUNK = 1 << 20
DATA_EXTENSIONS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}  # -> builder
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=16)
def _folder_sha256(root: str, sizes_and_times: tuple) -> str:
    digest = hashlib.sha256()
    for rel, _, _ in sizes_and_times:
        digest.update(f"{rel}\x1f{_file_sha256(Path(root) / rel)}\n".encode())
    return digest.hexdigest()


def is_data_file(path: Path) -> bool:
    """Whether `datasets` may read the file as data: parquet / arrow / JSON / CSV, an image, a README
    (it declares the configs). Stray files (notes.txt, Thumbs.db) are not the data."""
    suffix = path.suffix.lower()
    return suffix in DATA_EXTENSIONS or suffix in IMAGE_EXTENSIONS or path.name == "README.md"


def folder_sha256(root: Path) -> str:
    """sha256 of the folder's data files (`is_data_file`; hidden files and folders, e.g. `.cache`, left
    out); computed once per process for the same listing, sizes and modification times."""
    root = root.expanduser().resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_data_file(p)
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    listing = tuple((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _folder_sha256(str(root), listing)


def hub_commit(repo_id: str, revision: str | None, cache_dir: str) -> str | None:
    """The commit `revision` (default `main`) of dataset `repo_id` resolved to in the hub cache at
    `cache_dir`, or None where the cache does not say."""
    revision = revision or "main"
    if COMMIT.match(revision):
        return revision
    ref = Path(cache_dir) / f"datasets--{repo_id.replace('/', '--')}" / "refs" / revision
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if COMMIT.match(commit) else None


__all__ = ["DATA_EXTENSIONS", "IMAGE_EXTENSIONS", "folder_sha256", "hub_commit", "is_data_file"]

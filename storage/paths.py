"""The store's vocabulary, below `store` and `population`: its error, safe names and paths,
checksums, and the mark of temporary files. Imports only the standard library."""

from __future__ import annotations

import hashlib
import re

from storage.errors import DomainError

TMP_MARK = ".tmp-"  # in the name of a file being written (renamed into place when complete)
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class StoreError(DomainError):
    """The store cannot be used as asked: unreachable, newer layout, unsafe name…"""


def check_name(name: str, what: str) -> str:
    """A path component we create: no separators, no `..`, no leading dot."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise StoreError(f"{what} {name!r} is not a safe name: use letters, digits, '.', '_' and '-' (not starting with '.' and without '..')")
    return name


def check_rel(rel: str) -> str:
    """A path relative to the store root: not absolute, no `..` component, no NUL byte."""
    if not isinstance(rel, str) or rel.startswith(("/", "~")) or "\x00" in rel or ".." in rel.split("/"):
        raise StoreError(f"path {rel!r} would leave the store: store paths are relative, without '..'")
    return rel


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

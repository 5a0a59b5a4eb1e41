"""An exclusive advisory lock on a local file (`flock`), for processes sharing one disk.

Not `filelock.FileLock`: it opens the lock file without `O_NOFOLLOW`, so a link planted at the
lock's path would make every locker create or truncate the file the link points to, outside the
store (docs/reliability.md, containment). storage/ imports only the standard library and fsspec.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold `flock(LOCK_EX)` on `path` (created if missing) for the body; released however it ends."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)  # never through a planted link
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

"""Where a worker stages a job's files before committing them to the store.

One folder per worker process, so that what a killed worker left can be found and removed::

    {tempdir}/lol-staging/{host}-{pid}/lol-job-{job_id}-xxxxxxxx/adapter/…

A job's folder is a `TemporaryDirectory`, removed when the job ends — but not when its process
is SIGKILLed. `sweep()` (run at the start of every finetuning run) removes the folders of
processes of this host that are no longer alive; folders of other hosts are never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT_NAME = "lol-staging"


def staging_root() -> Path:
    return Path(tempfile.gettempdir()) / ROOT_NAME


def worker_dir() -> Path:
    """This process's staging folder (created on first use)."""
    folder = staging_root() / f"{socket.gethostname()}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def job_dir(job_id: str) -> Iterator[Path]:
    """A fresh folder for one attempt at `job_id`, removed when the context exits (with this
    process's staging folder, once it holds no other job's)."""
    parent = worker_dir()
    with tempfile.TemporaryDirectory(prefix=f"lol-job-{job_id}-", dir=parent) as folder:
        yield Path(folder)
    with contextlib.suppress(OSError):  # not empty: another job of this process is staged there
        parent.rmdir()


def sweep() -> list[Path]:
    """Remove the staging folders of dead processes of this host; returns what was removed."""
    removed = dead_worker_folders()
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def dead_worker_folders(root: Path | None = None) -> list[Path]:
    """Staging folders (under `root`, default `staging_root()`) of this host's processes that are no longer alive."""
    root, host = root or staging_root(), socket.gethostname()
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        owner, _, pid = folder.name.rpartition("-")
        if owner == host and pid.isdigit() and not _alive(int(pid)):
            found.append(folder)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True

"""Where a process stages files on local disk: a job's files before they are committed to the store,
a dataset before `lol publish` installs it, a stored adapter a scorer reads from an object store.

One folder per process, so that what a killed process left can be found and removed::

    {tempdir}/lol-staging/{host}-{pid}/lol-job-{job_id}-xxxxxxxx/adapter/…
    {tempdir}/lol-staging/{host}-{pid}/lol-publish-xxxxxxxx/folder/…

Each folder is a `TemporaryDirectory`, removed when its work ends — but not when its process
is SIGKILLed. `sweep()` (run at the start of every finetuning, scoring and publishing run) removes
the folders of processes of this host that are no longer alive; other hosts' are never touched.
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


def job_dir(job_id: str) -> contextlib.AbstractContextManager[Path]:
    """A fresh folder for one attempt at `job_id` (`scratch_dir`)."""
    return scratch_dir(f"lol-job-{job_id}-")


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A fresh folder named `prefix`…, in this process's staging folder, removed when the context exits
    (with the process's folder, once it holds nothing else)."""
    parent = worker_dir()
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as folder:
        yield Path(folder)
    with contextlib.suppress(OSError):  # not empty: other work of this process is staged there
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

"""A disk that fills up: a size-limited tmpfs where this process may mount one, else a quota.

`SmallDisk(folder, size)` mounts a tmpfs of `size` bytes on `folder` (root on Linux; the real
kernel error, ENOSPC, from every write past it), or — where mounting is refused — leaves the
folder as it is and gives the workers a `QuotaStore` fault that fails writes past `size` bytes
the same way. `grow(size)` makes room (a remount keeps the files), which is how a scenario
"removes the fault" before its rerun; leaving the context unmounts the tmpfs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any


class SmallDisk:
    """`size`: the tmpfs's bytes (it charges whole pages); `quota`: the bytes of file content the
    quota fallback allows (default `size`)."""

    def __init__(self, folder: str | Path, size: int, quota: int | None = None, mount: bool = True):
        self.folder, self.size, self.quota, self.mount = Path(folder), int(size), int(quota or size), mount
        self.kind = "none"  # "tmpfs" or "quota" once entered

    def __enter__(self) -> SmallDisk:
        self.folder.mkdir(parents=True, exist_ok=True)
        mounted = self.mount and _mount(["-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.folder)])
        self.kind = "tmpfs" if mounted else "quota"
        return self

    @property
    def store_fault(self) -> dict[str, Any] | None:
        """The store fault workers need for this disk: none on a tmpfs (the kernel enforces its size)."""
        return {"kind": "quota", "bytes": self.quota} if self.kind == "quota" else None

    def grow(self, size: int) -> None:
        """Make the disk hold `size` bytes, keeping its files."""
        self.size = self.quota = int(size)
        if self.kind == "tmpfs" and not _mount(["-o", f"remount,size={self.size}", str(self.folder)]):
            raise OSError(f"could not grow the tmpfs on {self.folder} to {self.size} bytes")

    def __exit__(self, *exc) -> None:
        if self.kind == "tmpfs" and subprocess.run(["umount", str(self.folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)  # busy: detach now, free later


def _mount(args: list[str]) -> bool:
    """Whether `mount ARGS` succeeded (False when not permitted or mount is missing)."""
    try:
        return subprocess.run(["mount", *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False

"""What every trainer, scorer and record asks of the running environment, answered once:
the versions of the libraries that shaped a result, and the device to compute on."""

from __future__ import annotations

import contextlib
import importlib.metadata
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def versions(*packages: str) -> dict[str, str]:
    """{package: installed version} in the order given; "absent" for one that is not installed."""
    found = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def compute_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else CUDA where available, else the CPU."""
    import torch

    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within: SIGTERM → SystemExit(143) in this (main) thread, so `finally` blocks and exit handlers run; the previous
    handler is restored after. For `lol run`: Prefect stops its temporary API server in an exit handler (with the
    default action the process died at once and left that server running, holding the command's stdout open); inside
    a flow Prefect's own handler comes first (the flow ends as Crashed, its worker processes are terminated), then
    re-sends the signal here. For `lol train` and the experiments: `lol_models.parallel.run_units` terminates its
    worker processes (they went on training, orphaned). Outside the main thread signals cannot be set: no change."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

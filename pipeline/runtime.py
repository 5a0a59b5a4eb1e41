"""What every trainer, scorer and record asks of the running environment, answered once:
the versions of the libraries that shaped a result, and the device to compute on."""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING

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

"""Base models: the built-in `tiny:` world, built and cached by recipe, and HF references.

A tiny base is a plugin module (`TinyBase`) registered under the `lol.tiny_bases` entry points;
this installation's own are the builders of the `tinyworld` package. The library reads only a
base's recipe (to find its shipped or cached build, `pipeline.bases.cache`) and calls `build`
on a cache miss; loading goes through `from_pretrained`, as for an HF id.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from storage.errors import DomainError

ENTRY_POINT_GROUP = "lol.tiny_bases"


class BaseModelError(DomainError):
    """A base that cannot be resolved or used as the manifest asks: unknown name, not built, wrong
    kind, not loadable, no such LoRA target modules, a scheduler the trainer does not support."""


class TinyBase(Protocol):
    """What a `tiny:` base module declares (see tinyworld/ for the built-in ones)."""

    NAME: str
    KIND: str  # "diffusion" | "causal_lm" | "clip"
    SIZES: tuple[str, ...]

    def recipe_config(self, size: str) -> dict[str, Any]: ...

    def data_fingerprint(self) -> str: ...

    def build(self, config: dict[str, Any], out_dir: Path, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]: ...


def tiny_modules() -> dict[str, str]:
    """{name: module path} of every registered tiny base."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def tiny_module(name: str) -> ModuleType:
    """The module of `tiny:NAME` (name with or without the `tiny:` prefix)."""
    name = name.removeprefix("tiny:")
    registered = tiny_modules()
    if name not in registered:
        known = ", ".join(f"tiny:{n}" for n in registered) or "none (is lol-pipeline installed? `make install`)"
        raise BaseModelError(f"unknown built-in base 'tiny:{name}'; known: {known}")
    try:
        return importlib.import_module(registered[name])
    except ModuleNotFoundError as exc:
        if exc.name == registered[name] or registered[name].startswith(f"{exc.name}."):
            raise BaseModelError(f"the builder of 'tiny:{name}' ({registered[name]}) is missing from this installation; "
                                 "reinstall lol-pipeline (`make install`)") from None
        raise


__all__ = ["BaseModelError", "ENTRY_POINT_GROUP", "TinyBase", "tiny_module", "tiny_modules"]

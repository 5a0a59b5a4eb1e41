"""Base models: the built-in `tiny:` world, built and cached by recipe, and HF references.

Each tiny base is a module with `NAME`, `KIND`, `SIZES`, `recipe_config(size)`,
`data_fingerprint()`, `build(config, out_dir, progress)` and `load(path, …)`. The cache
(`pipeline.bases.cache`) keys a built base by the hash of its recipe.
"""

from __future__ import annotations

import importlib
from types import ModuleType

TINY_MODULES: dict[str, str] = {
    "shapes-sd": "pipeline.bases.shapes_sd",
    "shapes-sd-continued": "pipeline.bases.shapes_sd_continued",
    "shapes-clip": "pipeline.bases.shapes_clip",
    "qa-lm": "pipeline.bases.qa_lm",
}


class BaseModelError(ValueError):
    """A base that cannot be resolved: unknown name, not built, wrong kind."""


def tiny_module(name: str) -> ModuleType:
    """The builder module of `tiny:NAME` (name with or without the `tiny:` prefix)."""
    name = name.removeprefix("tiny:")
    if name not in TINY_MODULES:
        known = ", ".join(f"tiny:{n}" for n in TINY_MODULES)
        raise BaseModelError(f"unknown built-in base 'tiny:{name}'; known: {known}")
    try:
        return importlib.import_module(TINY_MODULES[name])
    except ModuleNotFoundError as exc:
        if exc.name == TINY_MODULES[name]:
            raise BaseModelError(f"the builder of 'tiny:{name}' ({TINY_MODULES[name]}) is missing from this installation; "
                                 "reinstall lol-pipeline (`make install`)") from None
        raise


__all__ = ["BaseModelError", "TINY_MODULES", "tiny_module"]

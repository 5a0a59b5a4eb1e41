"""Resolve a manifest's base reference to something `from_pretrained` loaders read.

`tiny:NAME` builds (once) and returns the cached folder; anything else (an HF id or a
local path) is returned as is, with its revision. Both then go through the same
`from_pretrained` call, so no model code branches on which kind of base it got.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage import Store


def resolve_base(base: dict[str, Any], store: Store) -> tuple[str, str | None]:
    """(path or HF id, revision) for `base` = {ref, revision, kind, size}."""
    ref = base["ref"]
    if ref.startswith("tiny:"):
        from pipeline.bases.cache import ensure_base

        return str(ensure_base(ref, store, size=base.get("size", "full")).path), None
    if Path(ref).exists():
        return ref, None
    return ref, base.get("revision")


def load_diffusion_pipeline(base: dict[str, Any], store: Store, dtype=None):
    """A `StableDiffusionPipeline` for `base`, from the tiny cache or by HF id."""
    import torch
    from diffusers import StableDiffusionPipeline

    path, revision = resolve_base(base, store)
    try:
        return StableDiffusionPipeline.from_pretrained(path, revision=revision, dtype=dtype or torch.float32,
                                                       safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"base {base['ref']!r} is not a StableDiffusionPipeline-compatible diffusion model: {exc}") from None

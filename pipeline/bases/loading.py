"""Resolve a manifest's base reference to something `from_pretrained` loaders read.

`tiny:NAME` builds (once) and returns the cached folder; anything else (an HF id or a
local path) is returned as is, with its revision. Both then go through the same
`from_pretrained` call, so no model code branches on which kind of base it got.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.bases import BaseModelError
from storage import Store


def resolve_base(base: dict[str, Any], store: Store) -> tuple[str, str | None]:
    """(path or HF id, revision) for `base` = {ref, revision, kind, size}.

    An HF id while the hub is off or unreachable resolves to its cached snapshot folder, or raises
    ArtefactUnavailableError (one line: what is missing, HF_HOME, the `hf download` command); a
    reference that looks like a path but is none raises BaseModelError listing what its folder holds.
    """
    ref = base["ref"]
    if ref.startswith("tiny:"):
        from pipeline.bases.cache import ensure_base

        return str(ensure_base(ref, store, size=base.get("size", "full")).path), None
    path = Path(ref).expanduser()
    if path.exists():
        return str(path), None
    if ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or "\\" in ref:
        parent = path.parent
        there = sorted(p.name for p in parent.iterdir())[:20] if parent.is_dir() else []
        raise BaseModelError(f"base {ref!r} is neither an existing folder nor an HF id (namespace/name); "
                             f"{parent} holds: {', '.join(there) or 'nothing (it does not exist)'}")
    from pipeline.artefacts import resolve_hub_model

    return resolve_hub_model(ref, base.get("revision"), base.get("kind") or "diffusion")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_diffusion_pipeline(base: dict[str, Any], store: Store, dtype=None):
    """A `StableDiffusionPipeline` for `base`, from the tiny cache or by HF id."""
    import torch
    from diffusers import StableDiffusionPipeline

    path, revision = resolve_base(base, store)
    try:
        return StableDiffusionPipeline.from_pretrained(path, revision=revision, dtype=dtype or torch.float32,
                                                       safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError, TypeError) as exc:
        if path != base["ref"] and not base["ref"].startswith("tiny:") and not Path(base["ref"]).expanduser().exists():  # an HF id, from the hub cache
            from pipeline.artefacts import partly_cached

            raise partly_cached(base["ref"], base.get("revision"), "diffusion", exc) from None
        if Path(path).is_dir() and not (Path(path) / "model_index.json").is_file():
            raise BaseModelError(f"base {base['ref']!r} is not a StableDiffusionPipeline-compatible diffusion model: its folder "
                             f"{path} has no model_index.json (it holds: {', '.join(sorted(p.name for p in Path(path).iterdir())[:20])})") from None
        raise BaseModelError(f"base {base['ref']!r} cannot be loaded as a StableDiffusionPipeline from {path!r}: {_first_line(exc)}") from None

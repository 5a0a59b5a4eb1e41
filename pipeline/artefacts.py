"""Artefacts from the Hugging Face hub: whether they are here, how to fetch them, and one error when not.

A manifest can need a base model by HF id, `hf:` datasets, `hf:` benchmark datasets and open_clip
weights. Each is a set of files of one hub repo (`HubFiles`): its repo id, type, revision and the
file patterns the pipeline reads. The same object gives

- `command()`: the exact `hf download …` (huggingface_hub ≥ 1 ships the `hf` CLI) that puts the
  files into the cache under `HF_HOME`;
- `cached()`: the local snapshot folder or file when everything is in the cache, else None
  (no network);
- `download()`: `huggingface_hub.snapshot_download` / `hf_hub_download` into that cache.

When the hub is off (`HF_HUB_OFFLINE=1`) or does not answer a TCP connection within
`PROBE_TIMEOUT_S`, loaders read the cache only, and an artefact that is not there raises
`ArtefactUnavailableError`: one line naming what is missing, `HF_HOME` and the command that fetches
it — within seconds, never a retry loop, a traceback or another diagnosis.

Imports no torch: `lol fetch --dry-run` and the CLI's error path stay light.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from storage.errors import DomainError

PROBE_TIMEOUT_S = 3.0


class ArtefactUnavailableError(DomainError):
    """A hub artefact (base, dataset, CLIP weights, benchmark) that is neither cached nor reachable;
    the message is one line that says how to fetch it."""


# --------------------------------------------------------------------------------------
# Is the hub there?


def offline_mode() -> bool:
    """HF_HUB_OFFLINE, as set now (the environment, or huggingface_hub's flag)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_host() -> tuple[str, int]:
    from huggingface_hub import constants

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@functools.cache
def _probe(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def hub_reachable() -> bool:
    """Whether the hub answers a TCP connection within PROBE_TIMEOUT_S (probed once per process); False offline."""
    return not offline_mode() and _probe(*hub_host())


def why_unreachable() -> str:
    """How to say why the hub cannot be used: `is off (HF_HUB_OFFLINE=1)` or `cannot be reached (host)`."""
    if offline_mode():
        return "is off (HF_HUB_OFFLINE=1)"
    host, port = hub_host()
    return f"cannot be reached ({host}:{port})"


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Offline mode for `datasets` and `huggingface_hub` (both read these flags at call time)."""
    from huggingface_hub import constants

    try:
        import datasets.config as dconfig
    except ImportError:  # pragma: no cover - datasets is a dependency
        dconfig = None
    saved = (constants.HF_HUB_OFFLINE, getattr(dconfig, "HF_HUB_OFFLINE", None))
    constants.HF_HUB_OFFLINE = True
    if dconfig is not None:
        dconfig.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        if dconfig is not None:
            dconfig.HF_HUB_OFFLINE = saved[1]


def hf_home() -> str:
    """HF_HOME as the libraries use it now."""
    from huggingface_hub import constants

    return os.environ.get("HF_HOME") or str(Path(constants.HF_HUB_CACHE).parent)


def hub_cache_dir() -> str:
    """The hub cache as the environment sets it now (HF_HUB_CACHE, else HF_HOME/hub), so a variable set
    after huggingface_hub was imported still counts."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return constants.HF_HUB_CACHE


# --------------------------------------------------------------------------------------
# Files of one hub repo


@dataclass(frozen=True)
class HubFiles:
    """Files of one hub repo: `files` by name (the first of each `alternatives` group that exists), or
    everything matching `include` minus `exclude` (a snapshot)."""

    repo_id: str
    repo_type: str = "model"
    revision: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    files: tuple[tuple[str, ...], ...] = ()  # each entry: alternatives, the preferred first

    def describe(self) -> str:
        return self.repo_id + (f" @ {self.revision}" if self.revision else "")

    def command(self) -> str:
        """The `hf download` command that puts these files into the cache (run with the same HF_HOME)."""
        parts = ["hf", "download", self.repo_id]
        parts += [alternatives[0] for alternatives in self.files]
        if self.repo_type != "model":
            parts += ["--repo-type", self.repo_type]
        if self.revision:
            parts += ["--revision", self.revision]
        for pattern in self.include:
            parts += ["--include", pattern]
        for pattern in self.exclude:
            parts += ["--exclude", pattern]
        return shlex.join(parts)

    def cached(self) -> str | None:
        """The local snapshot folder (or, for `files`, the first file) when these files are in the cache; else None."""
        from huggingface_hub import snapshot_download, try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError

        cache = hub_cache_dir()
        try:
            if self.files:
                found = []
                for alternatives in self.files:
                    hit = next((p for f in alternatives
                                if isinstance(p := try_to_load_from_cache(self.repo_id, f, cache_dir=cache,
                                                                          revision=self.revision, repo_type=self.repo_type), str)),
                               None)
                    if hit is None:
                        return None
                    found.append(hit)
                return found[0]
            with hub_offline():
                folder = snapshot_download(self.repo_id, repo_type=self.repo_type, revision=self.revision, cache_dir=cache,
                                           allow_patterns=list(self.include) or None, ignore_patterns=list(self.exclude) or None,
                                           local_files_only=True)
        except HFValidationError:
            return None
        except Exception:  # LocalEntryNotFoundError, OfflineModeIsEnabled: not (fully) cached
            return None
        if self.include and not _has_match(Path(folder), self.include):
            return None
        return folder

    def download(self) -> str:
        """Fetch into the cache (the hub must be reachable); the snapshot folder or the first file."""
        from huggingface_hub import hf_hub_download, snapshot_download

        cache = hub_cache_dir()
        if self.files:
            paths = []
            for alternatives in self.files:
                last: Exception | None = None
                for name in alternatives:
                    try:
                        paths.append(hf_hub_download(self.repo_id, name, repo_type=self.repo_type,
                                                     revision=self.revision, cache_dir=cache))
                        break
                    except Exception as exc:  # the next alternative (e.g. .bin where no .safetensors exists)
                        last = exc
                else:
                    raise last or FileNotFoundError(alternatives)
            return paths[0]
        return snapshot_download(self.repo_id, repo_type=self.repo_type, revision=self.revision, cache_dir=cache,
                                 allow_patterns=list(self.include) or None, ignore_patterns=list(self.exclude) or None)


def _has_match(folder: Path, patterns: tuple[str, ...]) -> bool:
    import fnmatch

    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return any(fnmatch.fnmatch(n, pat) for n in names for pat in patterns)


# --------------------------------------------------------------------------------------
# Base models by HF id

# What the pipeline reads of a base: a StableDiffusionPipeline's components (safetensors, no safety
# checker, no fp16/non-EMA variants, no single-file .ckpt) or a transformers causal LM.
BASE_PATTERNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "diffusion": (("model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"),
                  ("safety_checker/*", "*.fp16.*", "*non_ema*", "*.ckpt")),
    "causal_lm": (("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"), ()),
}


def base_files(ref: str, revision: str | None, kind: str) -> HubFiles:
    include, exclude = BASE_PATTERNS[kind]
    return HubFiles(ref, "model", revision, include, exclude)


def is_hub_model_ref(ref: str) -> bool:
    """Whether a base reference names a hub repo (not `tiny:`, not an existing local path)."""
    return not ref.startswith("tiny:") and not Path(ref).expanduser().exists()


def unavailable(what: str, files: HubFiles | None, extra: str = "") -> ArtefactUnavailableError:
    """The one-line error for `what` (e.g. `base CompVis/stable-diffusion-v1-4 @ main`)."""
    how = f"where the hub is reachable run `{files.command()}` with the same HF_HOME" if files else "fetch it where the hub is reachable"
    return ArtefactUnavailableError(f"{what} is not in the cache (HF_HOME={hf_home()}) and the hub {why_unreachable()}; "
                                    f"{how} (or `lol fetch MANIFEST` for everything a manifest needs){extra}")


def resolve_hub_model(ref: str, revision: str | None, kind: str) -> tuple[str, str | None]:
    """(what `from_pretrained` should read, revision) for a base by HF id: the id itself when the hub
    is reachable, else the cached snapshot folder; ArtefactUnavailableError when neither."""
    if hub_reachable():
        return ref, revision
    files = base_files(ref, revision, kind)
    folder = files.cached()
    if folder is None:
        raise unavailable(f"base model {files.describe()}", files,
                          "; or set base.ref to a local folder of it (hf download … --local-dir DIR)")
    return folder, None


def partly_cached(ref: str, revision: str | None, kind: str, exc: Exception) -> ArtefactUnavailableError:
    """The error for a base whose cached snapshot is incomplete (an interrupted or filtered download)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    files = base_files(ref, revision, kind)
    return ArtefactUnavailableError(f"base model {files.describe()} is only partly in the cache (HF_HOME={hf_home()}: {first}) "
                                    f"and the hub {why_unreachable()}; where the hub is reachable run `{files.command()}` "
                                    "with the same HF_HOME (or `lol fetch MANIFEST`)")


__all__ = ["ArtefactUnavailableError", "BASE_PATTERNS", "HubFiles", "base_files", "hf_home", "hub_cache_dir",
           "hub_offline", "hub_reachable", "is_hub_model_ref", "offline_mode", "partly_cached", "resolve_hub_model", "unavailable",
           "why_unreachable"]

"""Build-once cache of the tiny bases, keyed by the hash of their recipe.

    {store}/bases/{name}-{size}-{recipe_hash}/...files saved by the builder...
    {store}/bases/{name}-{size}-{recipe_hash}/BUILD.json   # written last: recipe, metrics, sha256 of files

A recipe is the builder's config for a size, the fingerprint of its training data, its
seed (inside the config) and the versions of the libraries that shape its weights. A hit
needs BUILD.json and every file's checksum to match; a corrupted entry is rebuilt, never
loaded. Builds run on one torch thread (same weights whatever the core count; the small
models here run fastest that way). Bases that ship inside the package (`pipeline/bases/shipped/`) are copied into the
store instead of being rebuilt when their recipe hash matches.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import runtime
from pipeline.bases import BaseModelError, tiny_module
from storage import Store
from storage.store import sha256_bytes

BUILD_FILE = "BUILD.json"
SHIPPED_DIR = Path(__file__).with_name("shipped")
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "open_clip_torch", "tokenizers")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a built base's weights."""

    name: str
    size: str
    config: dict[str, Any]
    data: str
    versions: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "config": self.config, "data": self.data, "versions": self.versions}

    @property
    def hash(self) -> str:
        text = json.dumps(self.as_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.size}-{self.hash}"


def library_versions() -> dict[str, str]:
    return runtime.versions(*VERSIONED_PACKAGES)


def recipe_for(name: str, size: str = "full") -> Recipe:
    module = tiny_module(name)
    if size not in module.SIZES:
        raise BaseModelError(f"tiny:{module.NAME} has sizes {', '.join(module.SIZES)}, not {size!r}")
    return Recipe(module.NAME, size, module.recipe_config(size), module.data_fingerprint(), library_versions())


@dataclass(frozen=True)
class BuiltBase:
    name: str
    recipe: Recipe
    path: Path  # a local folder that from_pretrained-style loaders read
    metrics: dict[str, Any]
    source: str  # "cache" | "shipped" | "built"


def ensure_base(name: str, store: Store, size: str = "full", force: bool = False,
                progress: Progress | None = None, log: Callable[[str], None] = lambda _: None) -> BuiltBase:
    """The built base `tiny:NAME`, building it (once) if the store does not hold it yet.

    Workers of one host that need the same missing base build it once: the first holds a lock
    (`.locks/` in a local store) while it builds, the others wait for it and then find it cached.
    """
    if not store.is_local:
        return _ensure_base(name, store, size, force, progress, log)
    with store.lock(f".locks/base-{recipe_for(name, size).folder}.lock"):
        return _ensure_base(name, store, size, force, progress, log)


def _ensure_base(name: str, store: Store, size: str, force: bool, progress: Progress | None,
                 log: Callable[[str], None]) -> BuiltBase:
    recipe = recipe_for(name, size)
    rel = f"bases/{recipe.folder}"
    if not force:
        problems = _entry_problems(store, rel)
        if problems is None:
            return BuiltBase(recipe.name, recipe, _local_folder(store, rel), store.read_json(f"{rel}/{BUILD_FILE}")["metrics"], "cache")
        if problems:
            log(f"cache entry {rel} is corrupt ({problems[0]}); rebuilding")
        shipped = SHIPPED_DIR / recipe.folder
        if (shipped / BUILD_FILE).is_file() and not _folder_problems(shipped):
            log(f"using the shipped build of tiny:{recipe.name} ({recipe.hash})")
            _upload(store, shipped, rel)
            return BuiltBase(recipe.name, recipe, _local_folder(store, rel), json.loads((shipped / BUILD_FILE).read_text())["metrics"], "shipped")
    log(f"building tiny:{recipe.name} ({size}, recipe {recipe.hash})")
    with tempfile.TemporaryDirectory(prefix=f"lol-build-{recipe.name}-") as tmp:
        out = Path(tmp) / recipe.folder
        out.mkdir()
        started = time.perf_counter()
        with _one_thread():  # deterministic whatever the core count, and fastest for these small models
            module = tiny_module(name)
            # a base built from another one (tiny:shapes-sd-continued) resolves its parent in this store
            extra = {"store": store} if "store" in inspect.signature(module.build).parameters else {}
            metrics = dict(module.build(recipe.config, out, progress, **extra))
        metrics.setdefault("build_seconds", round(time.perf_counter() - started, 2))
        metrics.setdefault("peak_rss_mb", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
        _write_build_file(out, recipe, metrics)
        store.delete(rel)
        _upload(store, out, rel)
    return BuiltBase(recipe.name, recipe, _local_folder(store, rel), metrics, "built")


def ship(built: BuiltBase, shipped_dir: Path = SHIPPED_DIR) -> Path:
    """Copy a built base into the package's shipped folder, replacing older builds of the same name and size."""
    if built.path.resolve().parent == shipped_dir.resolve():
        return built.path
    problems = _folder_problems(built.path)
    if problems:
        raise BaseModelError(f"refusing to ship tiny:{built.name}: files differ from its BUILD.json: {problems}")
    shipped_dir.mkdir(parents=True, exist_ok=True)
    for old in shipped_dir.glob(f"{built.name}-{built.recipe.size}-*"):
        shutil.rmtree(old)
    target = shipped_dir / built.recipe.folder
    shutil.copytree(built.path, target)
    return target


def shipped_names() -> list[str]:
    """The bases the repository ships built (a module may opt out with `SHIPPED = False`)."""
    from pipeline.bases import tiny_modules

    return [name for name in tiny_modules() if getattr(tiny_module(name), "SHIPPED", True)]


def shipped_bytes(shipped_dir: Path = SHIPPED_DIR) -> dict[str, int]:
    """Bytes of safetensors weights per shipped folder (the repository's budget is 20 MB in all)."""
    return {d.name: sum(f.stat().st_size for f in d.rglob("*.safetensors"))
            for d in sorted(shipped_dir.iterdir()) if d.is_dir()} if shipped_dir.is_dir() else {}


class _one_thread:
    def __enter__(self) -> None:
        import torch

        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        import torch

        torch.set_num_threads(self.threads)


def _write_build_file(folder: Path, recipe: Recipe, metrics: dict[str, Any]) -> None:
    files = {p.relative_to(folder).as_posix(): sha256_bytes(p.read_bytes())
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != BUILD_FILE}
    build = {"recipe": recipe.as_json(), "recipe_hash": recipe.hash, "metrics": metrics, "files": files,
             "built_at": time.time()}
    (folder / BUILD_FILE).write_text(json.dumps(build, indent=2, sort_keys=True) + "\n")


def _upload(store: Store, folder: Path, rel: str) -> None:
    """Copy a built folder into the store, BUILD.json last (so a partial copy is no hit)."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != BUILD_FILE)
    for path in paths:
        store.write_bytes(f"{rel}/{path.relative_to(folder).as_posix()}", path.read_bytes())
    store.write_bytes(f"{rel}/{BUILD_FILE}", (folder / BUILD_FILE).read_bytes())


def _entry_problems(store: Store, rel: str) -> list[str] | None:
    """None if the entry is a verified hit, [] if absent, else what is wrong with it."""
    if not store.exists(f"{rel}/{BUILD_FILE}"):
        return [] if not store.exists(rel) else ["no BUILD.json (an interrupted build)"]
    try:
        build = store.read_json(f"{rel}/{BUILD_FILE}")
    except ValueError as exc:
        return [f"unreadable BUILD.json: {exc}"]
    problems = []
    for name, digest in build.get("files", {}).items():
        try:
            if sha256_bytes(store.read_bytes(f"{rel}/{name}")) != digest:
                problems.append(f"{name}: checksum mismatch")
        except FileNotFoundError:
            problems.append(f"{name}: missing")
    return problems or None


def _folder_problems(folder: Path) -> list[str]:
    build = json.loads((folder / BUILD_FILE).read_text())
    return [name for name, digest in build["files"].items()
            if not (folder / name).is_file() or sha256_bytes((folder / name).read_bytes()) != digest]


def _local_folder(store: Store, rel: str) -> Path:
    """A local folder with the entry's files: the store itself when local, else a cached copy."""
    if store.is_local:
        return store.local_path(rel)
    target = Path(tempfile.gettempdir()) / "lol-bases" / rel.rsplit("/", 1)[-1]
    if not (target / BUILD_FILE).is_file():
        if target.exists():
            shutil.rmtree(target)
        store.download_dir(rel, target)
    return target

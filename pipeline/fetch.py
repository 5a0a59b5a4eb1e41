"""`lol fetch MANIFEST`: download everything a manifest needs into the cache, so GPU workers start warm.

What a manifest needs (`manifest_artefacts`), each once however many sections name it:

- `base`: a base by HF id, at its revision — the files the pipeline reads (`pipeline.artefacts.BASE_PATTERNS`),
  by `huggingface_hub.snapshot_download`;
- `dataset` / `benchmark`: `hf:` data sources and `hf:` datasets of mc_accuracy / eval_loss, with
  their config(s) and revision — prepared by `datasets.load_dataset` into `HF_HOME/datasets`, the cache
  the stages read offline;
- `clip`: open_clip weights of a pretrained tag or an `hf-hub:` model, by open_clip's own download helpers
  (`download_pretrained`, `download_pretrained_from_hf`; safetensors preferred) into `HF_HOME/hub`.

Built-in `tiny:` bases, local folders and files, `folder:` datasets and `qa:` / `skills:` sets need nothing.
Where the hub is off or unreachable, every artefact that is not cached is one line (what, and the
command that fetches it where the hub is reachable) and the exit code is 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.artefacts import (
    ArtefactUnavailableError,
    HubFiles,
    base_files,
    hf_home,
    hub_offline,
    hub_reachable,
    why_unreachable,
)
from pipeline.manifest import Manifest


@dataclass
class Artefact:
    """One thing a manifest needs from the hub (or a local thing it names, with `local` saying why nothing is fetched)."""

    kind: str  # base | dataset | benchmark | clip
    name: str  # as the manifest names it
    used_by: list[str] = field(default_factory=list)  # YAML paths naming it
    files: HubFiles | None = None  # hub files (bases, CLIP weights)
    dataset: Any = None  # pipeline.data.hub.DatasetRef (hf: datasets)
    clip: Any = None  # pipeline.score.clip_score.ClipRef
    local: str | None = None  # why nothing needs fetching (built in, a local path)
    absent: str | None = None  # a local path it names that does not exist: what to say (no download can help)

    @property
    def key(self) -> tuple:
        if self.dataset is not None:
            return ("dataset", self.dataset.source, self.dataset.config, self.dataset.revision)
        return (self.kind, self.name)

    def describe(self) -> str:
        if self.dataset is not None:
            return self.dataset.describe()
        if self.clip is not None and self.files is not None:
            return f"{self.clip.describe()} ({self.files.describe()})"
        return self.files.describe() if self.files is not None else self.name

    def command(self) -> str:
        """How to fetch it by hand: `hf download …` into the cache, or for a dataset the local copy `folder:` reads."""
        if self.dataset is not None:
            from pipeline.data.hub import fetch_command, local_copy_dir

            revision = f", revision={self.dataset.revision!r}" if self.dataset.revision else ""
            loads = "; ".join(f"datasets.load_dataset({self.dataset.target!r}, {c!r}{revision})" for c in self.dataset.config)
            return (f"{loads} (into HF_HOME/datasets); by hand: `{fetch_command(self.dataset)}` "
                    f"and {self.used_by[0] if self.used_by else 'data.source'}=folder:{local_copy_dir(self.dataset)}")
        if self.files is not None:
            return self.files.command()
        if self.clip is not None and self.clip.url:
            return f"open_clip download of {self.clip.url}"
        return ""

    def cached(self) -> bool:
        """Whether the cache holds it (never touches the network)."""
        if self.local is not None:
            return True
        if self.dataset is not None:
            return all(_dataset_cached(self.dataset, config) for config in self.dataset.config)
        if self.clip is not None:
            return self.clip.checkpoint() is not None
        return self.files is not None and self.files.cached() is not None

    def fetch(self) -> None:
        """Download it into the cache (the hub must be reachable)."""
        if self.local is not None:
            return
        if self.dataset is not None:
            import datasets

            for config in self.dataset.config:
                datasets.load_dataset(self.dataset.target, config, revision=self.dataset.revision)
        elif self.clip is not None:
            _fetch_clip(self.clip)
        elif self.files is not None:
            self.files.download()


def _dataset_cached(ref: Any, config: str | None) -> bool:
    import datasets

    try:
        with hub_offline():
            datasets.load_dataset(ref.target, config, revision=ref.revision)
    except Exception:  # not prepared in the datasets cache (or not readable offline)
        return False
    return True


def _fetch_clip(ref: Any) -> None:
    import open_clip
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

    from pipeline.artefacts import hub_cache_dir

    cache = hub_cache_dir()
    if ref.kind == "hf-hub":
        repo = ref.model.removeprefix("hf-hub:")
        download_pretrained_from_hf(repo, filename="open_clip_config.json", cache_dir=cache)
        download_pretrained_from_hf(repo, cache_dir=cache)  # open_clip_model.safetensors, else the .bin
    else:
        download_pretrained(open_clip.get_pretrained_cfg(ref.model.replace("/", "-"), ref.pretrained), cache_dir=cache)
    open_clip.get_tokenizer(ref.model, cache_dir=cache)  # an HF tokenizer, where the model has one


def manifest_artefacts(manifest: Manifest) -> list[Artefact]:
    """Everything the manifest needs, in the order the stages need it, each once."""
    found: dict[tuple, Artefact] = {}

    def add(artefact: Artefact, path: str) -> None:
        kept = found.setdefault(artefact.key, artefact)
        kept.used_by.append(path)

    base = manifest.base
    if base.ref.startswith("tiny:"):
        add(Artefact("base", base.ref, local="built in (built once into the store)"), "base.ref")
    elif Path(base.ref).expanduser().exists():
        add(Artefact("base", base.ref, local="a local folder"), "base.ref")
    elif looks_like_path(base.ref):
        add(Artefact("base", base.ref, local="a local folder", absent=missing_folder("base folder", base.ref)), "base.ref")
    else:
        add(Artefact("base", base.ref, files=base_files(base.ref, base.revision, base.kind)), "base.ref")

    from pipeline.data import dataset_options

    def add_dataset(kind: str, source: str, options: dict[str, Any], path: str) -> None:
        if source.startswith("hf:"):
            from pipeline.data.hub import resolve_ref

            add(Artefact(kind, source, dataset=resolve_ref(source, **options)), path)
        elif source.startswith("folder:"):
            folder = source.split(":", 1)[1]
            absent = None if Path(folder).expanduser().is_dir() else missing_folder(f"{kind} folder", folder, path)
            add(Artefact(kind, source, local="a local folder", absent=absent), path)

    add_dataset("dataset", manifest.data.source, dataset_options(manifest.data), "data.source")
    for i, scorer in enumerate(manifest.scorers):
        if scorer.name == "mc_accuracy":
            add_dataset("benchmark", scorer.benchmark, dataset_options(scorer), f"scorers[{i}].benchmark")
        elif scorer.name == "eval_loss":
            add_dataset("benchmark", scorer.dataset, dataset_options(scorer), f"scorers[{i}].dataset")
        elif scorer.name == "clip_score" and not scorer.model.startswith("tiny:"):
            from pipeline.score.clip_score import clip_ref

            ref = clip_ref(scorer.model, scorer.pretrained)
            name = ref.describe()
            if ref.kind in ("tag", "hf-hub"):
                add(Artefact("clip", name, files=ref.files, clip=ref), f"scorers[{i}].model")
            else:
                add(Artefact("clip", name, clip=ref, local="a local checkpoint" if ref.kind != "random" else "random weights"),
                    f"scorers[{i}].model")
    return list(found.values())


@dataclass
class FetchOutcome:
    artefact: Artefact
    status: str  # cached | local | fetched | would fetch | missing | failed
    detail: str = ""


def fetch_manifest(manifest: Manifest, dry_run: bool = False,
                   on_artefact: Callable[[FetchOutcome], None] | None = None) -> list[FetchOutcome]:
    """Fetch (or, with `dry_run`, list) every artefact of the manifest; one outcome each."""
    reachable = None if dry_run else hub_reachable()
    outcomes = []
    for artefact in manifest_artefacts(manifest):
        if artefact.absent is not None:
            outcome = FetchOutcome(artefact, "missing", artefact.absent)
        elif artefact.local is not None:
            outcome = FetchOutcome(artefact, "local", artefact.local)
        elif artefact.cached():
            outcome = FetchOutcome(artefact, "cached")
        elif dry_run:
            outcome = FetchOutcome(artefact, "would fetch", artefact.command())
        elif not reachable:
            outcome = FetchOutcome(artefact, "missing", _missing_line(artefact))
        else:
            try:
                artefact.fetch()
                outcome = FetchOutcome(artefact, "fetched")
            except Exception as exc:  # one artefact's failure is reported; the others are still fetched
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                outcome = FetchOutcome(artefact, "failed", f"{artefact.kind} {artefact.describe()}: {type(exc).__name__}: {first}")
        outcomes.append(outcome)
        if on_artefact is not None:
            on_artefact(outcome)
    return outcomes


def missing_artefacts(manifest: Manifest) -> list[str]:
    """One line per artefact the manifest needs that is neither cached nor fetchable now (the hub is off or
    unreachable); empty where the hub is reachable (the stages fetch what they need)."""
    artefacts = manifest_artefacts(manifest)
    absent = [a.absent for a in artefacts if a.absent is not None]  # local paths that do not exist, hub or no hub
    if hub_reachable():
        return absent
    return absent + [_missing_line(a) for a in artefacts if a.local is None and not a.cached()]


def looks_like_path(ref: str) -> bool:
    """A base reference that can only be a local path: absolute, ./ ../ ~, or with more than one `/`
    (an HF id is `name` or `namespace/name`)."""
    return ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or "\\" in ref


def missing_folder(what: str, folder: str, used_by: str | None = None) -> str:
    """One line for a local folder a manifest names that is not there: where it was looked for, and
    what its parent holds (at most 20 names)."""
    path = Path(folder).expanduser()
    where = path if path.is_absolute() else Path.cwd() / path
    parent = where.parent
    there = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
    listing = ", ".join(there[:20]) + (f", … ({len(there)} in all)" if len(there) > 20 else "")
    kind = "is a file, not a folder" if where.is_file() else "does not exist"
    return (f"{what} {folder} ({used_by + ', ' if used_by else ''}looked for at {where}) {kind}; {parent} holds: "
            f"{listing or 'nothing (it does not exist)'}")


def _missing_line(artefact: Artefact) -> str:
    head = f"{artefact.kind} {artefact.describe()} is not in the cache (HF_HOME={hf_home()}) and the hub {why_unreachable()}; "
    if artefact.kind == "base" and "/" not in artefact.name:  # `name` alone: an old hub id, or a local folder mistyped
        head += f"nor is it a folder here ({Path.cwd() / artefact.name} does not exist); "
    if artefact.dataset is not None:
        from pipeline.data.hub import fetch_command, local_copy_dir

        return head + (f"where the hub is reachable run `lol fetch MANIFEST` with the same HF_HOME (datasets.load_dataset prepares "
                       f"HF_HOME/datasets), or `{fetch_command(artefact.dataset)}` and set "
                       + " and ".join(f"{u}=folder:{local_copy_dir(artefact.dataset)}" for u in artefact.used_by))
    how = artefact.command()
    how = f"`{how}`" if how.startswith("hf ") else how
    return head + f"where the hub is reachable run {how} with the same HF_HOME (or `lol fetch MANIFEST` there)"


__all__ = ["Artefact", "ArtefactUnavailableError", "FetchOutcome", "fetch_manifest", "manifest_artefacts", "missing_artefacts"]

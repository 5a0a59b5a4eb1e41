"""Data sources, looked up by the manifest's `data.source` string (`shapes`, `qa`, `skills`, …)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pipeline.data.base import DataSource, DataSourceError, Example, ImageExample, QAExample


def _shapes(**options) -> DataSource:
    from pipeline.data.shapes import ShapesSource

    return ShapesSource(**options)


def _qa(**options) -> DataSource:
    """The tiny world's QA source with its hashed pretrain / train / validation / test splits."""
    from pipeline.data.qa import QASource

    return QASource(**{"scheme": "hashed", **options})


def _skills(**options) -> DataSource:
    """The tiny world's learnable QA: six templated skills (`pipeline.data.skills`)."""
    from pipeline.data.skills import SkillsSource

    return SkillsSource(**options)


BUILTIN_SOURCES: dict[str, Callable[..., DataSource]] = {"shapes": _shapes, "qa": _qa, "skills": _skills}


def get_source(name: str, **options) -> DataSource:
    """The data source a manifest names; `options` go to its constructor (for `hf:` / `folder:`:
    config, revision, columns — see `pipeline.data.hub`)."""
    if name in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[name](**options)
    if name.startswith(("hf:", "folder:")):
        from pipeline.data.hub import hub_source

        return hub_source(name, **options)
    raise DataSourceError(f"unknown data source {name!r}; built-in sources: {', '.join(BUILTIN_SOURCES)}, or hf:<dataset id>, folder:<path>")


def dataset_options(section: Any) -> dict[str, Any]:
    """config / revision / columns of a manifest section that names an `hf:` / `folder:` dataset."""
    columns = getattr(section, "columns", None)
    return {"config": getattr(section, "config", None), "revision": getattr(section, "revision", None),
            "columns": columns.model_dump(exclude_none=True) if columns is not None else None}


def manifest_source(manifest: Any) -> DataSource:
    """The data source of a manifest's `data` section."""
    data = manifest.data
    return get_source(data.source, **(dataset_options(data) if data.source.startswith(("hf:", "folder:")) else {}))


def source_examples(manifest: Any) -> Sequence[Example]:
    """The examples of the manifest's `data.split`, checked against its subsets before any job runs
    (sources that can check: unknown classes, too few identities)."""
    examples = manifest_source(manifest).examples(manifest.data.split)
    check = getattr(examples, "check_subsets", None)
    if check is not None:
        check(manifest.data.subsets)
    return examples


def select_job_examples(examples: Sequence[Example], descriptor: dict[str, Any], seed: int) -> list[Example]:
    """One job's training examples: the source's own selection where it has one (hub images:
    real identities and classes), else `pipeline.data.subsets.job_examples`."""
    own = getattr(examples, "job_examples", None)
    if own is not None:
        chosen = own(descriptor, seed)
        if not chosen:
            raise DataSourceError(f"the job's data subset is empty: {descriptor}")
        return chosen
    from pipeline.data.subsets import job_examples

    return job_examples(examples, descriptor, seed)


def source_provenance(manifest: Any) -> dict[str, Any] | None:
    """What the manifest's data is, for records and cards: fingerprint and revision of an `hf:` /
    `folder:` dataset; None for the built-in sources (their data ships with the packages)."""
    source = manifest_source(manifest)
    provenance = getattr(source, "provenance", None)
    return provenance(manifest.data.split) if provenance is not None else None


__all__ = ["BUILTIN_SOURCES", "DataSource", "DataSourceError", "ImageExample", "QAExample", "dataset_options", "get_source",
           "manifest_source", "select_job_examples", "source_examples", "source_provenance"]

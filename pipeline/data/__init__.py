"""Data sources, looked up by the manifest's `data.source` string (`shapes`, `qa`, …)."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.data.base import DataSource, DataSourceError, ImageExample, QAExample


def _shapes(**options) -> DataSource:
    from pipeline.data.shapes import ShapesSource

    return ShapesSource(**options)


def _qa(**options) -> DataSource:
    """The tiny world's QA source with its hashed pretrain / train / validation / test splits."""
    from pipeline.data.qa import QASource

    return QASource(**{"scheme": "hashed", **options})


BUILTIN_SOURCES: dict[str, Callable[..., DataSource]] = {"shapes": _shapes, "qa": _qa}


def get_source(name: str, **options) -> DataSource:
    """The data source a manifest names; `options` go to its constructor."""
    if name in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[name](**options)
    if name.startswith(("hf:", "folder:")):
        raise DataSourceError(f"data source {name!r} needs the hub or a local folder loader, which this build does not have yet; built-in sources: {', '.join(BUILTIN_SOURCES)}")
    raise DataSourceError(f"unknown data source {name!r}; built-in sources: {', '.join(BUILTIN_SOURCES)}, or hf:<dataset id>, folder:<path>")


__all__ = ["BUILTIN_SOURCES", "DataSource", "DataSourceError", "ImageExample", "QAExample", "get_source"]

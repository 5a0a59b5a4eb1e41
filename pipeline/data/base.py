"""The one interface every data source implements.

A source yields examples of one of two kinds: images with captions, classes and
attributes (diffusion populations), or multiple-choice questions (LM populations).
Sources are looked up by the manifest's `data.source` string through `get_source`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Union, runtime_checkable

from storage.errors import DomainError


@dataclass(frozen=True)
class ImageExample:
    """One training image. `attributes` are per-example labels (strings or 0/1 ints).

    The image is a file (`image_path`) or, for images stored inside a dataset (parquet, arrow),
    its encoded bytes (`image_bytes`); `origin` says where it came from, for error messages.
    """

    id: str
    image_path: Path | None
    caption: str
    label: str  # the class (tiny world: the shape; Imagenette: the class name)
    attributes: dict[str, Union[str, int]] = field(default_factory=dict)
    image_bytes: bytes | None = field(default=None, repr=False, compare=False)
    origin: str = field(default="", compare=False)

    def load_image(self):
        """The image as an RGB `PIL.Image.Image`; DataSourceError naming the image if it cannot be decoded."""
        import io

        from PIL import Image, UnidentifiedImageError

        where = self.origin or str(self.image_path)
        try:
            source = io.BytesIO(self.image_bytes) if self.image_bytes is not None else self.image_path
            with Image.open(source) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataSourceError(f"image {self.id!r} ({where}) cannot be read as an image: {exc}; "
                                  "valid: an encoded PNG/JPEG/WebP… file or bytes") from None


@dataclass(frozen=True)
class QAExample:
    """One multiple-choice question; `answer` indexes `choices`."""

    id: str
    source: str  # e.g. "arc_easy", or for ARC by provenance "MCAS", "TIMSS", …
    question: str
    choices: tuple[str, ...]
    answer: int


Example = Union[ImageExample, QAExample]


def hash_bucket(salt: str, key: str) -> int:
    """A number in [0, 1000) fixed by `key` alone: the first 8 bytes of sha256(salt + key), mod 1000."""
    return int.from_bytes(hashlib.sha256(f"{salt}{key}".encode()).digest()[:8], "big") % 1000


def split_of_bucket(bucket: int, shares: Sequence[tuple[str, int]]) -> str:
    """The split whose per-mille share covers `bucket`, shares taken in order (they must sum to 1000)."""
    edge = 0
    for name, share in shares:
        edge += share
        if bucket < edge:
            return name
    raise AssertionError(f"split shares sum to {edge}, not 1000")


class DataSourceError(DomainError):
    """A data source that cannot be used: missing package, unknown split or name."""


@runtime_checkable
class DataSource(Protocol):
    """A named, deterministic collection of examples, partitioned into splits."""

    name: str

    def splits(self) -> tuple[str, ...]:
        """Names of the splits this source has (e.g. ("train", "holdout"))."""
        ...

    def examples(self, split: str) -> Sequence[Example]:
        """Every example of `split`, in a fixed order; raise DataSourceError for unknown splits."""
        ...

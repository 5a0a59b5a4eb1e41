"""The tiny world's image source: easy-vqa's 5,000 coloured shapes, with recovered attributes.

The `easy-vqa` package ships 64×64 PNGs, each with one circle, rectangle or triangle in one
of eight colours on a random near-white background, plus questions about each image — but
no per-image label table. `ShapesSource` rebuilds that table.

Attribute recovery
------------------
*From the questions.* easy-vqa asks 24 question templates (checked against the shipped
files): open questions ("what shape is in the image?", "what color is the triangle?",
"what is the blue shape?") whose answer names the shape or colour, and yes/no questions
about one shape or colour word, half of them negated ("does the image not contain a ...",
"is there not a ...", "is no ... present?"). Each question becomes facts of the form
"shape is / is not circle"; a negated question flips the yes/no answer. Intersecting the
facts per image leaves one value when the questions determine it, otherwise `None`.

*From the pixels* (vectorised over a stack of images with numpy). The background is a
random RGB tint with every channel in 230..255 and the shape covers at most a quarter of
the image, so the per-image channel median is exactly the background colour. The shape's
colour is the palette colour nearest the mean of the pixels farthest from the background
(anti-aliased edge pixels are blends, the core is pure). Each pixel's coverage `alpha` is its
projection onto the background→shape-colour line, which makes the foreground split
independent of the tint. From `alpha`:

- area fraction (mean alpha) → `size`: "large" above the pool median, else "small";
- centroid (alpha-weighted) → `position_x` "left"/"right" and `position_y` "top"/"bottom"
  of the image midlines;
- fill ratio = area / (width × height), widths from per-column maximum coverage (sub-pixel),
  → shape: rectangle ≈ 1, circle ≈ π/4, (equilateral) triangle ≈ 1/2.

`background` is "light" when the background's luma is above the pool median, else "dark".
(In absolute terms every easy-vqa background is near-white; the split is relative.)

The final `shape`/`color` are the question-derived values, falling back to the pixel-derived
ones where the questions do not determine them; the two are cross-checked in the tests.

Images from easy-vqa's own train and test folders are pooled; ids name that origin
("shapes-train-123", "shapes-test-45"). Splits ("train", "holdout") are drawn from a hash of
the id, so they do not depend on file listing order. The raw measurements are cached per
process and, given `cache_dir`, as JSON keyed by a fingerprint of the package data.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.data.base import DataSourceError, ImageExample

SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
# The RGB values easy-vqa draws with (measured from the shipped images).
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "blue": (0, 0, 255),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "green": (0, 255, 0),
    "red": (255, 0, 0),
    "teal": (0, 128, 128),
    "yellow": (255, 255, 0),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SPLITS: tuple[str, ...] = ("train", "holdout")
ORIGINS: tuple[str, ...] = ("train", "test")  # easy-vqa's own folders, pooled

INSTALL_HINT = "pip install --no-deps easy-vqa==1.0"
_TABLE_VERSION = 1  # bump when the measurements below change meaning
_FILL_RECTANGLE = 0.93  # fill ratio above this: rectangle (measured 0.9998..1.0001)
_FILL_CIRCLE = 0.71  # above: circle (0.787..0.867); below: triangle (0.525..0.631)
_CHUNK = 500  # images per vectorised batch

Fact = tuple[str, str, bool]  # (attribute, value, holds): ("shape", "circle", False)


# ----------------------------------------------------------------------------- locating data


def find_data_dir() -> Path:
    """easy-vqa's `data/` folder, found without importing the package."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            f"the 'shapes' source needs the easy-vqa package; run `{INSTALL_HINT}`"
        )
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "data"
    check_data_dir(data_dir)
    return data_dir


def check_data_dir(data_dir: Path) -> None:
    """Raise DataSourceError naming what is there if `data_dir` lacks easy-vqa's layout."""
    missing = [
        f"{origin}/{part}"
        for origin in ORIGINS
        for part in ("questions.json", "images")
        if not (data_dir / origin / part).exists()
    ]
    if missing:
        present = sorted(p.name for p in data_dir.iterdir()) if data_dir.is_dir() else []
        raise DataSourceError(
            f"easy-vqa data folder {data_dir} lacks {missing} (it holds {present}); "
            f"reinstall with `{INSTALL_HINT}`"
        )


# ----------------------------------------------------------------------------- questions

_WORD = "|".join(SHAPES + COLORS)
_YES_NO = re.compile(
    rf"^(?:does the image (?P<neg1>not )?contain a|is there (?P<neg2>not )?a|is (?P<neg3>a|no))"
    rf" (?P<word>{_WORD})(?: shape)?(?: in the image| present)?\?$"
)
_ASK_COLOR = re.compile(
    rf"^(?:what color is the|what is the color of the) (?P<shape>shape|{'|'.join(SHAPES)})\?$"
)
_ASK_SHAPE = re.compile(
    rf"^(?:what shape does the image contain|what shape is in the image|what shape is present"
    rf"|what is the (?P<color>{'|'.join(COLORS)}) shape)\?$"
)


def _attribute_of(word: str) -> str:
    return "shape" if word in SHAPES else "color"


def question_facts(question: str, answer: str) -> list[Fact] | None:
    """What one question/answer pair says about its image; None for an unknown template."""
    if m := _YES_NO.match(question):
        negated = bool(m["neg1"] or m["neg2"]) or m["neg3"] == "no"
        holds = (answer == "yes") != negated
        return [(_attribute_of(m["word"]), m["word"], holds)]
    if m := _ASK_COLOR.match(question):
        facts: list[Fact] = [("color", answer, True)]
        return facts + ([("shape", m["shape"], True)] if m["shape"] != "shape" else [])
    if m := _ASK_SHAPE.match(question):
        facts = [("shape", answer, True)]
        return facts + ([("color", m["color"], True)] if m["color"] else [])
    return None


def resolve_facts(facts: Iterable[Fact], attribute: str) -> str | None:
    """The one value of `attribute` the facts allow, or None if zero or several remain."""
    candidates = set(SHAPES if attribute == "shape" else COLORS)
    for attr, value, holds in facts:
        if attr == attribute:
            candidates = candidates & {value} if holds else candidates - {value}
    return candidates.pop() if len(candidates) == 1 else None


def parse_questions(path: Path) -> tuple[dict[int, list[Fact]], int]:
    """Facts per image index from one questions.json, and the count of unparsed questions."""
    facts: dict[int, list[Fact]] = {}
    unparsed = 0
    for question, answer, index in json.loads(path.read_text()):
        parsed = question_facts(question, answer)
        if parsed is None:
            unparsed += 1
        else:
            facts.setdefault(int(index), []).extend(parsed)
    return facts, unparsed


# ----------------------------------------------------------------------------- pixels


def load_images(paths: Sequence[Path]) -> np.ndarray:
    """RGB uint8 stack, shape (N, H, W, 3)."""
    from PIL import Image

    def load(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    return np.stack([load(p) for p in paths])


def pixel_measurements(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image colour, coverage statistics and background from an (N, H, W, 3) uint8 stack.

    Returns arrays of length N: `color` (palette index), `area` (foreground fraction),
    `cx`, `cy` (centroid as a fraction of width/height), `fill` (area / bounding box) and
    `bg_luma` (background luma, 0..255).
    """
    N, H, W, _ = images.shape
    x = images.astype(np.float32)
    bg = np.median(x.reshape(N, H * W, 3), axis=1)  # (N, 3): background ≥ 3/4 of pixels
    diff = x - bg[:, None, None, :]  # (N, H, W, 3)
    dist = np.linalg.norm(diff, axis=-1)  # (N, H, W)
    core = dist >= 0.9 * dist.max(axis=(1, 2), keepdims=True)  # purest shape pixels
    core_rgb = (x * core[..., None]).sum(axis=(1, 2)) / core.sum(axis=(1, 2))[:, None]  # (N, 3)
    palette = np.array(list(PALETTE.values()), dtype=np.float32)  # (C, 3)
    color = np.linalg.norm(core_rgb[:, None, :] - palette[None], axis=-1).argmin(axis=1)  # (N,)

    direction = palette[color] - bg  # (N, 3): background → shape colour
    alpha = np.einsum("nhwc,nc->nhw", diff, direction) / (direction**2).sum(axis=1)[:, None, None]
    alpha = np.clip(alpha, 0.0, 1.0)  # (N, H, W) coverage

    mass = alpha.sum(axis=(1, 2))  # (N,)
    rows = (np.arange(H, dtype=np.float32) + 0.5) / H
    cols = (np.arange(W, dtype=np.float32) + 0.5) / W
    cy = (alpha.sum(axis=2) * rows).sum(axis=1) / mass
    cx = (alpha.sum(axis=1) * cols).sum(axis=1) / mass
    width = alpha.max(axis=1).sum(axis=1)  # sub-pixel extent from per-column max coverage
    height = alpha.max(axis=2).sum(axis=1)
    luma = bg @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return {
        "color": color,
        "area": mass / (H * W),
        "cx": cx,
        "cy": cy,
        "fill": mass / (width * height),
        "bg_luma": luma,
    }


def shape_from_fill(fill: float) -> str:
    """Rectangle ≈ 1, circle ≈ π/4, equilateral triangle ≈ 1/2 of the bounding box."""
    if fill > _FILL_RECTANGLE:
        return "rectangle"
    return "circle" if fill > _FILL_CIRCLE else "triangle"


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class ShapeRecord:
    """Raw measurements of one easy-vqa image; categorical labels are derived from these."""

    origin: str  # easy-vqa folder: "train" or "test"
    index: int
    path: str  # relative to the data folder
    question_shape: str | None
    question_color: str | None
    pixel_shape: str
    pixel_color: str
    area: float
    cx: float
    cy: float
    fill: float
    bg_luma: float

    @property
    def id(self) -> str:
        return f"shapes-{self.origin}-{self.index}"

    @property
    def shape(self) -> str:
        return self.question_shape or self.pixel_shape

    @property
    def color(self) -> str:
        return self.question_color or self.pixel_color


def _image_indices(image_dir: Path) -> list[int]:
    return sorted(int(p.stem) for p in image_dir.glob("*.png") if p.stem.isdigit())


def _measure_origin(data_dir: Path, origin: str) -> tuple[list[ShapeRecord], int]:
    facts, unparsed = parse_questions(data_dir / origin / "questions.json")
    indices = _image_indices(data_dir / origin / "images")
    records: list[ShapeRecord] = []
    for start in range(0, len(indices), _CHUNK):
        chunk = indices[start : start + _CHUNK]
        rel = [f"{origin}/images/{i}.png" for i in chunk]
        m = pixel_measurements(load_images([data_dir / r for r in rel]))
        for j, (index, path) in enumerate(zip(chunk, rel, strict=True)):
            image_facts = facts.get(index, [])
            records.append(
                ShapeRecord(
                    origin=origin,
                    index=index,
                    path=path,
                    question_shape=resolve_facts(image_facts, "shape"),
                    question_color=resolve_facts(image_facts, "color"),
                    pixel_shape=shape_from_fill(float(m["fill"][j])),
                    pixel_color=COLORS[int(m["color"][j])],
                    area=float(m["area"][j]),
                    cx=float(m["cx"][j]),
                    cy=float(m["cy"][j]),
                    fill=float(m["fill"][j]),
                    bg_luma=float(m["bg_luma"][j]),
                )
            )
    return records, unparsed


def data_fingerprint(data_dir: Path) -> str:
    """Hash of the question files and image listings, plus the table version."""
    h = hashlib.sha256(f"v{_TABLE_VERSION}".encode())
    for origin in ORIGINS:
        h.update((data_dir / origin / "questions.json").read_bytes())
        h.update(",".join(map(str, _image_indices(data_dir / origin / "images"))).encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def measure_table(data_dir: Path) -> tuple[tuple[ShapeRecord, ...], int]:
    """Every image's measurements (pooled, in (origin, index) order) and the unparsed count."""
    records: list[ShapeRecord] = []
    unparsed = 0
    for origin in ORIGINS:
        origin_records, origin_unparsed = _measure_origin(data_dir, origin)
        records += origin_records
        unparsed += origin_unparsed
    return tuple(records), unparsed


def load_table(data_dir: Path, cache_dir: Path | None = None) -> tuple[ShapeRecord, ...]:
    """The measurement table, from `cache_dir`'s JSON if it matches the data, else measured."""
    if cache_dir is None:
        return measure_table(data_dir)[0]
    cache_file = Path(cache_dir) / f"shapes-table-{data_fingerprint(data_dir)}.json"
    if cache_file.exists():
        try:
            return tuple(ShapeRecord(**row) for row in json.loads(cache_file.read_text()))
        except (ValueError, TypeError):
            pass  # unreadable or stale layout: measure again and overwrite
    records = measure_table(data_dir)[0]
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps([asdict(r) for r in records]))
    os.replace(tmp, cache_file)
    return records


# ----------------------------------------------------------------------------- the source


def holdout_score(example_id: str) -> float:
    """A uniform number in [0, 1) fixed by the id; below the holdout fraction → holdout."""
    digest = hashlib.sha256(example_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _label_thresholds(records: Sequence[ShapeRecord]) -> tuple[float, float]:
    """Pool medians of area fraction and background luma."""
    area = np.median([r.area for r in records])
    luma = np.median([r.bg_luma for r in records])
    return float(area), float(luma)


def _example(
    data_dir: Path, r: ShapeRecord, area_median: float, luma_median: float
) -> ImageExample:
    attributes: dict[str, str | int] = {
        "shape": r.shape,
        "color": r.color,
        "size": "large" if r.area > area_median else "small",
        "position_x": "left" if r.cx < 0.5 else "right",
        "position_y": "top" if r.cy < 0.5 else "bottom",
        "background": "light" if r.bg_luma > luma_median else "dark",
    }
    return ImageExample(
        id=r.id,
        image_path=data_dir / r.path,
        caption=f"a {r.color} {r.shape}",
        label=r.shape,
        attributes=attributes,
    )


class ShapesSource:
    """easy-vqa's shapes as `ImageExample`s with attributes, split into train / holdout.

    Args:
        cache_dir: where to keep the measured attribute table as JSON (optional; within a
            process the table is cached in memory either way).
        holdout_fraction: share of images, chosen by a hash of the id, in "holdout".
        data_dir: easy-vqa's `data/` folder; found through importlib when omitted.
    """

    name = "shapes"

    def __init__(
        self,
        cache_dir: Path | str | None = None,
        holdout_fraction: float = 0.1,
        data_dir: Path | str | None = None,
    ) -> None:
        if not 0.0 < holdout_fraction < 1.0:
            raise DataSourceError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}")
        self.data_dir = Path(data_dir) if data_dir is not None else find_data_dir()
        if data_dir is not None:
            check_data_dir(self.data_dir)
        self.holdout_fraction = holdout_fraction
        self.records = load_table(self.data_dir, Path(cache_dir) if cache_dir else None)
        area_median, luma_median = _label_thresholds(self.records)
        examples = [_example(self.data_dir, r, area_median, luma_median) for r in self.records]
        self._splits: dict[str, tuple[ImageExample, ...]] = {
            split: tuple(e for e in examples if self._split_of(e.id) == split) for split in SPLITS
        }

    def _split_of(self, example_id: str) -> str:
        return "holdout" if holdout_score(example_id) < self.holdout_fraction else "train"

    def splits(self) -> tuple[str, ...]:
        """("train", "holdout")."""
        return SPLITS

    def examples(self, split: str) -> Sequence[ImageExample]:
        """Every example of `split`, ordered by easy-vqa origin then image index."""
        if split not in self._splits:
            raise DataSourceError(
                f"unknown split {split!r} for source 'shapes'; valid splits: {list(SPLITS)}"
            )
        return self._splits[split]

"""The easy-vqa shapes source on the real package data (no mocks)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.data.base import DataSource, DataSourceError, ImageExample
from pipeline.data.shapes import (
    COLORS,
    PALETTE,
    SHAPES,
    ShapesSource,
    find_data_dir,
    measure_table,
    pixel_measurements,
    question_facts,
)

ATTRIBUTE_VALUES = {
    "shape": set(SHAPES),
    "color": set(COLORS),
    "size": {"large", "small"},
    "position_x": {"left", "right"},
    "position_y": {"top", "bottom"},
    "background": {"light", "dark"},
}


@pytest.fixture(scope="module")
def source() -> ShapesSource:
    return ShapesSource()


def all_examples(source: ShapesSource) -> list[ImageExample]:
    return [e for split in source.splits() for e in source.examples(split)]


# ----------------------------------------------------------------------------- questions

QUESTION_CASES = [
    ("does the image contain a rectangle?", "yes", [("shape", "rectangle", True)]),
    ("does the image not contain a gray shape?", "yes", [("color", "gray", False)]),
    ("does the image not contain a circle?", "no", [("shape", "circle", True)]),
    ("is there not a blue shape?", "no", [("color", "blue", True)]),
    ("is there not a triangle in the image?", "yes", [("shape", "triangle", False)]),
    ("is no teal shape present?", "no", [("color", "teal", True)]),
    ("is no circle present?", "yes", [("shape", "circle", False)]),
    ("is a yellow shape present?", "no", [("color", "yellow", False)]),
    ("is there a red shape in the image?", "yes", [("color", "red", True)]),
    ("what color is the shape?", "brown", [("color", "brown", True)]),
    (
        "what color is the triangle?",
        "black",
        [("color", "black", True), ("shape", "triangle", True)],
    ),
    (
        "what is the color of the circle?",
        "green",
        [("color", "green", True), ("shape", "circle", True)],
    ),
    (
        "what is the blue shape?",
        "rectangle",
        [("shape", "rectangle", True), ("color", "blue", True)],
    ),
    ("what shape does the image contain?", "circle", [("shape", "circle", True)]),
    ("what shape is present?", "triangle", [("shape", "triangle", True)]),
    ("what is this?", "circle", None),
]


@pytest.mark.parametrize("question,answer,facts", QUESTION_CASES)
def test_question_facts(question, answer, facts):
    assert question_facts(question, answer) == facts


def test_every_shipped_question_parses():
    _, unparsed = measure_table(find_data_dir())
    assert unparsed == 0, f"{unparsed} easy-vqa questions match no known template"


# ----------------------------------------------------------------------------- attributes


def test_question_and_pixel_attributes_agree(source):
    records = source.records
    assert len(records) == 5000
    for attribute in ("shape", "color"):
        determined = [r for r in records if getattr(r, f"question_{attribute}") is not None]
        disagree = [
            r.id
            for r in determined
            if getattr(r, f"question_{attribute}") != getattr(r, f"pixel_{attribute}")
        ]
        assert len(determined) >= 0.9 * len(records), (
            f"questions fix {attribute} for only {len(determined)}"
        )
        assert len(disagree) <= 0.01 * len(determined), (
            f"{attribute}: questions and pixels disagree on {len(disagree)} of {len(determined)} "
            f"images, e.g. {disagree[:5]}"
        )


def test_every_shape_colour_combination_appears(source):
    combos = Counter((e.attributes["shape"], e.attributes["color"]) for e in all_examples(source))
    missing = {(s, c) for s in SHAPES for c in COLORS} - set(combos)
    assert not missing, f"missing (shape, colour) combinations: {sorted(missing)}"


def test_attributes_take_known_values_and_medians_split_evenly(source):
    examples = all_examples(source)
    for e in examples:
        assert set(e.attributes) == set(ATTRIBUTE_VALUES), e.id
        for name, allowed in ATTRIBUTE_VALUES.items():
            assert e.attributes[name] in allowed, (e.id, name, e.attributes[name])
    for name, value in (("size", "large"), ("background", "light")):
        share = sum(e.attributes[name] == value for e in examples) / len(examples)
        assert 0.45 <= share <= 0.55, f"{name}={value} share {share:.3f}"


def test_captions_labels_and_images(source):
    for e in all_examples(source):
        assert e.caption == f"a {e.attributes['color']} {e.attributes['shape']}"
        assert e.label == e.attributes["shape"]
        assert e.id.startswith(("shapes-train-", "shapes-test-"))
    image = source.examples("holdout")[0].load_image()
    assert image.size == (64, 64) and image.mode == "RGB"


def check_drawn(
    shape: str, box: tuple[int, int, int, int], color: str, fill_range: tuple[float, float]
):
    background = (236, 247, 231)  # a tinted, not white, background
    im = Image.new("RGB", (128, 128), background)
    draw = ImageDraw.Draw(im)
    x0, y0, x1, y1 = box
    if shape == "rectangle":
        draw.rectangle([(x0, y0), (x1, y1)], fill=PALETTE[color])
    elif shape == "circle":
        draw.ellipse([(x0, y0), (x1, y1)], fill=PALETTE[color])
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=PALETTE[color])
    small = np.asarray(im.resize((64, 64), resample=Image.BILINEAR))[None]
    m = pixel_measurements(small)
    assert COLORS[int(m["color"][0])] == color
    assert fill_range[0] < m["fill"][0] < fill_range[1], (shape, m["fill"][0])
    assert abs(m["cx"][0] - (x0 + x1 + 1) / 256) < 0.03 or shape == "triangle"


def test_pixel_measurements_on_drawn_shapes():
    check_drawn("rectangle", (10, 20, 50, 40), "gray", (0.95, 1.05))
    check_drawn("circle", (70, 70, 110, 110), "yellow", (0.74, 0.86))
    check_drawn("triangle", (20, 60, 80, 112), "teal", (0.45, 0.65))


# ----------------------------------------------------------------------------- splits


def test_splits_disjoint_cover_and_deterministic(source, tmp_path):
    assert source.splits() == ("train", "holdout")
    ids = {split: [e.id for e in source.examples(split)] for split in source.splits()}
    train, holdout = set(ids["train"]), set(ids["holdout"])
    assert not train & holdout
    assert len(train | holdout) == len(source.records) == 5000
    assert 0.07 <= len(holdout) / 5000 <= 0.13, len(holdout)

    written = ShapesSource(cache_dir=tmp_path)  # measures (or reuses) and writes the JSON table
    assert len(list(tmp_path.glob("shapes-table-*.json"))) == 1
    from_json = ShapesSource(cache_dir=tmp_path)
    for other in (written, from_json):
        assert {s: [e.id for e in other.examples(s)] for s in other.splits()} == ids
        assert other.examples("train") == source.examples("train")


def test_unknown_split_lists_valid_ones(source):
    with pytest.raises(DataSourceError, match="valid splits: \\['train', 'holdout'\\]"):
        source.examples("test")


def test_bad_data_dir_says_what_is_there(tmp_path: Path):
    (tmp_path / "stray.txt").write_text("")
    with pytest.raises(DataSourceError, match="stray.txt"):
        ShapesSource(data_dir=tmp_path)


def test_is_a_data_source(source):
    assert isinstance(source, DataSource)
    assert source.name == "shapes"

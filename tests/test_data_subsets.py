"""A job's data: identity groups are fixed per group and skewed; class subsets hold their classes."""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline.data.base import DataSourceError
from pipeline.data.shapes import ShapesSource
from pipeline.data.subsets import class_of, group_profile, identity_group, job_examples


@pytest.fixture(scope="module")
def train():
    return ShapesSource().examples("train")


def test_identity_groups_are_deterministic_and_skewed(train):
    a = identity_group(train, 3, 20)
    assert [e.id for e in a] == [e.id for e in identity_group(train, 3, 20)]
    assert len({e.id for e in a}) == 20
    dominant = Counter(e.attributes["color"] for e in a).most_common(1)[0][0]
    profile = group_profile(3, sorted({e.attributes["color"] for e in train}), sorted({e.attributes["shape"] for e in train}))
    assert dominant == profile["color"]


def test_groups_differ_and_majority_colours_spread_over_the_palette(train):
    majorities = [Counter(e.attributes["color"] for e in identity_group(train, g, 20)).most_common(1)[0][0] for g in range(64)]
    assert len(set(majorities)) == 8
    assert {e.id for e in identity_group(train, 0, 20)} != {e.id for e in identity_group(train, 1, 20)}


def test_class_subsets_hold_exactly_their_classes(train):
    chosen = job_examples(train, {"kind": "class_subsets", "classes": ["red circle", "blue triangle"], "images_per_class": 5}, seed=1)
    assert Counter(class_of(e) for e in chosen) == {"red circle": 5, "blue triangle": 5}


def test_unknown_class_lists_the_known_ones(train):
    with pytest.raises(DataSourceError, match="known classes: .*red circle"):
        job_examples(train, {"kind": "class_subsets", "classes": ["purple star"], "images_per_class": 5}, seed=1)

"""Resolve a job's data descriptor (from `pipeline.jobs.draw_data`) into its examples.

- identity groups: group g has a profile — a dominant colour and shape, each with its own
  skew in [0.5, 0.95] — drawn from a hash of g alone, so every job of group g trains on the
  same images (the CelebA analog: one identity, many finetunes). Each of its `group_size`
  images takes the dominant colour with probability = colour skew, else any colour, and
  likewise for the shape.
- class subsets: `images_per_class` images of each chosen class, picked by the job's seed.
- source subsets: every example of the chosen sources, capped per source.
All choices are hash-seeded (`pipeline.jobs.unit_draw`), never dependent on listing order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from pipeline.data.base import DataSourceError, Example, ImageExample, QAExample
from pipeline.jobs import unit_draw

GROUP_SEED = 7_919  # the groups are a property of the data, not of any manifest seed


def _pick(items: Sequence, u: float):
    return items[min(int(u * len(items)), len(items) - 1)]


def group_profile(group: int, colors: Sequence[str], shapes: Sequence[str]) -> dict[str, Any]:
    """The dominant colour and shape of identity group `group`, with their skews."""
    return {
        "color": _pick(colors, unit_draw(GROUP_SEED, group, "color")),
        "shape": _pick(shapes, unit_draw(GROUP_SEED, group, "shape")),
        "color_skew": 0.5 + 0.45 * unit_draw(GROUP_SEED, group, "color_skew"),
        "shape_skew": 0.5 + 0.45 * unit_draw(GROUP_SEED, group, "shape_skew"),
    }


def identity_group(examples: Sequence[ImageExample], group: int, group_size: int) -> list[ImageExample]:
    """The `group_size` images of group `group` (distinct while the pool allows).

    A group larger than the data is refused (DataSourceError: the job fails with the reason)
    rather than drawn slot by slot: it cannot hold more distinct images than there are.
    """
    if not 1 <= group_size <= len(examples):
        raise DataSourceError(f"data.subsets.group_size is {group_size:,}, but the split holds {len(examples):,} images: "
                              f"a group holds 1..{len(examples):,} distinct images; lower group_size")
    by_kind: dict[tuple[str, str], list[ImageExample]] = defaultdict(list)
    for example in examples:
        by_kind[(str(example.attributes["color"]), str(example.attributes["shape"]))].append(example)
    colors = sorted({c for c, _ in by_kind})
    shapes = sorted({s for _, s in by_kind})
    profile = group_profile(group, colors, shapes)
    chosen: list[ImageExample] = []
    used: set[str] = set()
    for slot in range(group_size):
        color = profile["color"] if unit_draw(GROUP_SEED, group, f"slot{slot}:c") < profile["color_skew"] else _pick(colors, unit_draw(GROUP_SEED, group, f"slot{slot}:anyc"))
        shape = profile["shape"] if unit_draw(GROUP_SEED, group, f"slot{slot}:s") < profile["shape_skew"] else _pick(shapes, unit_draw(GROUP_SEED, group, f"slot{slot}:anys"))
        pool = by_kind.get((color, shape)) or [e for e in examples if e.attributes["color"] == color]
        fresh = [e for e in pool if e.id not in used] or pool
        pick = _pick(fresh, unit_draw(GROUP_SEED, group, f"slot{slot}:img"))
        used.add(pick.id)
        chosen.append(pick)
    return chosen


def class_of(example: ImageExample) -> str:
    """An image's class name as manifests write it: the caption without its article."""
    return example.caption.removeprefix("a ").removeprefix("an ")


def class_subset(examples: Sequence[ImageExample], classes: Sequence[str], images_per_class: int, seed: int) -> list[ImageExample]:
    by_class: dict[str, list[ImageExample]] = defaultdict(list)
    for example in examples:
        by_class[class_of(example)].append(example)
    chosen = []
    for name in classes:
        pool = by_class.get(name)
        if not pool:
            raise DataSourceError(f"class {name!r} has no images; known classes: {', '.join(sorted(by_class))}")
        ranked = sorted(pool, key=lambda e: unit_draw(seed, 0, f"class:{e.id}"))
        chosen.extend(ranked[:images_per_class])
    return chosen


def source_subset(examples: Sequence[QAExample], sources: Sequence[str], per_source: int | None, seed: int) -> list[QAExample]:
    by_source: dict[str, list[QAExample]] = defaultdict(list)
    for example in examples:
        by_source[example.source].append(example)
    unknown = [s for s in sources if s not in by_source]
    if unknown:
        raise DataSourceError(f"unknown source(s) {unknown}; known: {', '.join(sorted(by_source))}")
    chosen = []
    for name in sources:
        pool = by_source[name]
        if per_source is not None:
            pool = sorted(pool, key=lambda e: unit_draw(seed, 0, f"source:{e.id}"))[:per_source]
        chosen.extend(pool)
    return chosen


def job_examples(examples: Sequence[Example], descriptor: dict[str, Any], seed: int) -> list[Example]:
    """The training examples of one job, given its source's examples of `descriptor['split']`."""
    kind = descriptor["kind"]
    if kind == "identity_groups":
        chosen = identity_group(examples, descriptor["group"], descriptor["group_size"])  # type: ignore[arg-type]
    elif kind == "class_subsets":
        chosen = class_subset(examples, descriptor["classes"], descriptor["images_per_class"], seed)  # type: ignore[arg-type]
    elif kind == "source_subsets":
        chosen = source_subset(examples, descriptor["sources"], descriptor.get("examples_per_source"), seed)  # type: ignore[arg-type]
    else:
        raise DataSourceError(f"unknown subset kind {kind!r}; valid: identity_groups, class_subsets, source_subsets")
    if not chosen:
        raise DataSourceError(f"the job's data subset is empty: {descriptor}")
    return chosen

"""The protocol's splits: a group's split depends on its name alone, so populations sharing groups agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lol_models.splits import PROTOCOL_FRACTIONS, group_split
from lol_models.tasks import load_splits


def write_population(folder, groups: list[str], published_split) -> None:
    """A published folder of rank-1 LoRAs (one 3×2 layer), one per group, published splits chosen by `published_split`."""
    import datasets

    from lol_models.published import flatten, make_layout
    from pipeline.publish import in_memory_dataset

    rng = np.random.default_rng(0)
    rows, vectors = [], []
    for k, group in enumerate(groups):
        factors = {"layer": (rng.normal(size=(1, 2)).astype(np.float32), rng.normal(size=(3, 1)).astype(np.float32))}
        layout = make_layout(factors, 1)
        vectors.append(flatten(factors, layout))
        rows.append({"job_id": f"job{k}", "group": group, "rank": 1, "alpha": 1.0, "score.value": float(k),
                     "split": published_split(k)})
    weights = np.stack(vectors)
    splits = {}
    for name in ("train", "validation", "test"):
        index = [i for i, r in enumerate(rows) if r["split"] == name]
        if index:
            splits[name] = in_memory_dataset([rows[i] for i in index], weights[index])
    datasets.DatasetDict(splits).save_to_disk(str(folder / "arrow"))
    (folder / "layout.json").write_text(json.dumps(layout))
    (folder / "labels.json").write_text(json.dumps({"score.value": {"scorer": "score", "scorer_id": "s", "label": "value"}}))


def test_group_split_is_a_fixed_function_of_the_name_with_the_protocol_fractions():
    names = [f"group:{k}" for k in range(4000)]
    splits = [group_split(n) for n in names]
    assert splits == [group_split(n) for n in names]
    for name, fraction in PROTOCOL_FRACTIONS.items():
        assert splits.count(name) / len(names) == pytest.approx(fraction, abs=0.025)
    # pinned: a change here moves groups between splits of every population (bump SPLIT_SALT instead)
    assert [group_split(f"group:{k}") for k in range(8)] == [
        "validation", "train", "validation", "validation", "test", "validation", "train", "validation"]


def test_populations_published_with_other_fractions_and_seeds_get_the_same_group_splits(tmp_path):
    groups = [f"group:{k}" for k in range(60)]
    a, b = tmp_path / "a", tmp_path / "b"
    write_population(a, groups, lambda k: ("train", "validation", "test")[k % 3])
    write_population(b, groups[::-1] + groups[:20], lambda k: "test" if k % 5 == 0 else "train")  # derived: other splits
    split_a, split_b = load_splits(a), load_splits(b)
    for name in ("train", "validation", "test"):
        assert set(split_a[name].groups) == {g for g in groups if group_split(g) == name}
        assert set(split_b[name].groups) == set(split_a[name].groups)
        assert not set(split_a[name].groups) & {g for other in ("train", "validation", "test") if other != name
                                                for g in split_b[other].groups}
    test_rows = split_a["test"]
    assert [float(v) for v in test_rows.labels["score.value"]] == [float(groups.index(g)) for g in test_rows.groups]
    published = load_splits(a, split="published")
    assert len(published["validation"]) == 20


def test_too_few_groups_is_a_clear_error(tmp_path):
    from lol_models.data import PulledDataError

    write_population(tmp_path, ["group:0", "group:1"], lambda k: "train")
    with pytest.raises(PulledDataError, match="too few"):
        load_splits(tmp_path)

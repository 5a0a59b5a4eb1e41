"""Transfer: predictors trained on one published population, scored on another of the same layers."""

from __future__ import annotations

import json

import pytest
from published_format import BIG, NORM, gl_population, write_published

from lol_models.data import PulledDataError
from lol_models.tasks import LearnSettings
from lol_models.transfer import train_on_a_test_on_b

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"glnet": {"hidden": (8,), "head": (32,)}, "mlp": {"hidden": (32,)}}
SETTINGS = LearnSettings(predictors=("mlp", "glnet"), seeds=2, epochs=40, batch_size=32, learning_rate=1e-2)


@pytest.fixture(scope="module")
def populations(tmp_path_factory):
    """A: 300 rank-2 LoRAs; B: 100 other LoRAs of ranks 2 and 4 (same layers, same label), without attributes."""
    root = tmp_path_factory.mktemp("transfer")
    a = write_published(root / "a", *gl_population([2], 300, seed=0), {**NORM, **BIG})
    b = write_published(root / "b", *gl_population([2, 4], 50, seed=1), NORM)
    return a, b


def test_trained_on_a_scored_on_b_and_on_a(populations, tmp_path):
    a, b = populations
    result = train_on_a_test_on_b(a, b, SETTINGS, tmp_path, model_configs=SMALL, split="published")
    assert result.rows == {"train": 180, "validation": 60, "a_test": 60, "b_test": 20}
    assert set(result.tasks) == {"clip_score.clip_score"}
    assert "lacks label column(s) ['attributes.big']" in result.skipped_tasks["attributes"]

    gl_a, _ = result.metric("clip_score.clip_score", "glnet", "a_test")
    gl_b, _ = result.metric("clip_score.clip_score", "glnet", "b_test")
    mlp_b, _ = result.metric("clip_score.clip_score", "mlp", "b_test")
    print(f"R² glnet on A {gl_a:.3f}, on B {gl_b:.3f}; mlp on B {mlp_b:.3f}")
    assert gl_a > 0.7 and gl_b > 0.7 and mlp_b < gl_b

    saved = json.loads(result.results_path.read_text())
    assert saved["published_a"] == str(a) and saved["published_b"] == str(b)
    record = saved["tasks"]["clip_score.clip_score"]["predictors"]["glnet"]
    assert {t: record["tests"][t]["n"] for t in ("a_test", "b_test")} == {"a_test": 60, "b_test": 20}
    assert [s["seed"] for s in record["per_seed"]] == [0, 1]
    ci = record["tests"]["b_test"]["ci"]["r2"]  # paired bootstrap over B's test LoRAs
    assert ci["low"] <= ci["value"] <= ci["high"] and ci["value"] == pytest.approx(gl_b)
    difference = saved["tasks"]["clip_score.clip_score"]["difference"]["b_test"]
    assert difference["reference"] == "glnet" and set(difference["vs"]) == {"mlp"}
    assert record["selection"] is None  # a given config is not tuned
    assert record["tests"]["b_test"]["mean"]["kendall_tau"] == pytest.approx(
        sum(s["tests"]["b_test"]["kendall_tau"] for s in record["per_seed"]) / 2)
    assert result.figure_path.stat().st_size > 5000


def test_populations_with_different_layers_are_refused(populations, tmp_path):
    a, _ = populations
    other = write_published(tmp_path / "c", *gl_population([2], 10, seed=3, shapes={"block.0.to_q": (6, 9)}), NORM)
    with pytest.raises(PulledDataError, match="do not have .* layers.*different \\(n, m\\)|missing layers"):
        train_on_a_test_on_b(a, other, SETTINGS, tmp_path / "out", split="published")


def test_b_published_with_only_its_protocol_test_groups_is_enough(populations, tmp_path):
    """A population built with `execution.only_splits: [test]` (only the LoRAs a transfer test reads)
    publishes a test split alone; under the protocol split that is B's whole test set."""
    from lol_models.split_rule import group_split

    a, _ = populations
    factors, rows = gl_population([2], 150, seed=3)
    kept = [i for i, row in enumerate(rows) if group_split(row["group"]) == "test"]
    b = write_published(tmp_path / "b-test-only", [factors[i] for i in kept], [{**rows[i], "split": "test"} for i in kept], NORM)
    result = train_on_a_test_on_b(a, b, SETTINGS, tmp_path / "out", model_configs=SMALL)
    assert 10 <= result.rows["b_test"] == len(kept)
    gl_b, _ = result.metric("clip_score.clip_score", "glnet", "b_test")
    assert gl_b > 0.5, gl_b

"""Rank generalisation on a published multi-rank population: GL-net reads a rank it never saw."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest
from conftest import ROOT
from published_format import BIG, NORM, gl_population, write_published

from lol_models.data import PulledDataError
from lol_models.rank_generalisation import rank_generalisation, split_ranks
from lol_models.tasks import LearnSettings
from pipeline.jobs import expand
from pipeline.manifest import Manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"glnet": {"hidden": (8,), "head": (32,)}, "mlp": {"hidden": (32,)}}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """600 LoRAs, 200 each of ranks 1, 2 and 4; label = ‖ΔW‖_F of one layer (GL-invariant, rank-agnostic)."""
    factors, rows = gl_population([1, 2, 4], 200, seed=0)
    return write_published(tmp_path_factory.mktemp("ranks"), factors, rows, {**NORM, **BIG})


def test_glnet_generalises_to_an_unseen_rank_where_a_flat_mlp_does_not(published, tmp_path):
    settings = LearnSettings(predictors=("mlp", "glnet"), seeds=2, epochs=60, batch_size=32, learning_rate=1e-2)
    result = rank_generalisation(published, settings, tmp_path, model_configs=SMALL, split="published")
    assert (result.ranks, result.train_ranks, result.test_ranks) == ([1, 2, 4], [1, 2], [4])
    assert result.rows == {"train": 240, "validation": 80, "seen": 80, "unseen": 40}

    gl_seen, _ = result.metric("clip_score.clip_score", "glnet", "seen")
    gl_unseen, gl_std = result.metric("clip_score.clip_score", "glnet", "unseen")
    mlp_unseen, _ = result.metric("clip_score.clip_score", "mlp", "unseen")
    print(f"R² glnet seen {gl_seen:.3f}, unseen {gl_unseen:.3f} ± {gl_std:.3f}; mlp unseen {mlp_unseen:.3f}")
    assert gl_seen > 0.7 and gl_unseen > 0.7
    assert mlp_unseen < gl_unseen - 0.4
    assert result.metric("attributes", "glnet", "unseen")[0] > 0.8  # ROC-AUC of the multilabel task

    saved = json.loads(result.results_path.read_text())
    assert saved["train_ranks"] == [1, 2] and saved["test_ranks"] == [4]
    assert saved["rows_per_split_and_rank"]["test"] == {"1": 40, "2": 40, "4": 40}
    record = saved["tasks"]["clip_score.clip_score"]["predictors"]["glnet"]
    assert len(record["per_seed"]) == 2 and record["tests"]["unseen"]["n"] == 40
    assert record["tests"]["unseen"]["mean"]["r2"] == pytest.approx(gl_unseen)
    per_seed = [s["tests"]["unseen"]["r2"] for s in record["per_seed"]]
    assert gl_unseen == pytest.approx(sum(per_seed) / 2)
    assert result.figure_path.stat().st_size > 5000


def test_configs_can_be_chosen_on_a_training_rank_held_out_of_selection(published, tmp_path, monkeypatch):
    import lol_models.shift as shift

    seen = []

    def recording(predictor, kind, train, validation, settings):
        seen.append((len(train), len(validation), train.weights.rank))
        return select_config(predictor, kind, train, validation, settings)

    select_config = shift.select_config
    monkeypatch.setattr(shift, "select_config", recording)
    settings = LearnSettings(predictors=("glnet",), targets=("clip_score.clip_score",), seeds=1, epochs=2, batch_size=32,
                             tuning_budget=2, selection_seeds=1, min_epochs=1, smooth_epochs=1)
    result = rank_generalisation(published, settings, tmp_path, train_ranks=[1, 2], test_ranks=[4],
                                 split="published", select_on_rank=2)
    # configs trained on the 120 rank-1 train rows, scored on the 40 rank-2 validation rows; the final runs
    # train on both ranks' 240 rows (every set padded to rank 4)
    assert seen == [(120, 40, 4)]
    assert result.rows == {"train": 240, "validation": 80, "seen": 80, "unseen": 40,
                           "selection_train": 120, "selection_validation": 40}
    saved = json.loads(result.results_path.read_text())
    assert saved["select_on_rank"] == 2
    record = saved["tasks"]["clip_score.clip_score"]["predictors"]["glnet"]
    assert len(record["selection"]["trials"]) == 2 and record["tests"]["unseen"]["n"] == 40
    # two worker processes give the same selection and the same test metrics as one process
    parallel = rank_generalisation(published, dataclasses.replace(settings, predictors=("glnet", "mlp")), tmp_path / "two",
                                   train_ranks=[1, 2], test_ranks=[4], split="published", select_on_rank=2, workers=2)
    assert len(seen) == 1  # selection ran in the workers, not here
    again = json.loads(parallel.results_path.read_text())["tasks"]["clip_score.clip_score"]["predictors"]["glnet"]
    assert again["selection"]["chosen"] == record["selection"]["chosen"]
    assert again["tests"]["unseen"]["mean"]["r2"] == pytest.approx(record["tests"]["unseen"]["mean"]["r2"], abs=1e-3)
    with pytest.raises(PulledDataError, match="select_on_rank 4 must be one of ≥ 2 training ranks \\[1, 2\\]"):
        rank_generalisation(published, settings, tmp_path, train_ranks=[1, 2], test_ranks=[4], split="published",
                            select_on_rank=4)


def test_rank_sets_default_to_all_but_the_largest_and_are_checked():
    assert split_ranks([4, 2, 16, 8, 2]) == ([2, 4, 8], [16])
    assert split_ranks([2, 4, 8, 16], train_ranks=[2], test_ranks=[8, 16]) == ([2], [8, 16])
    assert split_ranks([2, 4, 8, 16], test_ranks=[2]) == ([4, 8, 16], [2])
    with pytest.raises(PulledDataError, match="not in this dataset; it has ranks \\[2, 4\\]"):
        split_ranks([2, 4], train_ranks=[2], test_ranks=[16])
    with pytest.raises(PulledDataError, match="share \\[4\\]"):
        split_ranks([2, 4, 8], train_ranks=[2, 4], test_ranks=[4, 8])


def test_a_single_rank_dataset_is_refused_with_its_rank(tmp_path):
    factors, rows = gl_population([4], 20, seed=1)
    folder = write_published(tmp_path / "one-rank", factors, rows, NORM)
    with pytest.raises(PulledDataError, match="rank generalisation needs ≥ 2 ranks; this dataset has only rank 4"):
        rank_generalisation(folder, LearnSettings(predictors=("glnet",), seeds=1, epochs=1), tmp_path / "out", split="published")


def test_too_few_unseen_rows_are_reported_per_split_and_rank(tmp_path):
    factors, rows = gl_population([2, 4], 5, seed=2)  # one rank-4 LoRA per split
    folder = write_published(tmp_path / "few", factors, rows, NORM)
    with pytest.raises(PulledDataError, match="too few rows .*'unseen': 1"):
        rank_generalisation(folder, LearnSettings(predictors=("glnet",), seeds=1, epochs=1), tmp_path / "out", split="published")


def test_the_ranks_manifest_draws_every_rank_and_otherwise_tiny_shapes_jobs():
    ranks = list(expand(Manifest.from_yaml(ROOT / "manifests" / "tiny-shapes-ranks.yaml")))
    shapes = list(expand(Manifest.from_yaml(ROOT / "manifests" / "tiny-shapes.yaml")))
    counts = Counter(job.spec.rank for job in ranks)
    assert set(counts) == {2, 4, 8, 16} and min(counts.values()) >= 60, counts
    assert split_ranks(counts) == ([2, 4, 8], [16])  # the experiment's defaults for this population
    for a, b in zip(ranks, shapes):
        assert (a.spec.data, a.spec.hyperparameters, a.spec.seed) == (b.spec.data, b.spec.hyperparameters, b.spec.seed)

"""The protocol of `lol train`: the same tuning budget for every predictor, selection on validation only,
no test label read and no test metric computed before `lol evaluate`."""

from __future__ import annotations

import inspect
import json

import pytest
from published_format import BIG, NORM, gl_population, write_published

from lol_models.data import LoraDataset
from lol_models.experiments import evaluate, train_all
from lol_models.protocol import select_config
from lol_models.registry import MODELS
from lol_models.search import Candidate, SearchSpace, candidates
from lol_models.splits import group_split
from lol_models.tasks import LearnSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = LearnSettings(predictors=("mlp", "glnet_paper", "glnet"), seeds=2, epochs=6, batch_size=32,
                         learning_rate=3e-3, tuning_budget=3, selection_seeds=1, min_epochs=2, smooth_epochs=2)
TEST_KEYS = {"test_predictions", "test_job_ids"}  # what a run may hold about the test split: inputs' outputs, ids


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """120 rank-2 LoRAs, one group each; label ‖ΔW‖_F of one layer and a binary attribute."""
    return write_published(tmp_path_factory.mktemp("protocol"), *gl_population([2], 120, seed=0), {**NORM, **BIG})


def keys(value, found: set[str] | None = None) -> set[str]:
    """Every dict key anywhere in a JSON value."""
    found = set() if found is None else found
    if isinstance(value, dict):
        for k, v in value.items():
            found.add(k)
            keys(v, found)
    elif isinstance(value, list):
        for v in value:
            keys(v, found)
    return found


def test_train_holds_no_test_label_so_selection_cannot_reach_one(published, tmp_path, monkeypatch):
    """`lol train`'s units see the test split's weights and ids, never its labels (dropped at load): a unit that
    chose configs on the test labels — here, by passing them off as the validation set — fails."""
    from lol_models import experiments
    from lol_models.tasks import labeled_for

    context = experiments._UnitContext.load(published, SETTINGS)
    test = context.splits["test"]
    assert test.labels == {} and len(test.job_ids) > 0 and test.weights.batch_size == len(test.job_ids)
    assert context.splits["validation"].labels  # the other splits keep theirs

    def validation_from_the_test_split(dataset, task):  # what a leak would do
        return labeled_for(context.splits["test"] if dataset is context.splits["validation"] else dataset, task)

    monkeypatch.setattr(experiments, "labeled_for", validation_from_the_test_split)
    with pytest.raises(Exception, match="unknown target"):
        experiments._train_unit(context, tmp_path, experiments.tasks_of(context.splits["train"], SETTINGS.targets)[0], "mlp")


def test_train_reads_no_test_label_and_writes_no_test_metric(published, tmp_path, monkeypatch):
    real_targets = LoraDataset.targets
    touched = []

    def guarded(self, names):
        if any(group_split(g) == "test" for g in self.groups):
            touched.append(names)
            raise AssertionError(f"test labels {names} read during lol train")
        return real_targets(self, names)

    monkeypatch.setattr(LoraDataset, "targets", guarded)
    written = train_all(published, SETTINGS, tmp_path)
    assert not touched and len(written) == 3 * 2
    for path in written:
        run = json.loads(path.read_text())
        test_keys = {k for k in keys(run) if "test" in k.lower()}
        assert test_keys == TEST_KEYS, (path.name, test_keys)
        assert not {k for k in keys(run["selection"]) if "test" in k.lower()}
        # the same budget for everyone, each from its own space, the defaults first
        trials = run["selection"]["trials"]
        assert len(trials) == SETTINGS.tuning_budget and trials[0]["candidate"] == {"model": {}, "train": {}}
        space = MODELS[run["predictor"]].search
        assert all(set(t["candidate"]["model"]) <= set(space.model) for t in trials)
        best = max(range(len(trials)), key=lambda i: trials[i]["val_score"])
        assert run["selection"]["chosen"] == best
        assert len(run["test_predictions"]) == SETTINGS.seeds
    paper = json.loads((tmp_path / "runs" / "glnet_paper--clip_score.clip_score.json").read_text())
    assert paper["config"]["model"]["readout"] == "mean"  # the authors' regression head
    paper = json.loads((tmp_path / "runs" / "glnet_paper--attributes.json").read_text())
    assert paper["config"]["model"]["readout"] == "full"

    monkeypatch.setattr(LoraDataset, "targets", real_targets)
    results = evaluate(tmp_path)  # the test split, read once
    cell = results.tasks["attributes"]["predictors"]["glnet_paper"]
    assert set(cell["ci"]) == {"roc_auc", "accuracy"} and len(cell["per_seed"]) == SETTINGS.seeds
    attributes = results.tasks["attributes"]  # and the same intervals resampling whole test groups (one LoRA each here)
    assert attributes["n_test_groups"] == attributes["n_test"] == attributes["difference_by_group"]["groups"]
    assert set(attributes["difference_by_group"]["vs"]) == {"mlp", "glnet_paper"} and set(cell["ci_by_group"]) == set(cell["ci"])
    assert "resampling whole test groups" in (tmp_path / "results.md").read_text()
    assert len(cell["test_predictions_all_seeds"]) == SETTINGS.seeds  # later analyses need not retrain

    from dataclasses import replace

    from lol_models import evaluation

    read_split = evaluation._test_split

    def in_pairs(published_folder, split, cache):  # the same test LoRAs, two to a group
        test = read_split(published_folder, split, cache)
        return replace(test, groups=[f"pair-{k // 2}" for k in range(len(test.job_ids))])

    monkeypatch.setattr(evaluation, "_test_split", in_pairs)
    paired = evaluate(tmp_path).tasks["attributes"]
    pairs = (paired["n_test"] + 1) // 2
    assert paired["n_test_groups"] == paired["difference_by_group"]["groups"] == pairs < paired["n_test"]


def test_selection_takes_no_test_split():
    assert list(inspect.signature(select_config).parameters) == ["predictor", "kind", "train", "validation", "settings"]


def test_candidates_are_the_defaults_then_distinct_seeded_draws():
    space = SearchSpace({"hidden": ((8,), (16,), (32,))}, {"lr": (1e-3, 3e-3)})
    drawn = candidates(space, 4, seed=0)
    assert drawn[0] == Candidate() and len({c.key() for c in drawn}) == 4
    assert [c.key() for c in drawn] == [c.key() for c in candidates(space, 4, seed=0)]
    with pytest.raises(ValueError, match="cannot fill a budget of 8"):
        candidates(space, 8)
    with pytest.raises(ValueError, match="unknown training settings"):
        SearchSpace(train={"epochs": (10, 20)})


def test_every_registered_space_fills_the_default_budget():
    for name, spec in MODELS.items():
        assert spec.search.size >= LearnSettings().tuning_budget - 1, name


def test_a_test_split_too_small_to_score_is_reported_not_a_crash(tmp_path):
    factors, rows = gl_population([2], 30, seed=2)
    names = iter(f"g{k}" for k in range(10_000))
    test_one = next(n for n in names if group_split(n) == "test")
    others = [n for n in names if group_split(n) != "test"][:len(rows) - 1]
    for row, group in zip(rows, [test_one, *others]):
        row["group"] = group
    folder = write_published(tmp_path / "one-test", factors, rows, NORM)
    settings = LearnSettings(predictors=("mlp",), seeds=1, epochs=2, tuning_budget=1)
    train_all(folder, settings, tmp_path / "out")
    record = evaluate(tmp_path / "out").tasks["clip_score.clip_score"]["predictors"]["mlp"]
    assert "holds 1 LoRA(s)" in record["error"]
    assert "holds 1 LoRA" in (tmp_path / "out" / "results.md").read_text()


def test_worker_processes_train_the_runs_one_process_trains(published, tmp_path, monkeypatch):
    """`train_all(workers=2)`: the same run files, the same choices, the same test predictions (up to
    float rounding), in the same order; a unit that fails in a worker fails the call."""
    import dataclasses
    import gc
    import os
    import weakref

    import numpy as np

    import lol_models.experiments as experiments

    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # one torch thread per worker, as this process has
    settings = dataclasses.replace(SETTINGS, predictors=("mlp", "glnet"), seeds=1, epochs=4, tuning_budget=2)
    alone = train_all(published, settings, tmp_path / "one")
    seen, loaded, load, run_units = [], [], experiments._UnitContext.load, experiments.run_units

    def load_and_watch(*args):
        context = load(*args)
        loaded.extend(weakref.ref(split) for split in context.splits.values())
        return context

    def run_units_after_the_parent_let_go(*args, **kwargs):  # the workers load their own splits: the parent's are freed
        gc.collect()
        assert loaded and all(ref() is None for ref in loaded)
        return run_units(*args, **kwargs)

    monkeypatch.setattr(experiments._UnitContext, "load", load_and_watch)
    monkeypatch.setattr(experiments, "run_units", run_units_after_the_parent_let_go)
    parallel = train_all(published, settings, tmp_path / "two", workers=2, on_run=lambda p, t: seen.append((p, t)))
    assert [p.name for p in parallel] == [p.name for p in alone] and len(alone) == 4 and len(seen) == 4
    for a, b in zip(alone, parallel):
        a, b = json.loads(a.read_text()), json.loads(b.read_text())
        assert a["selection"]["chosen"] == b["selection"]["chosen"] and a["test_job_ids"] == b["test_job_ids"]
        np.testing.assert_allclose(b["test_predictions"], a["test_predictions"], rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyError, match="no_such_predictor"):
        train_all(published, dataclasses.replace(settings, predictors=("mlp", "no_such_predictor")), tmp_path / "bad", workers=2)


def test_parallel_units_start_dearest_first():
    """Longest-processing-time order: GL-net and MLP+Dense units start before the MLPs, so the unit left running alone
    at the end is a cheap one; equal costs keep their order."""
    from lol_models.parallel import submission_order

    predictors = ["mlp", "mlp_svd", "glnet", "transformer", "mlp_dense", "glnet_paper"]
    order = submission_order([MODELS[p].unit_cost for p in predictors], len(predictors))
    assert [predictors[i] for i in order] == ["glnet", "mlp_dense", "transformer", "glnet_paper", "mlp", "mlp_svd"]
    assert submission_order(None, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="2 costs for 3 units"):
        submission_order([1.0, 2.0], 3)


def test_an_interrupted_train_goes_on_where_it_stopped(published, tmp_path, monkeypatch):
    """Units already trained with the same settings on the same rows, every seed saved, are kept; a changed
    setting, a missing model file or `resume=False` trains them again."""
    import dataclasses

    import lol_models.experiments as experiments

    settings = dataclasses.replace(SETTINGS, predictors=("mlp", "glnet"), seeds=1, epochs=3, tuning_budget=1)
    first = train_all(published, settings, tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in first}
    trained = []
    real = experiments._train_unit
    monkeypatch.setattr(experiments, "_train_unit", lambda c, o, task, p: trained.append((p, task.name)) or real(c, o, task, p))
    again = train_all(published, settings, tmp_path)
    assert again == first and trained == [] and {p.name: p.stat().st_mtime_ns for p in again} == stamps
    train_all(published, dataclasses.replace(settings, predictors=("glnet",), targets=("attributes",)), tmp_path)
    assert trained == []  # a narrower run keeps them too
    next((tmp_path / "predictors").glob("glnet--attributes--seed0.safetensors")).unlink()
    train_all(published, settings, tmp_path)
    assert trained == [("glnet", "attributes")]
    trained.clear()
    train_all(published, dataclasses.replace(settings, epochs=4), tmp_path)
    assert len(trained) == 4
    trained.clear()
    train_all(published, dataclasses.replace(settings, epochs=4), tmp_path, resume=False)
    assert len(trained) == 4
    trained.clear()  # a predictor whose defaults or search space changed tries other configs: only it is trained again
    from lol_models.registry import MODELS

    monkeypatch.setitem(MODELS, "glnet", dataclasses.replace(MODELS["glnet"], task_defaults={
        "regression": {"head_norm": True}, "multilabel": {"head_norm": True}}))
    train_all(published, dataclasses.replace(settings, epochs=4), tmp_path)
    assert sorted(trained) == [("glnet", "attributes"), ("glnet", "clip_score.clip_score")]
    trained.clear()  # a widened search with a budget of one config tries the same (default) config: nothing retrains
    train_all(published, dataclasses.replace(settings, epochs=4, search={"glnet": {"scale_free": (False, True)}}), tmp_path)
    assert trained == []


def test_a_widened_search_draws_its_configs_for_that_predictor_only(published):
    """`learn.search` adds fields to one predictor's space: its tuning pool and selection draw them, the budget and
    every other predictor's pool stay as they were."""
    import dataclasses

    from lol_models.protocol import tuning_pool
    from lol_models.tasks import load_splits
    from lol_models.train import LabeledLoras

    wide = dataclasses.replace(SETTINGS, tuning_budget=6, search={"glnet": {"scale_free": (True,), "spectral_filters": ((1, 2),)}})
    plain = dataclasses.replace(SETTINGS, tuning_budget=6)
    configs = [c["model"] for c in tuning_pool("glnet", "regression", wide)["configs"]]
    assert len(configs) == 6 and not configs[0]["scale_free"] and configs[0]["spectral_filters"] == ()  # the defaults first
    assert all(c["scale_free"] and c["spectral_filters"] == (1, 2) for c in configs[1:])
    assert not any(c["model"]["scale_free"] for c in tuning_pool("glnet", "regression", plain)["configs"])
    assert tuning_pool("mlp", "regression", wide) == tuning_pool("mlp", "regression", plain)
    splits = load_splits(published)
    train, validation = (LabeledLoras(splits[s].weights, splits[s].targets(["clip_score.clip_score"]))
                         for s in ("train", "validation"))
    selection = select_config("glnet", "regression", train, validation,
                              dataclasses.replace(wide, tuning_budget=2, epochs=2, min_epochs=1, smooth_epochs=1))
    assert [t["candidate"]["model"].get("scale_free") for t in selection.trials] == [None, True]


@pytest.mark.parametrize(("search", "message"), [
    ({"glnet": {"sclae_free": [True]}}, "'sclae_free' is neither a config field of glnet"),
    ({"glnet": {"spectral_filters": [[0.5]]}}, r"spectral_filters: the choice \(0.5,\) is not valid: .*powers p ≥ 1"),
    ({"glnet": {"scale_free": []}}, "non-empty list of choices"),
    ({"glnet": {"dropout": [0.1, 0.1]}}, "choices repeat"),
    ({"glnet": {"dropout": [0, 0.0]}}, "choices repeat"),  # the same number, written twice
    ({"glnet": {"scale_free": ["false"]}}, "'false' is not valid; the field takes true or false"),
    ({"mlp": {"hidden": [64, 128]}}, r"64 is not valid; the field takes a list, e.g. \[64, 64\]"),
    ({"glnet": {"head": [64]}}, "the field takes a list"),
    ({"mlp": {"lr": [-1.0]}}, r"lr must be > 0"),
    ({"mlp": {"lr": [0]}}, r"lr must be > 0"),
    ({"mlp": {"lr": [float("inf")]}}, "takes a finite number"),
    ({"mlp": {"lr": ["fast"]}}, "'fast' is not valid; the field takes a number"),
    ({"mlp": {"batch_size": [0]}}, "batch_size must be ≥ 1"),
    ({"mlp": {"batch_size": [12.5]}}, "takes a whole number"),
    ({"transformer": {"nhead": [32]}}, "nhead"),  # clashes with every d_model of the space
    ({"glnet": {"dropout": [0.0], "hidden": [[16]], "head": [[64]], "spectral_moments": [0], "head_norm": [False],
                "normalize_input": [False], "lr": [1e-3], "weight_decay": [1e-2]}}, "cannot fill a budget of 8"),
])
def test_a_bad_widened_search_is_refused_before_training_with_what_is_valid(search, message):
    from lol_models.common import SettingsError
    from lol_models.protocol import tuning_pool
    from lol_models.registry import check_search

    settings = LearnSettings(search=search)
    with pytest.raises(SettingsError, match=message):
        check_search(search, settings.tuning_budget, lambda p, kind: tuning_pool(p, kind, settings))


def test_a_widened_search_takes_yaml_values_as_its_fields_hold_them():
    """YAML's 1e-3 (text), ints for float fields and grad_clip null become what the configs hold."""
    from lol_models.registry import space_for
    from lol_models.search import TRAIN_DEFAULTS
    from lol_models.train import TrainConfig

    assert TRAIN_DEFAULTS == {k: getattr(TrainConfig(task="regression"), k) for k in TRAIN_DEFAULTS}
    space = space_for("mlp", {"lr": ["1e-3", 3e-3], "weight_decay": [0], "grad_clip": [None, 1], "batch_size": [32.0]})
    assert space.train == {"lr": (1e-3, 3e-3), "weight_decay": (0.0,), "grad_clip": (None, 1.0), "batch_size": (32,)}
    assert space_for("glnet", {"spectral_filters": [[], [1, 2]]}).model["spectral_filters"] == ((), (1, 2))


def test_a_budget_larger_than_one_predictors_space_is_that_units_error(published, tmp_path, monkeypatch):
    import dataclasses

    from lol_models.registry import MODELS
    from lol_models.search import SearchSpace

    monkeypatch.setitem(MODELS, "glnet", dataclasses.replace(MODELS["glnet"], search=SearchSpace({"dropout": (0.0,)})))
    settings = dataclasses.replace(SETTINGS, predictors=("mlp", "glnet"), targets=("attributes",), seeds=1, epochs=3)
    runs = {p.name: json.loads(p.read_text()) for p in train_all(published, settings, tmp_path)}
    assert "cannot fill a budget of 3" in runs["glnet--attributes.json"]["error"]
    assert "error" not in runs["mlp--attributes.json"] and len(runs["mlp--attributes.json"]["tuning"]["configs"]) == 3

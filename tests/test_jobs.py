"""Job expansion: deterministic, prefix-stable, content-addressed."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.jobs import (
    expand,
    job_at,
    planned_count,
    planned_job_ids,
    shard,
    spec_values,
    unit_draw,
)
from pipeline.manifest import Manifest

TINY = (ROOT / "manifests" / "tiny-shapes.yaml").read_text()
ARC = (ROOT / "manifests" / "tiny-arc.yaml").read_text()
MEMBERSHIP = (ROOT / "manifests" / "tiny-shapes-membership.yaml").read_text()


def manifest(text: str = TINY, **overrides) -> Manifest:
    return Manifest.from_text(text, overrides=[f"{k}={json.dumps(v)}" for k, v in overrides.items()])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 20), extra=st.integers(0, 20),
       text=st.sampled_from([TINY, ARC, MEMBERSHIP]))
def test_growing_count_keeps_the_first_jobs_identical(seed, n, extra, text):
    small = [j.spec.canonical_json() for j in expand(manifest(text, seed=seed, count=n))]
    large = [j.spec.canonical_json() for j in expand(manifest(text, seed=seed, count=n + extra))]
    assert large[:n] == small


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(0, 10_000))
def test_job_k_is_a_function_of_content_seed_and_k(seed, k):
    a = job_at(manifest(seed=seed), k)
    b = job_at(manifest(seed=seed, count=1, publish={"split_seed": 9}, scorers=[]), k)
    assert a.spec == b.spec and a.job_id == b.job_id


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(0, 10_000))
def test_drawn_values_lie_in_their_distributions(seed, k):
    spec = job_at(manifest(ARC, seed=seed), k).spec
    hp = spec.hyperparameters
    low, high = yaml.safe_load(ARC)["hyperparameters"]["learning_rate"]["loguniform"]  # the manifest's own range
    assert low <= hp["learning_rate"] <= high and 1e-6 <= hp["weight_decay"] <= 1e-2
    assert hp["epochs"] in (1, 2, 3) and hp["batch_size"] in (8, 16, 32)
    assert 0.0 <= spec.lora_dropout <= 0.1
    sources = spec.data["sources"]
    assert 1 <= len(sources) <= 6 and len(set(sources)) == len(sources)


def test_different_seeds_give_different_populations():
    a = [j.job_id for j in expand(manifest(count=20, seed=0))]
    b = [j.job_id for j in expand(manifest(count=20, seed=1))]
    assert len(set(a)) == 20 and not set(a) & set(b)


def test_job_id_changes_with_any_job_relevant_field():
    base = job_at(manifest(), 3).job_id
    assert job_at(manifest(**{"lora.alpha": 8}), 3).job_id != base
    assert job_at(manifest(**{"lora.target_modules": ["to_q"]}), 3).job_id != base
    assert job_at(manifest(**{"base.revision": "abc"}), 3).job_id != base
    assert job_at(manifest(**{"hyperparameters.batch_size": 2}), 3).job_id != base
    assert job_at(manifest(**{"population.description": "other words"}), 3).job_id == base


def test_adding_a_hyperparameter_does_not_shift_the_others():
    before = job_at(manifest(), 5).spec.hyperparameters
    after = job_at(manifest(**{"hyperparameters.weight_decay": {"uniform": [0, 0.1]}}), 5).spec.hyperparameters
    assert {k: after[k] for k in before} == before


def test_distributions_cover_their_support():
    jobs = list(expand(manifest(count=400)))
    lrs = {j.spec.hyperparameters["learning_rate"] for j in jobs}
    assert lrs == {1e-4, 3e-4, 1e-3, 3e-3}
    groups = {j.spec.data["group"] for j in jobs}
    assert len(groups) > 120 and max(groups) < 160
    sizes = [len(j.spec.data["classes"]) for j in expand(manifest(MEMBERSHIP, count=400))]
    assert min(sizes) == 1 and max(sizes) == 10


def test_unit_draw_is_uniform_enough():
    draws = [unit_draw(0, k, "x") for k in range(4000)]
    assert all(0 <= d < 1 for d in draws)
    assert math.isclose(sum(draws) / len(draws), 0.5, abs_tol=0.02)


def test_mixed_ranks_are_drawn_per_job():
    ranks = {j.spec.rank for j in expand(manifest(count=60, **{"lora.rank": [2, 4, 8]}))}
    assert ranks == {2, 4, 8}


def test_shard_partitions_jobs():
    jobs = list(expand(manifest(count=10)))
    parts = [shard(jobs, f"{i}/3") for i in (1, 2, 3)]
    assert sorted(j.index for p in parts for j in p) == list(range(10))
    with pytest.raises(ValueError, match="i/n"):
        shard(jobs, "4/3")


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "manifests").glob("*.yaml")))
def test_planned_ids_without_the_models_are_the_expanded_jobs_ids(name):
    """`planned_job_ids` (what `lol status` uses) builds no pydantic models: its values must be the
    models' own JSON, for every shipped manifest, mixed ranks and class / source subsets included."""
    manifest = Manifest.from_yaml(ROOT / "manifests" / f"{name}.yaml", overrides=["count=60"])
    jobs = list(expand(manifest))
    assert planned_job_ids(manifest) == [job.job_id for job in jobs]
    assert all(spec_values(manifest, job.index) == job.spec.model_dump(mode="json") for job in jobs[:10])
    assert planned_job_ids(manifest, limit=7) == [job.job_id for job in jobs[:7]]


def test_alpha_per_rank_keeps_the_update_scale_the_same_at_every_rank():
    m = manifest(**{"lora.alpha": None, "lora.alpha_per_rank": 2, "lora.rank": [1, 2, 4, 8, 16, 32]}, count=60)
    jobs = list(expand(m))
    assert {job.spec.rank for job in jobs} == {1, 2, 4, 8, 16, 32}
    assert all(job.spec.alpha == 2.0 * job.spec.rank for job in jobs)
    assert planned_job_ids(m) == [job.job_id for job in jobs]
    fixed = list(expand(manifest(count=60)))  # alpha alone: the ids of manifests without the new fields stay
    assert all(job.spec.alpha == 4.0 for job in fixed)


@pytest.mark.parametrize("alphas", [{}, {"lora.alpha": 4, "lora.alpha_per_rank": 1}])
def test_exactly_one_of_alpha_and_alpha_per_rank(alphas):
    from pipeline.manifest import ManifestError

    with pytest.raises(ManifestError, match="exactly one of alpha"):
        manifest(**{"lora.alpha": None, **alphas})


def test_lora_init_is_a_hyperparameter_only_where_set():
    plain = job_at(manifest(), 0)
    chosen = job_at(manifest(**{"hyperparameters.lora_init": "peft_default"}), 0)
    assert "lora_init" not in plain.spec.hyperparameters and chosen.spec.hyperparameters["lora_init"] == "peft_default"
    assert chosen.job_id != plain.job_id
    from pipeline.manifest import ManifestError

    with pytest.raises(ManifestError, match="lora_init"):
        manifest(**{"hyperparameters.lora_init": "kaiming"})


@pytest.mark.parametrize("name", ["tiny-shapes", "tiny-arc", "tiny-shapes-membership"])
def test_only_splits_plans_the_jobs_of_those_splits_as_publish_splits_them(name):
    """`execution.only_splits` keeps each planned job's index and id, plans exactly the jobs whose
    group publish puts in those splits, and the three splits together are the whole population."""
    from pipeline.publish import group_key, split_of

    text = (ROOT / "manifests" / f"{name}.yaml").read_text()
    full = manifest(text, count=300)
    split = {job.job_id: split_of(group_key(job), dict(full.publish.splits), full.publish.split_seed) for job in expand(full)}
    parts = {}
    for wanted in (["test"], ["train", "validation"]):
        only = manifest(text, count=300, execution={"only_splits": wanted})
        jobs = list(expand(only))
        assert [j.job_id for j in jobs] == [j.job_id for j in expand(full) if split[j.job_id] in wanted]
        assert all(job_at(full, j.index).job_id == j.job_id for j in jobs)
        assert planned_job_ids(only) == [j.job_id for j in jobs] and planned_count(only) == len(jobs)
        assert planned_job_ids(only, limit=20) == [j.job_id for j in jobs[:20]] == [j.job_id for j in expand(only, limit=20)]
        assert planned_count(only, limit=20) == min(20, len(jobs))  # --limit N: the first N planned jobs
        parts[tuple(wanted)] = {j.job_id for j in jobs}
    assert 0 < len(parts[("test",)]) < 150 and parts[("test",)] | parts[("train", "validation")] == set(split)


def test_only_splits_naming_a_split_without_a_share_is_refused():
    with pytest.raises(ValueError, match=r"only_splits.*'validation' holds no group.*train, test"):
        manifest(execution={"only_splits": ["validation"]}, publish={"splits": {"train": 0.8, "test": 0.2}})

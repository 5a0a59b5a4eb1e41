"""Prefect flows wrap the library stages: same store results, resumable, artifacts published."""

from __future__ import annotations

import pytest
from conftest import ROOT

from pipeline.jobs import expand
from pipeline.manifest import Manifest
from pipeline.score import scorer_id
from storage import Store

SHAPES = ROOT / "manifests" / "tiny-shapes.yaml"
STAGES = ["finetune", "score", "publish"]  # 3 LoRAs are too few to learn on; test_lol_experiments covers learn


def overrides(base):
    return [f"base.ref={base}", "count=3", "hyperparameters.steps=1", "hyperparameters.batch_size=1",
            "data.subsets.num_groups=3", "scorers=[{name: attributes, attributes: [shape=circle]}]",
            "publish.splits={train: 0.34, validation: 0.33, test: 0.33}"]


@pytest.fixture(scope="module")
def flow_run(prefect_harness, random_sd, tmp_path_factory):
    from flows.population import run_population

    store = str(tmp_path_factory.mktemp("store"))
    first = run_population(str(SHAPES), overrides(random_sd), store, retries=0, stages=STAGES)
    return store, first, overrides(random_sd)


def test_run_population_finetunes_scores_and_publishes(flow_run):
    store, results, extra = flow_run
    manifest = Manifest.from_yaml(SHAPES, overrides=extra)
    population = Store(store).population(manifest.population.name)
    assert results["finetune"] == {"trained": 3}
    sid = scorer_id(manifest.scorers[0])
    assert all(population.is_done(j.job_id, verify=True) and population.has_score(j.job_id, sid) for j in expand(manifest))
    assert results["publish"]["excluded"] == 0 and sum(results["publish"]["rows"].values()) == 3


def test_rerun_does_only_what_is_missing(flow_run):
    from flows.population import run_population

    store, _, extra = flow_run
    again = run_population(str(SHAPES), extra, store, retries=0, stages=STAGES)
    assert again["finetune"] == {"already done": 3} and again["score"] == {"already scored": 3}


def test_stages_publish_markdown_artifacts(flow_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def keys():
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="tiny-shapes")))
            by_key: dict[str, list[str]] = {}
            for artifact in found:
                by_key.setdefault(artifact.key, []).append(artifact.data)
            return by_key

    import asyncio

    artifacts = asyncio.run(keys())
    assert {"finetune-tiny-shapes", "score-tiny-shapes", "publish-tiny-shapes"} <= set(artifacts)
    assert any("| trained | 3 |" in text for text in artifacts["finetune-tiny-shapes"])
    assert any("| already done | 3 |" in text for text in artifacts["finetune-tiny-shapes"])
    assert any("| attributes/shape=circle | 3 |" in text for text in artifacts["score-tiny-shapes"])  # label statistics


@pytest.mark.slow
def test_two_worker_processes_store_what_one_process_stores(flow_run, tmp_path):
    """`workers=2`: tasks run in two local processes; the same LoRAs and labels land in the store."""
    import torch
    from safetensors.torch import load

    from flows.population import run_population

    store, _, extra = flow_run
    parallel = str(tmp_path / "parallel")
    results = run_population(str(SHAPES), extra, parallel, retries=0, stages=["finetune", "score"], workers=2)
    assert results["finetune"] == {"trained": 3} and results["score"] == {"scored": 3}
    manifest = Manifest.from_yaml(SHAPES, overrides=extra)
    sid = scorer_id(manifest.scorers[0])
    one, two = Store(store).population(manifest.population.name), Store(parallel).population(manifest.population.name)
    workers = set()
    for job in expand(manifest):
        assert two.is_done(job.job_id, verify=True)
        assert one.read_score(job.job_id, sid)["labels"] == two.read_score(job.job_id, sid)["labels"]
        a = load(one.store.read_bytes(one.job_rel(job.job_id, "adapter", "adapter_model.safetensors")))
        b = load(two.store.read_bytes(two.job_rel(job.job_id, "adapter", "adapter_model.safetensors")))
        assert a.keys() == b.keys()
        for key in a:  # same seed, same weights (up to the reduction order of the process's thread count)
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
        workers.add(two.record(job.job_id)["metrics"]["worker"])
    assert len(workers) == 2  # both processes took jobs


def test_workers_without_a_process_pool_is_refused(prefect_harness, random_sd, tmp_path):
    from flows.population import finetune_population

    with pytest.raises(ValueError, match="ProcessPoolTaskRunner"):
        finetune_population(str(SHAPES), overrides(random_sd), str(tmp_path / "s"), retries=0, workers=2)
    assert not list((tmp_path / "s").rglob("record.json"))

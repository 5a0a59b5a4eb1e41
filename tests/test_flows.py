"""Prefect flows wrap the library stages: same store results, resumable, artifacts published."""

from __future__ import annotations

import pytest
from conftest import ROOT, check_same_job_adapters

from pipeline.jobs import expand
from pipeline.manifest import Manifest
from pipeline.score import scorer_id
from storage import Store

SHAPES = ROOT / "manifests" / "tiny-shapes.yaml"
STAGES = ["finetune", "score", "publish"]  # 3 LoRAs are too few to learn on; test_lol_experiments covers learn


def overrides(base):
    # 4 steps: past Adam's first step (≈ lr·sign(g)), where one flipped sign is a whole step's difference
    return [f"base.ref={base}", "count=3", "hyperparameters.steps=4", "hyperparameters.batch_size=1",
            "data.subsets.num_groups=3", "scorers=[{name: attributes, attributes: [shape=circle]}]",
            "publish.splits={train: 0.34, validation: 0.33, test: 0.33}", "publish.split_seed=0"]


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
    """`workers=2`: tasks run in two local processes (cohorts of 2 and 1 instead of one of 3).

    What a job promises across cohort compositions and processes (docs/cohorts.md): the same
    inputs bit for bit (spec, hence data subset, seeds, hyperparameters), the same data-derived
    labels, and adapters equal within the measured relative bound — not equal bits.
    """
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
    jobs = list(expand(manifest))

    def adapter(population, job):
        return load(population.store.read_bytes(population.job_rel(job.job_id, "adapter", "adapter_model.safetensors")))

    for k, job in enumerate(jobs):
        assert two.is_done(job.job_id, verify=True)
        assert one.read_spec(job.job_id) == two.read_spec(job.job_id)  # the job's inputs, bit for bit
        assert one.read_score(job.job_id, sid)["labels"] == two.read_score(job.job_id, sid)["labels"]  # from its data
        other = jobs[(k + 1) % len(jobs)]
        check_same_job_adapters(adapter(two, job), adapter(one, job), others=adapter(one, other))
        workers.add(two.record(job.job_id)["metrics"]["worker"])
    assert len(workers) == 2  # both processes took jobs


def test_workers_without_a_process_pool_is_refused(prefect_harness, random_sd, tmp_path):
    from flows.population import finetune_population

    with pytest.raises(ValueError, match="ProcessPoolTaskRunner"):
        finetune_population(str(SHAPES), overrides(random_sd), str(tmp_path / "s"), retries=0, workers=2)
    assert not list((tmp_path / "s").rglob("record.json"))

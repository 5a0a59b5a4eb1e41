"""One orchestration core: `lol finetune` (the library's runner) and `lol run` (the Prefect flow)
plan, train and settle claimed jobs through the same functions, so they treat a job that another
worker holds the same way: waited for, taken over when the claim expires, reported when it does not."""

from __future__ import annotations

import pytest
from conftest import ROOT

from pipeline.finetune.diffusion import DiffusionTrainer
from pipeline.finetune.runner import Outcome, finetune_population
from pipeline.jobs import expand
from pipeline.manifest import Manifest
from storage import Store

SHAPES = ROOT / "manifests" / "tiny-shapes.yaml"


def overrides(base) -> list[str]:
    return [f"base.ref={base}", "count=2", "hyperparameters.steps=1", "hyperparameters.batch_size=1",
            "data.subsets.num_groups=2", "execution.cohort_size=1"]


def held_by_another_worker(store: Store, manifest: Manifest, lease_s: float) -> str:
    """Claim the first job as another worker; returns its id."""
    job = next(iter(expand(manifest)))
    assert store.population(manifest.population.name).claim(job.job_id, "another-host-1234", lease_s) is not None
    return job.job_id


def outcomes_of_lol_finetune(manifest, store, busy_wait_s) -> dict[str, int]:
    summary = finetune_population(manifest, store, DiffusionTrainer, busy_wait_s=busy_wait_s)
    counts = {Outcome.TRAINED.value: len(summary.trained), Outcome.CLAIMED_ELSEWHERE.value: summary.busy}
    return {k: v for k, v in counts.items() if v}


def outcomes_of_lol_run(manifest_overrides, store, busy_wait_s) -> dict[str, int]:
    from flows.population import finetune_population as finetune_flow

    return finetune_flow(str(SHAPES), manifest_overrides, store.url, retries=0, busy_wait_s=busy_wait_s)


@pytest.mark.parametrize("path", ["lol finetune", "lol run"])
def test_a_claim_of_a_live_worker_is_waited_for_then_reported(path, prefect_harness, random_sd, tmp_path):
    manifest = Manifest.from_yaml(SHAPES, overrides=overrides(random_sd))
    store = Store(str(tmp_path / "store"))
    held = held_by_another_worker(store, manifest, lease_s=600)
    if path == "lol finetune":
        outcomes = outcomes_of_lol_finetune(manifest, store, busy_wait_s=1.0)
    else:
        outcomes = outcomes_of_lol_run(overrides(random_sd), store, busy_wait_s=1.0)
    assert outcomes == {"trained": 1, "claimed by another worker": 1}
    assert store.population(manifest.population.name).record(held) is None


@pytest.mark.parametrize("path", ["lol finetune", "lol run"])
def test_a_dead_workers_claim_is_taken_over_once_it_expires(path, prefect_harness, random_sd, tmp_path):
    manifest = Manifest.from_yaml(SHAPES, overrides=overrides(random_sd))
    store = Store(str(tmp_path / "store"))
    held = held_by_another_worker(store, manifest, lease_s=3.0)  # never renewed: the worker is gone
    if path == "lol finetune":
        outcomes = outcomes_of_lol_finetune(manifest, store, busy_wait_s=60)
    else:
        outcomes = outcomes_of_lol_run(overrides(random_sd), store, busy_wait_s=60)
    assert outcomes == {"trained": 2}
    assert store.population(manifest.population.name).is_done(held, verify=True)

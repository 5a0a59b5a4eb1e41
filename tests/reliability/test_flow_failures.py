"""Through Prefect: a task that keeps failing is retried `retries` times (no more), then the flow
reports its jobs as failed with the reason and finishes the others, instead of failing the run."""

from __future__ import annotations

import pytest

from pipeline.jobs import expand
from pipeline.manifest import Manifest

from .conftest import SHAPES, smoke_overrides


@pytest.mark.slow
def test_a_failing_task_is_retried_a_bounded_number_of_times_and_the_flow_goes_on(prefect_harness, random_sd, tmp_path,
                                                                                   monkeypatch):
    import flows.population as flows_module

    overrides = smoke_overrides(random_sd, "count=3", "data.subsets.num_groups=3", "execution.cohort_size=1")
    victim = next(expand(Manifest.from_yaml(SHAPES, overrides=overrides)))
    attempts = []
    real_run_jobs = flows_module.run_jobs

    def run_jobs(population, jobs, *args):
        if jobs[0].job_id == victim.job_id:
            attempts.append(victim.job_id)
            raise RuntimeError("the worker lost its GPU")
        return real_run_jobs(population, jobs, *args)

    monkeypatch.setattr(flows_module, "run_jobs", run_jobs)
    monkeypatch.setattr(flows_module, "DEFAULT_RETRY_DELAY_S", 0)
    outcomes = flows_module.finetune_population(str(SHAPES), overrides, str(tmp_path / "store"), retries=2)
    assert len(attempts) == 3  # the first attempt and two retries
    failed = {outcome: n for outcome, n in outcomes.items() if outcome != "trained"}
    assert outcomes["trained"] == 2 and list(failed.values()) == [1], outcomes
    assert next(iter(failed)).startswith("task failed after 3 attempt(s)") and "lost its GPU" in next(iter(failed))

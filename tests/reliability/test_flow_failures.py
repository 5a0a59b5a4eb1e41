"""Through Prefect: a task that keeps failing is retried `retries` times (no more), then the flow
reports its jobs as failed with the reason and finishes the others, instead of failing the run."""

from __future__ import annotations

import pytest
from prefect import flow as flow_decorator
from prefect import task as task_decorator

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


def _api_error(status: int, path: str = "/api/task_runs/"):
    """The error Prefect's client raises once its own retries are spent on an answer `status`."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    request = httpx.Request("POST", f"http://127.0.0.1:4200{path}")
    response = httpx.Response(status, request=request, json={"exception_message": "Service Unavailable"})
    return PrefectHTTPStatusError.from_httpx_error(
        httpx.HTTPStatusError(f"Server error '{status}' for url '{request.url}'", request=request, response=response))


def test_api_unavailable_means_the_orchestration_failed_not_the_work(monkeypatch):
    import httpx
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError

    from flows.api_retries import TaskDidNotRun, api_unavailable

    assert api_unavailable(_api_error(503)) and api_unavailable(_api_error(429)) and api_unavailable(_api_error(500))
    assert not api_unavailable(_api_error(404)) and not api_unavailable(_api_error(409))
    assert api_unavailable(ConcurrencySlotAcquisitionError("Unable to acquire concurrency slots on ['tag:gpu']"))
    assert api_unavailable(TaskDidNotRun("task did not run"))
    from prefect.settings import get_current_settings

    api = get_current_settings().api.url or "http://127.0.0.1:4200/api"  # the test session's server, if it has one
    monkeypatch.setenv("PREFECT_API_URL", api)
    assert api_unavailable(httpx.ConnectError("refused", request=httpx.Request("GET", f"{api}/health")))
    # the work's own downloads are not the API: a model hub that cannot be reached fails the job
    assert not api_unavailable(httpx.ConnectError("refused", request=httpx.Request("GET", "https://huggingface.co/api/models/x")))
    assert not api_unavailable(RuntimeError("non-finite loss")) and not api_unavailable(KeyboardInterrupt())
    try:
        try:
            raise _api_error(503)
        except Exception as inner:
            raise RuntimeError("task run could not be created") from inner
    except RuntimeError as outer:
        assert api_unavailable(outer)  # found where it was raised from


def test_a_503_crosses_a_process_boundary_as_itself():
    """Errors of pool workers reach the flow pickled; PrefectHTTPStatusError alone could not be rebuilt
    (its base class takes keyword-only arguments), so flows.api_retries registers it with copyreg."""
    import pickle

    import cloudpickle

    from flows.api_retries import api_unavailable

    for dumps in (pickle.dumps, cloudpickle.dumps):
        again = pickle.loads(dumps(_api_error(503)))
        assert again.response.status_code == 503 and "/api/task_runs/" in str(again.request.url) and api_unavailable(again)


def test_with_api_retries_repeats_a_refused_call_within_one_shared_outage(monkeypatch):
    import flows.api_retries as api_retries

    monkeypatch.setattr(api_retries, "API_RETRY_FIRST_PAUSE_S", 0.01)
    answers = [_api_error(503), _api_error(503), "done"]

    def call():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert api_retries.with_api_retries(call, "a unit") == "done" and not answers
    outage, calls = api_retries.ApiOutage(budget_s=0.05), []

    def always_refused():
        calls.append(1)
        raise _api_error(503)

    with pytest.raises(Exception, match="503"):
        api_retries.with_api_retries(always_refused, "unit 1", outage)
    assert 2 <= len(calls) <= 6  # 0.01, 0.02, then the rest of 0.05 s
    calls.clear()
    with pytest.raises(Exception, match="503"):  # the outage outlasted the budget: the next unit fails at once
        api_retries.with_api_retries(always_refused, "unit 2", outage)
    assert calls == [1]
    assert api_retries.with_api_retries(lambda: "back", "unit 3", outage) == "back"  # the API is back: the clock stops
    calls.clear()
    with pytest.raises(Exception, match="503"):
        api_retries.with_api_retries(always_refused, "unit 4", outage)
    assert len(calls) >= 2
    calls.clear()
    with pytest.raises(Exception, match="503"):  # a stage whose body had started is not run again
        api_retries.with_api_retries(always_refused, "a stage", repeat_if=lambda: False)
    assert calls == [1]
    failures = []

    def fails():
        failures.append(1)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        api_retries.with_api_retries(fails, "a unit")
    assert failures == [1]  # the work's own failure is not repeated here (the task's retries are Prefect's)


@pytest.mark.parametrize("value", ["nan", "-1", "soon", "inf"])
def test_a_bad_retry_budget_is_a_clear_error(monkeypatch, value):
    from flows.api_retries import retry_budget_s

    monkeypatch.setenv("LOL_API_RETRY_S", value)
    with pytest.raises(ValueError, match=r"LOL_API_RETRY_S=.*finite number ≥ 0"):
        retry_budget_s()


@pytest.mark.slow
def test_pool_workers_unit_the_api_refused_runs_again(prefect_harness, tmp_path, monkeypatch):
    """With workers > 1 a unit's error comes back from a worker process: a 503 there is recognised and
    the unit is submitted again; a unit that fails for its own reason is reported, not repeated."""
    import flows.api_retries as api_retries
    import flows.population as flows_module

    monkeypatch.setattr(api_retries, "API_RETRY_FIRST_PAUSE_S", 0.01)
    monkeypatch.setenv("LOL_REFUSE_ONCE", str(tmp_path / "refused"))

    @flow_decorator(name="pool-units")
    def units():
        return flows_module._run_units(_refused_once_task, ["u0", "u1", "u2"], [0, 1, 2], 0, 2)

    with flows_module._worker_environment(2):
        results = units.with_options(task_runner=flows_module._task_runner(2))()
    assert (tmp_path / "refused").exists()
    assert results[0] == ([0], None) and results[1] == ([10], None), results
    assert results[2][0] is None and "ValueError: unit 2 is bad" in results[2][1]


@pytest.mark.slow
def test_a_stage_and_a_task_the_api_refused_run_again_and_every_job_is_trained(prefect_harness, random_sd, tmp_path,
                                                                                monkeypatch):
    """The failure of issue #19's 8-worker SQLite bench, at its two places: the API answers 503 to the
    creation of the finetune stage's subflow (as it did there, POST /api/task_runs/ for the subflow's
    tracking task run, after the client's own retries), and a cohort task fails on a 503 with no
    Prefect retry left. Both are run again; every job is trained once and none is reported failed."""
    from prefect.tasks import Task

    import flows.api_retries as api_retries
    import flows.population as flows_module

    monkeypatch.setattr(api_retries, "API_RETRY_FIRST_PAUSE_S", 0.01)
    overrides = smoke_overrides(random_sd, "count=3", "data.subsets.num_groups=3", "execution.cohort_size=1")
    victim = next(expand(Manifest.from_yaml(SHAPES, overrides=overrides)))
    refused_stages, refused_tasks, trained = [], [], []
    real_create_run, real_run_jobs = Task.create_run, flows_module.run_jobs

    async def create_run(self, *args, **kwargs):
        if getattr(self, "_is_subflow_tracking_task", False) and self.name == "finetune_population" and not refused_stages:
            refused_stages.append(self.name)
            raise _api_error(503)
        return await real_create_run(self, *args, **kwargs)

    def run_jobs(population, jobs, *args):
        if jobs[0].job_id == victim.job_id and not refused_tasks:
            refused_tasks.append(victim.job_id)
            raise _api_error(503, "/api/artifacts/")
        trained.extend(job.job_id for job in jobs)
        return real_run_jobs(population, jobs, *args)

    monkeypatch.setattr(Task, "create_run", create_run)
    monkeypatch.setattr(flows_module, "run_jobs", run_jobs)
    results = flows_module.run_population(str(SHAPES), overrides, str(tmp_path / "store"), retries=0, stages=["finetune"])
    assert refused_stages == ["finetune_population"] and refused_tasks == [victim.job_id]
    assert results["finetune"] == {"trained": 3}, results
    assert sorted(trained) == sorted({*trained}) and len(trained) == 3  # the refused task trained nothing


@task_decorator(name="refused-once")
def _refused_once_task(unit: int) -> list[int]:
    """Unit 1 is refused with a 503 the first time (a marker file records it); unit 2 always fails."""
    import os

    marker = os.environ["LOL_REFUSE_ONCE"]
    if unit == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        raise _api_error(503, "/api/artifacts/")
    if unit == 2:
        raise ValueError("unit 2 is bad")
    return [unit * 10]

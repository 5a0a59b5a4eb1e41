"""Injected failures in real workers: an exception in one job, a non-finite loss, out of memory
in every job, a scorer crash, a full disk (a size-limited tmpfs, and a write quota), a store
whose writes fail at random. Each time the worker ends normally, every failure is recorded with
its reason, no job is tried more than the runner's bound, and a rerun without the fault
completes the population. (bench.faults.scenarios; `lol bench faults` runs the same.)"""

from __future__ import annotations

import pytest

from bench.faults.lab import VARIANTS
from bench.faults.scenarios import run_scenarios

from .conftest import TRIALS, check_trials


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["job-exception", "non-finite-loss", "out-of-memory"])
def test_a_failing_job_fails_alone_with_its_reason_and_retries_are_bounded(fault_lab, scenario):
    trials = run_scenarios(fault_lab, [scenario], TRIALS)
    check_trials(scenario, trials)
    assert {t.variant for t in trials} == set(VARIANTS)


@pytest.mark.slow
def test_a_scorer_crash_leaves_the_other_labels_and_a_rerun_adds_the_missing(fault_lab):
    check_trials("scorer-crash", run_scenarios(fault_lab, ["scorer-crash"], TRIALS))


@pytest.mark.slow
@pytest.mark.parametrize("mount", [True, False], ids=["tmpfs", "quota"])
def test_a_full_disk_fails_what_does_not_fit_and_a_rerun_completes(fault_lab, mount, monkeypatch):
    monkeypatch.setattr(fault_lab, "mount", mount)
    trials = run_scenarios(fault_lab, ["full-disk"], TRIALS)
    check_trials(f"full-disk-{'tmpfs' if mount else 'quota'}", trials)
    assert all(t.details["failed_first"] for t in trials), "the disk never filled up"
    if not mount:
        assert {t.details["disk"] for t in trials} == {"quota"}


@pytest.mark.slow
def test_a_store_failing_a_tenth_of_its_writes_fails_jobs_alone_and_a_rerun_completes(fault_lab):
    trials = run_scenarios(fault_lab, ["flaky-store"], TRIALS)
    check_trials("flaky-store", trials)
    assert sum(t.details["failed_writes"] for t in trials)

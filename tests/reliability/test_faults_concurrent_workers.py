"""Two and four finetuning processes on one population at once, in cohorts and one job at a
time: every job is trained exactly once — trainings counted by the trainer as they begin, not
by records — and the population is complete. (bench.faults.scenarios.concurrent_trial.)"""

from __future__ import annotations

import pytest

from bench.faults.lab import VARIANTS
from bench.faults.scenarios import run_scenarios

from .conftest import TRIALS, check_trials


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["concurrent-2", "concurrent-4"])
def test_concurrent_workers_train_every_job_exactly_once(fault_lab, scenario):
    trials = run_scenarios(fault_lab, [scenario], TRIALS)
    check_trials(scenario, trials)
    assert {t.variant for t in trials} == set(VARIANTS)
    assert all(t.details["trainings"] == t.details["planned"] for t in trials)
    assert any(t.details["workers_that_trained"] > 1 for t in trials), "one worker did everything: no race was tested"

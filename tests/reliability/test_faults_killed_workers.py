"""Finetuning workers SIGKILLed at seeded random moments (cohorts and one job at a time): after
their claims expire, a rerun completes the population — every job one verified record, the
rerun trained exactly what was not committed, no temporary file, claim or staging folder left.
The scenario is bench.faults.scenarios.kill_trial (also run by `lol bench faults`)."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.faults.lab import VARIANTS
from bench.faults.scenarios import run_scenarios

from .conftest import TRIALS, check_trials


@pytest.mark.slow
def test_workers_killed_at_random_moments_leave_what_a_rerun_completes(fault_lab):
    trials = run_scenarios(fault_lab, ["kill"], TRIALS or 10)
    check_trials("killed-workers", trials)
    assert len(trials) >= 10 and {t.variant for t in trials} == set(VARIANTS)
    assert sum(t.outcome.startswith("killed while training or committing") for t in trials) >= len(trials) // 2, \
        Counter(t.outcome for t in trials)
    assert sum(t.details["claims_left_by_the_dead"] for t in trials), "no kill left a live claim to expire"

"""The fault scenarios' results: one row per scenario and variant, and a JSON file of every trial."""

from __future__ import annotations

import json
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.faults.scenarios import SCENARIOS, Trial

RESULTS_DIR = Path("bench/results")


@dataclass
class Row:
    scenario: str
    title: str
    variant: str
    trials: int
    held: int  # trials in which every promise held
    outcomes: str  # outcome -> count
    measured: str  # the scenario's figures, summed over its trials
    seconds: float  # mean wall seconds per trial


def rows(trials: list[Trial]) -> list[Row]:
    groups: dict[tuple[str, str], list[Trial]] = {}
    for trial in trials:
        groups.setdefault((trial.scenario, trial.variant), []).append(trial)
    return [Row(scenario, SCENARIOS[scenario].title, variant, len(group), sum(t.ok for t in group),
                "; ".join(f"{outcome} × {n}" for outcome, n in Counter(t.outcome for t in group).most_common()),
                measured(scenario, [t.details for t in group]), round(sum(t.seconds for t in group) / len(group), 1))
            for (scenario, variant), group in groups.items()]


def measured(scenario: str, details: list[dict[str, Any]]) -> str:
    """The figures worth reading for a scenario, summed (or maximised) over its trials."""
    def total(key: str) -> int:
        return sum(d.get(key, 0) for d in details)

    if scenario == "kill":
        return (f"{total('committed_before')} LoRAs committed before the kills, {total('interrupted_commits')} commits "
                f"interrupted, {total('claims_left_by_the_dead')} claims and {total('staging_folders_left_by_the_dead')} "
                f"staging folders left by the dead; reruns trained {total('rerun_trained')}, waited ≤ "
                f"{max(d['waited_for_claims_s'] for d in details):.1f} s for claims")
    if scenario.startswith("concurrent"):
        return (f"{total('trainings')} trainings for {total('planned')} jobs; LoRAs per worker "
                + ", ".join("/".join(map(str, d["trained_by_worker"])) for d in details))
    if scenario in ("job-exception", "non-finite-loss", "out-of-memory"):
        return (f"{total('faulty')} faulty of {total('planned')}; most tries of one job "
                f"{max(d['max_tries_per_job'] for d in details)} (bound {max(d['tries_bound'] for d in details)}); "
                f"reruns trained {total('rerun_trained')}")
    if scenario == "scorer-crash":
        return f"{total('crashed')} crashed of {total('planned')}; reruns scored {total('rerun_scored')}"
    if scenario in ("full-disk", "flaky-store"):
        cause = (f"on a {details[0]['disk']} of {details[0]['disk_bytes'] // 1024} KiB" if scenario == "full-disk"
                 else f"{total('failed_writes')} writes refused")
        return (f"{total('failed_first')} of {total('planned')} jobs failed ({cause}), {total('failures_in_failed_json')} "
                f"of them also in failed.json; reruns trained {total('rerun_trained')}")
    return ""


def write_results(trials: list[Trial], settings: dict[str, Any], out_dir: Path = RESULTS_DIR) -> Path:
    """bench/results/faults-<timestamp>.json: the settings, the rows, and every trial."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"faults-{time.strftime('%Y%m%dT%H%M%S')}.json"
    payload = {"benchmark": "faults", "settings": settings, "measured_at": time.time(),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
               "rows": [row.__dict__ for row in rows(trials)], "trials": [t.as_dict() for t in trials]}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path

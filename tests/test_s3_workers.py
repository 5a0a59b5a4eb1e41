"""Finetuning workers on an s3:// store (moto's server on loopback, tests/s3_server.py), as the
local-store trials run them (bench.faults: forked workers, trainings counted by the trainer as
they begin, not by records): 2 and 4 workers on one population train every job exactly once, and
a SIGKILLed worker's claims are taken over once their lease runs out, after which `lol verify`
finds every LoRA whole."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import s3_workers
from s3_server import s3_bucket  # noqa: F401  (the fixture)

from bench.faults import worker
from bench.faults.checks import inspect_population
from bench.faults.inject import EventLog
from bench.faults.lab import trainings
from bench.faults.scenarios import run_scenarios
from storage import Store

pytestmark = pytest.mark.slow  # real worker processes, ~1.5 min on 2 cores (as the local-store trials are slow)
SHAPES = Path(__file__).resolve().parent.parent / "manifests" / "tiny-shapes.yaml"
LEASE_S = 3.0


@pytest.fixture(scope="module")
def s3_lab(random_sd, s3_bucket, tmp_path_factory):  # noqa: F811
    """The fault scenarios' bench with every trial's store in the S3 bucket, and workers that reach it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(worker, "start", s3_workers.start)
        yield s3_workers.S3Lab(str(SHAPES), [f"base.ref={random_sd}"], tmp_path_factory.mktemp("s3-faults"),
                               lease_s=LEASE_S, bucket=f"{s3_bucket}/faults")


@pytest.mark.parametrize("scenario", ["concurrent-2", "concurrent-4"])
def test_concurrent_workers_on_s3_train_every_job_exactly_once(s3_lab, scenario):
    trial, = run_scenarios(s3_lab, [scenario], 1)  # the cohort variant: jobs claimed a cohort at a time
    assert trial.ok, "; ".join(trial.problems)
    assert trial.details["trainings"] == trial.details["planned"] == 8
    assert trial.details["workers_that_trained"] > 1, "one worker did everything: no race was tested"
    print(f"{scenario} on S3: {trial.details} in {trial.seconds} s")


def test_a_killed_workers_claims_are_taken_over_after_their_lease_and_the_store_verifies(s3_lab, run_cli):
    variant = "cohort"  # the killed worker holds the claims of its whole cohort
    folder = s3_lab.folder("s3-kill")
    manifest, planned = s3_lab.load(variant), s3_lab.planned(variant)
    killed = s3_lab.settings(folder, "killed", variant)
    population = Store(killed.store).population(manifest.population.name)
    process = worker.start(killed)
    events = EventLog(killed.events)
    deadline = time.monotonic() + 300
    while not any(e["event"] == "train" for e in events.read()):
        assert process.exitcode is None and time.monotonic() < deadline, worker.tail(killed.log_path)
        time.sleep(0.02)
    process.kill()
    process.join()
    held = population.active_claims()  # the dead worker's, live for up to a lease
    assert held and {c.worker for c in held.values()} == {"killed"}
    committed = {job for job in planned if population.record(job) is not None}

    rerun = worker.run(s3_lab.settings(folder, "rerun", variant))
    assert inspect_population(manifest, killed.store, folder / "tmp").problems() == []
    assert sorted(rerun["trained"]) == sorted(set(planned) - committed), "the rerun trained other than the jobs not committed"
    taken_over = {e["job"]: e["t"] for e in events.read() if e["event"] == "train" and e["pid"] != process.pid}
    assert set(held) <= set(taken_over), "a job the dead worker held was not trained again"
    early = {job: round(held[job].expires - taken_over[job], 2) for job in held if taken_over[job] < held[job].expires}
    assert not early, f"taken over before the dead worker's lease ran out (seconds early): {early}"
    assert max(trainings(killed.events).values()) <= 2, "a job was trained by more than the dead worker and the rerun"

    code, out, _ = run_cli("verify", SHAPES, *s3_lab.overrides_for(variant), "--store", killed.store)
    assert code == 0 and f"{len(planned)} of {len(planned)} stored LoRAs verify; 0 problem(s)" in out, out
    print(f"kill on S3: the dead worker held {len(held)} claim(s); the rerun trained {len(rerun['trained'])} job(s), "
          f"taking each held job over {min(taken_over[j] - held[j].expires for j in held):.2f} s or more after its lease ran out")

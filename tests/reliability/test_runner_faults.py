"""The runner and the store under faults, in-process and fast: a store that refuses writes (at
random, or once full), a claim lost while training, renewals and releases that fail, expired
claims and staging folders a killed worker left. The trainer writes a small adapter without
torch, so 40-job populations run in a second; the real-worker scenarios are in test_faults_*.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.faults.checks import inspect_population
from bench.faults.inject import FlakyStore, QuotaStore
from pipeline.finetune import staging
from pipeline.finetune.runner import finetune_population
from pipeline.jobs import Job, expand
from pipeline.manifest import Manifest
from storage import Store

from .conftest import SHAPES

MANY = ["count=40", "data.subsets.num_groups=40", "execution.cohort_size=1"]


class FileTrainer:
    """Writes a 2 KiB 'adapter' per job; counts the jobs it was asked to train."""

    trained: list[str] = []

    def setup(self, manifest: Manifest, store: Store) -> None:
        pass

    def run(self, job: Job, out_dir: Path) -> dict:
        FileTrainer.trained.append(job.job_id)
        (out_dir / "adapter").mkdir(parents=True)
        (out_dir / "adapter" / "adapter_model.safetensors").write_bytes(job.job_id.encode() * 128)
        (out_dir / "adapter" / "adapter_config.json").write_text(json.dumps({"r": job.spec.rank}))
        return {"final_loss": 0.5}


@pytest.fixture
def many() -> Manifest:
    FileTrainer.trained = []
    return Manifest.from_yaml(SHAPES, overrides=MANY)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_store_that_refuses_writes_fails_jobs_alone_and_a_rerun_completes(many, tmp_path, seed):
    url = str(tmp_path / "store")
    flaky = FlakyStore(url, rate=0.25, seed=seed)
    summary = finetune_population(many, flaky, FileTrainer, lease_s=5)
    planned = [job.job_id for job in expand(many)]
    state = inspect_population(many, url)
    assert flaky.failed_writes and summary.failed, "the store never refused a write"
    assert sorted(summary.trained) == sorted(state.verified)
    assert sorted(summary.failed) == sorted(set(planned) - set(state.verified))
    assert all("injected I/O error" in reason for reason in summary.failed.values()), summary.failed
    recorded = {job: state.failures[job] for job in summary.failed if job in state.failures}
    assert all(summary.failed[job].startswith(reason) for job, reason in recorded.items())
    unrecorded = [reason for job, reason in summary.failed.items() if job not in recorded]
    assert all("failed.json not written" in reason for reason in unrecorded), unrecorded
    assert not state.damaged and not state.leftovers and not state.tmp_files and not state.live_claims

    FileTrainer.trained = []
    again = finetune_population(many, Store(url), FileTrainer, lease_s=5)
    assert sorted(again.trained) == sorted(summary.failed) == sorted(FileTrainer.trained)
    assert inspect_population(many, url).complete


def test_a_full_disk_fails_the_jobs_that_do_not_fit_and_removes_their_partial_commits(many, tmp_path):
    url = str(tmp_path / "store")
    full = QuotaStore(url, quota=60_000)  # about half of the 40 jobs
    summary = finetune_population(many, full, FileTrainer, lease_s=5)
    state = inspect_population(many, url)
    assert summary.trained and summary.failed
    assert all("No space left on device" in reason for reason in summary.failed.values())
    assert sorted(summary.trained) == sorted(state.verified)
    assert not state.leftovers and not state.tmp_files and not state.damaged and not state.live_claims
    full.quota = None
    again = finetune_population(many, full, FileTrainer, lease_s=5)
    assert sorted(again.trained) == sorted(summary.failed)
    assert inspect_population(many, url).complete


def test_a_worker_that_lost_its_claim_while_training_does_not_commit(tmp_path, monkeypatch):
    """A stalled worker (its heartbeat did not run) whose lease ran out and whose job another
    worker took over yields at commit time instead of storing a second copy over the other's."""
    from storage.population import PopulationStore

    manifest = Manifest.from_yaml(SHAPES, overrides=["count=1", "execution.cohort_size=1"])
    store = Store(str(tmp_path / "store"))
    population = store.population(manifest.population.name)
    real_renew = PopulationStore.renew

    def stalled_heartbeat(self, claim, lease_s):
        if threading.current_thread().name.startswith("claim-"):
            return True  # the heartbeat "renews" without writing: the lease runs out
        return real_renew(self, claim, lease_s)

    class Stalled(FileTrainer):
        def run(self, job: Job, out_dir: Path) -> dict:
            metrics = super().run(job, out_dir)
            time.sleep(0.5)  # longer than the lease
            assert population.claim(job.job_id, "the-other-worker", lease_s=60) is not None
            return metrics

    monkeypatch.setattr(PopulationStore, "renew", stalled_heartbeat)
    summary = finetune_population(manifest, store, Stalled, lease_s=0.2)
    job_id = next(expand(manifest)).job_id
    assert summary.busy == 1 and not summary.trained and not summary.failed
    assert population.record(job_id) is None and population.active_claims()[job_id].worker == "the-other-worker"


def test_failing_renewals_and_releases_neither_stop_the_job_nor_raise(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    population = store.population("pop")
    claim = population.claim("j", "worker-a", lease_s=0.3)
    real_write = store.write_bytes
    calls = {"n": 0}

    def every_other_write_fails(rel: str, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] % 2:
            raise OSError(5, "injected")
        real_write(rel, data)

    monkeypatch.setattr(store, "write_bytes", every_other_write_fails)
    monkeypatch.setattr(store, "delete", lambda rel: (_ for _ in ()).throw(OSError(5, "injected delete")))
    with population.holding(claim, lease_s=0.3):
        time.sleep(0.9)  # three leases: only the renewals that got through keep the claim
        assert population.claim("j", "worker-b", lease_s=10) is None
    assert calls["n"] >= 4  # the heartbeat went on after a failed write


def test_sweeping_claims_removes_expired_claims_and_dead_writers_temporary_files(tmp_path):
    store = Store(str(tmp_path / "store"))
    population = store.population("pop")
    population.claim("expired", "dead-worker", lease_s=0.01)
    live = population.claim("live", "worker", lease_s=60)
    store.write_bytes(population.rel("claims", "half.tmp-1234abcd"), b'{"job_id": "half"')
    time.sleep(0.05)
    assert population.sweep_claims() == 2
    assert store.list_dir(population.rel("claims")) == [".lock", "live"]
    assert population.active_claims()["live"].token == live.token


def test_staging_folders_of_dead_workers_are_swept_and_live_ones_kept(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = __import__("socket").gethostname()
    folders = {name: staging.staging_root() / f"{host}-{pid}" for name, pid in
               (("dead", dead.stdout.strip()), ("live", child.pid), ("me", os.getpid()))}
    try:
        for folder in folders.values():
            (folder / "lol-job-x-1" / "adapter").mkdir(parents=True)
        (staging.staging_root() / "otherhost-1").mkdir()
        assert staging.sweep() == [folders["dead"]]
        assert sorted(p.name for p in staging.staging_root().iterdir()) == sorted(
            [folders["live"].name, folders["me"].name, "otherhost-1"])
    finally:
        child.kill()
        child.wait()

"""A real Prefect server and worker: deploy, trigger, complete; survive a SIGKILLed worker.

Starts `prefect server start` on 127.0.0.1 (free port, SQLite, temporary PREFECT_HOME), creates
the `gpu` process work pool, starts a real worker, applies the deployments with `lol deploy`
and triggers `run_population/end-to-end` on a smoke population over a random SD-shaped base.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT

from pipeline.jobs import expand
from pipeline.manifest import Manifest
from storage import Store

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SHAPES = ROOT / "manifests" / "tiny-shapes.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started (the worker and its flow-run processes)."""
    import psutil

    try:
        parent = psutil.Process(process.pid)
        for child in parent.children(recursive=True):
            child.kill()
        parent.kill()
    except psutil.NoSuchProcess:
        pass
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "LOL_REPO": str(ROOT), "LOL_CLAIM_LEASE_S": "6"}
    log = open(home / "server.log", "w")
    process = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 180, "the Prefect server")
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "gpu", "--type", "process"], env=env, check=True,
                       capture_output=True)
        yield env, home
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


def start_worker(env: dict, home: Path, name: str) -> subprocess.Popen:
    log = open(home / f"{name}.log", "w")
    return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--type", "process", "--name", name],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def trigger(env: dict, parameters: dict) -> str:
    code = ("import json, sys; from prefect.deployments import run_deployment; "
            "run = run_deployment('run_population/end-to-end', parameters=json.loads(sys.argv[1]), timeout=0); print(run.id)")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(parameters)], env=env, capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


def flow_state(env: dict, run_id: str) -> str:
    response = httpx.get(f"{env['PREFECT_API_URL']}/flow_runs/{run_id}", timeout=10)
    return response.json()["state"]["type"]


def population_parameters(random_sd: Path, store: Path, count: int, steps: int) -> dict:
    return {"manifest": "manifests/tiny-shapes.yaml", "store": str(store), "stages": ["finetune", "score", "publish"],
            "overrides": [f"base.ref={random_sd}", f"count={count}", f"hyperparameters.steps={steps}",
                          "hyperparameters.batch_size=1", f"data.subsets.num_groups={count}",
                          "scorers=[{name: attributes, attributes: [shape=circle]}]"]}


def test_deploy_trigger_complete_then_survive_a_killed_worker(server, random_sd, tmp_path):
    env, home = server
    deployed = subprocess.run([str(BIN / "lol"), "deploy", "--name", "end-to-end"], env=env, capture_output=True, text=True)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    # 1. A worker picks the run up and completes it: LoRAs, scores and the published dataset.
    worker = start_worker(env, home, "worker-1")
    try:
        params = population_parameters(random_sd, tmp_path / "store-a", count=3, steps=1)
        run_id = trigger(env, params)
        final = wait_for(lambda: flow_state(env, run_id) in ("COMPLETED", "FAILED", "CRASHED") and flow_state(env, run_id),
                         420, "the first flow run")
        assert final == "COMPLETED", (home / "worker-1.log").read_text()[-3000:]
        manifest = Manifest.from_yaml(SHAPES, overrides=params["overrides"])
        population = Store(params["store"]).population("tiny-shapes")
        assert all(population.is_done(j.job_id, verify=True) for j in expand(manifest))
        assert (tmp_path / "store-a" / "published" / "tiny-shapes" / "README.md").is_file()

        # 2. SIGKILL the worker (and its flow-run process) in the middle of a population.
        # Four cohorts of two: the kill lands after the first commit, with three cohorts (≥ 3 s of training on
        # a fast CPU) still to run. CI once saw two cohorts of 12 steps finish 0.6 s apart, inside one 1 s poll.
        params = population_parameters(random_sd, tmp_path / "store-b", count=8, steps=24)
        params["overrides"].append("execution.cohort_size=2")
        manifest = Manifest.from_yaml(SHAPES, overrides=params["overrides"])
        population = Store(params["store"]).population("tiny-shapes")
        jobs = list(expand(manifest))
        trigger(env, params)
        wait_for(lambda: any(population.record(j.job_id) is not None for j in jobs), 420, "the first LoRA of the second run",
                 every_s=0.1)
        kill_tree(worker)
    finally:
        if worker.poll() is None:
            kill_tree(worker)
    before = {j.job_id: population.record(j.job_id)["committed_at"] for j in jobs if population.record(j.job_id)}
    assert 1 <= len(before) < len(jobs)

    # 3. A new worker reruns the population: only the missing jobs train, each exactly once.
    worker = start_worker(env, home, "worker-2")
    try:
        run_id = trigger(env, params)
        final = wait_for(lambda: flow_state(env, run_id) in ("COMPLETED", "FAILED", "CRASHED") and flow_state(env, run_id),
                         600, "the rerun")
        assert final == "COMPLETED", (home / "worker-2.log").read_text()[-3000:]
    finally:
        kill_tree(worker)  # stop the worker before the server (fixture teardown)
    for job in jobs:
        record = population.record(job.job_id)
        assert record is not None and population.verify_job(job.job_id) == []
        if job.job_id in before:
            assert record["committed_at"] == before[job.job_id], "a finished LoRA was trained again"
    assert population.active_claims() == {}
    files = [p for j in jobs for p in population.store.list_files(population.job_rel(j.job_id))]
    assert not [p for p in files if ".tmp-" in p]

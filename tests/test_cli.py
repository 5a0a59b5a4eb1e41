"""The `lol` CLI, called in-process through main(argv) and once as a real console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from pipeline.jobs import expand
from pipeline.manifest import Manifest
from storage import Store

TINY = ROOT / "manifests" / "tiny-shapes.yaml"


def test_validate_ok(run_cli):
    code, out, _ = run_cli("validate", TINY)
    assert code == 0 and "tiny-shapes" in out and "320 LoRAs" in out
    code, out, _ = run_cli("validate", TINY, "execution.only_splits=[test]")
    test_jobs = len(list(expand(Manifest.from_yaml(TINY, overrides=["execution.only_splits=[test]"]))))
    assert code == 0 and 0 < test_jobs < 320 and f"planned: {test_jobs} of them" in out and "note:" not in out, out
    code, out, _ = run_cli("validate", TINY, "execution.only_splits=[test]", "publish.split_seed=7")
    assert code == 0 and "not the LoL protocol's" in out, out


def test_validate_prints_one_line_whatever_the_path_length(run_cli, tmp_path):
    """A fresh clone in a long temporary path once wrapped '320 LoRAs' across two lines."""
    deep = tmp_path / ("x" * 80) / "tiny-shapes.yaml"
    deep.parent.mkdir()
    deep.write_text(TINY.read_text())
    code, out, _ = run_cli("validate", deep)
    assert code == 0 and len(out.strip().splitlines()) == 1 and "(320 LoRAs of tiny:shapes-sd" in out


def test_validate_bad_manifest_exits_2_with_every_error_and_no_traceback(run_cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("rank: 4", "rank: -1").replace("count: 320", "cont: 320"))
    code, _, err = run_cli("validate", bad)
    assert code == 2
    assert "lora.rank[0] (line" in err and "cont (line" in err and "did you mean 'count'" in err
    assert "count (line" not in err or "required key is missing" in err
    assert "Traceback" not in err and "hint:" in err


def test_validate_accepts_overrides(run_cli):
    code, out, _ = run_cli("validate", TINY, "count=12")
    assert code == 0 and "12 LoRAs" in out


def test_plan_lists_jobs_and_distributions(run_cli):
    code, out, _ = run_cli("plan", TINY, "--show", "2")
    first = next(expand(Manifest.from_yaml(TINY)))
    assert code == 0 and first.job_id in out
    assert "learning_rate" in out and "0.003: " in out.replace("0.0030", "0.003")


def test_run_refuses_a_mismatched_base_kind_before_any_task(run_cli, tmp_path):
    code, _, err = run_cli("run", ROOT / "manifests" / "tiny-arc.yaml", "base.kind=diffusion", "--store", tmp_path / "store")
    assert code == 2 and "'tiny:qa-lm' is a causal_lm model, not diffusion" in err
    assert not (tmp_path / "store" / "populations").exists()


def test_run_with_an_unreachable_api_says_so(run_cli, tmp_path, random_sd):
    code, _, err = run_cli("run", TINY, f"base.ref={random_sd}", "--store", tmp_path / "store", "--api-url", "http://127.0.0.1:9/api")
    assert code == 2 and "no Prefect API answers at http://127.0.0.1:9/api" in err


def test_run_goes_through_prefect_end_to_end(run_cli, tmp_path, random_sd, prefect_harness):
    args = ("run", TINY, f"base.ref={random_sd}", "count=2", "hyperparameters.steps=1", "hyperparameters.batch_size=1",
            "data.subsets.num_groups=2", "scorers=[{name: attributes, attributes: [shape=circle]}]",
            "publish.splits={train: 0.5, test: 0.5}", "publish.split_seed=0", "--store", tmp_path / "store", "--stage", "finetune", "--stage", "score", "--stage", "publish")
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "trained: 2" in out and (tmp_path / "store" / "published" / "tiny-shapes" / "README.md").is_file()
    assert "learn" not in out


def test_stages_explain_what_is_missing(run_cli, tmp_path):
    code, _, err = run_cli("train", TINY, "--store", tmp_path / "s")
    assert code == 2 and "no published dataset at" in err and "lol publish" in err
    code, _, err = run_cli("publish", TINY, "--store", tmp_path / "s")
    assert code == 2 and "no verified, scored LoRA to publish" in err


def test_status_and_verify_see_stored_jobs(run_cli, tmp_path):
    store_dir = tmp_path / "store"
    manifest = Manifest.from_yaml(TINY, overrides=["count=3"])
    population = Store(str(store_dir)).population("tiny-shapes")
    jobs = list(expand(manifest))
    staged = tmp_path / "staged" / "adapter"
    staged.mkdir(parents=True)
    (staged / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    population.write_spec(jobs[0].job_id, jobs[0].to_json())
    population.commit(jobs[0].job_id, staged.parent, {})
    population.write_failed(jobs[1].job_id, "non-finite loss")

    code, out, _ = run_cli("status", TINY, "count=3", "--store", store_dir)
    assert code == 0
    assert "done" in out and "failed × 1: non-finite loss" in out

    code, out, _ = run_cli("verify", TINY, "count=3", "--store", store_dir)
    assert code == 0 and "1 of 1 stored LoRAs verify" in out
    weights = store_dir / "populations" / "tiny-shapes" / "jobs" / jobs[0].job_id / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"Weights" + weights.read_bytes()[7:])
    code, out, _ = run_cli("verify", TINY, "count=3", "--store", store_dir)
    assert code == 1 and "corrupt" in out and jobs[0].job_id in out


def test_store_with_newer_format_exits_2(run_cli, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "FORMAT.json").write_text('{"store_format": 999}')
    code, _, err = run_cli("run", TINY, "--store", store)
    assert code == 2 and "store format 999" in err
    assert sorted(p.name for p in store.iterdir()) == ["FORMAT.json"]


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(TINY)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lol = ROOT / ".venv" / "bin" / "lol"
    if lol.exists():
        result = subprocess.run([str(lol), "validate", str(TINY), "count=0"], capture_output=True, text=True)
        assert result.returncode == 2 and "count" in result.stderr and "Traceback" not in result.stderr


def test_unknown_option_is_bad_input_not_a_traceback(run_cli):
    code, _, err = run_cli("plan", "--bogus")
    assert code == 2
    assert "No such option: --bogus" in err and "Traceback" not in err


@pytest.mark.slow
def test_run_with_two_workers_in_ephemeral_mode_uses_one_api(tmp_path, random_sd):
    """`lol run --workers 2` without a server: the worker processes report to the flow's own
    temporary API instead of each starting one, and both take jobs."""
    import os

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "LOL_STORE": str(tmp_path / "store")}
    env.pop("PREFECT_API_URL", None)
    lol = str(Path(sys.executable).with_name("lol"))
    result = subprocess.run([lol, "run", str(TINY), f"base.ref={random_sd}", "count=4", "hyperparameters.steps=1",
                             "hyperparameters.batch_size=1", "data.subsets.num_groups=4",
                             "scorers=[{name: attributes, attributes: [shape=circle]}]",
                             "--stage", "finetune", "--stage", "score", "--workers", "2"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = result.stdout + result.stderr
    assert logs.count("Starting temporary server") == 1, logs[-3000:]
    assert "trained: 4" in result.stdout and "scored: 4" in result.stdout
    manifest = Manifest.from_yaml(TINY, overrides=[f"base.ref={random_sd}", "count=4", "hyperparameters.steps=1",
                                                   "hyperparameters.batch_size=1", "data.subsets.num_groups=4"])
    population = Store(str(tmp_path / "store")).population("tiny-shapes")
    workers = {population.record(job.job_id)["metrics"]["worker"] for job in expand(manifest)}
    assert len(workers) == 2, workers


@pytest.mark.slow
def test_sigterm_stops_a_run_with_workers_at_once_and_a_rerun_finishes(tmp_path, random_sd):
    """SIGTERM to `lol run --workers 2` stops it within seconds: its worker processes are terminated, not left to
    train the cohorts already handed to them (before the fix: three more cohorts of 16 after the signal). The
    rerun, once the dead workers' claims expire, trains exactly the rest; the store then verifies."""
    import os
    import signal
    import time

    import psutil

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "LOL_STORE": str(tmp_path / "store"),
           "LOL_CLAIM_LEASE_S": "6"}
    env.pop("PREFECT_API_URL", None)
    lol = str(Path(sys.executable).with_name("lol"))
    population = [str(TINY), f"base.ref={random_sd}", "count=96", "hyperparameters.steps=4", "hyperparameters.batch_size=1",
                  "data.subsets.num_groups=8", "execution.cohort_size=8", "scorers=[]"]
    args = [lol, "run", *population, "--stage", "finetune", "--workers", "2"]
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    records = tmp_path / "store" / "populations" / "tiny-shapes" / "jobs"

    def done() -> int:
        return len(list(records.glob("*/record.json"))) if records.is_dir() else 0

    deadline = time.monotonic() + 300
    while done() == 0 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.poll() is None and done() > 0, "the run ended or trained nothing in 5 min"
    workers = [p for p in psutil.Process(run.pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    at_signal = done()
    signalled = time.monotonic()
    run.send_signal(signal.SIGTERM)
    logs, _ = run.communicate(timeout=120)
    stopped_after = time.monotonic() - signalled
    assert run.returncode != 0 and stopped_after < 60, (stopped_after, logs[-2000:])
    assert len(workers) == 2 and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
    # at most the cohort each worker was committing at that moment, never the cohorts queued behind them
    assert done() <= at_signal + 2 * 8 < 96, (at_signal, done())
    time.sleep(7)  # one lease: the terminated workers' claims expire
    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert done() == 96
    verify = subprocess.run([lol, "verify", *population],
                            capture_output=True, text=True, env=env, timeout=600)
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]

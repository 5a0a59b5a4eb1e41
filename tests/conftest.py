"""Shared fixtures: paths of the shipped manifests and a way to call the CLI in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "manifests").glob("*.yaml"))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# What one job promises across cohort compositions, worker counts, thread counts and CPUs
# (docs/cohorts.md#what-a-job-promises): its inputs are equal bit for bit, and every trained
# adapter tensor agrees to ‖a − b‖_F / ‖b‖_F ≤ this bound. Measured with
# `python bench/tuning/cohort_agreement.py RANDOM_SD 3 1,2,4,8` (bench/results/cohort-agreement-*.jsonl):
# ≤ 2.4e-4 after 1 step and ≤ 1e-4 after 4, float64 training included; the bound leaves 40-100× for
# other CPUs' rounding (Adam's first steps can flip the sign of near-zero gradient entries).
ADAPTER_REL_FRO_TOLERANCE = 1e-2


def check_same_job_adapters(a: dict, b: dict, others: dict | None = None) -> float:
    """Assert two saved adapters of one job agree within ADAPTER_REL_FRO_TOLERANCE per tensor;
    with `others` (an adapter of a different job), assert that one does not (the bound tells
    jobs apart). Returns the largest relative Frobenius difference found."""
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    worst = max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp(min=1e-30)) for k in a)
    assert worst <= ADAPTER_REL_FRO_TOLERANCE, f"same job, relative difference {worst:.2e} > {ADAPTER_REL_FRO_TOLERANCE}"
    if others is not None:
        apart = max(float((others[k].double() - b[k].double()).norm() / b[k].double().norm()) for k in b if k in others)
        assert apart > 10 * ADAPTER_REL_FRO_TOLERANCE, f"a different job is only {apart:.2e} away"
    return worst


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def tiny_manifest_text() -> str:
    return (ROOT / "manifests" / "tiny-shapes.yaml").read_text()


@pytest.fixture
def run_cli(capsys):
    """Call `lol` in-process: returns (exit code, stdout, stderr)."""
    from pipeline.cli import main

    def call(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


@pytest.fixture(scope="session")
def random_sd(tmp_path_factory):
    """A randomly initialised SD-shaped pipeline folder (see random_sd.py), built once per session."""
    from random_sd import build_random_sd

    return build_random_sd(tmp_path_factory.mktemp("random-sd"))


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A temporary Prefect API (SQLite) for flow tests, started once per session."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is ~10x faster than two on contended cores. Restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_finetune_cli_resumes(run_cli, args) -> None:
    """`lol finetune ARGS --limit 2` trains 2 LoRAs with a summary; the same call again trains none."""
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "LoRAs/minute" in out
    code, out, _ = run_cli(*args)
    row = next(line for line in out.splitlines() if line.startswith("│"))
    assert code == 0 and [c.strip() for c in row.strip("│").split("│")][:3] == ["2", "0", "2"]  # planned, trained, already done

"""`lol bench` runs the real CLI in child processes and writes a results file (no timing asserted)."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT


def test_bench_finetune_writes_results(run_cli, random_sd, tmp_path, monkeypatch):
    import bench.measure as bench

    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(bench.write_results, "__defaults__", (tmp_path / "results",))
    code, out, err = run_cli("bench", "finetune", f"base.ref={random_sd}", "hyperparameters.steps=1",
                             "hyperparameters.batch_size=1", "--manifest", ROOT / "manifests" / "tiny-shapes.yaml",
                             "--count", "2", "--mode", "process", "--mode", "sequential")
    assert code == 0, err
    files = list((tmp_path / "results").glob("finetune-*.json"))
    assert len(files) == 1
    results = json.loads(files[0].read_text())["results"]
    assert [r["mode"] for r in results] == ["process", "sequential"]
    assert all(r["loras"] == 2 and r["seconds"] > 0 and r["peak_rss_mb"] > 50 for r in results)
    assert results[0]["processes"] == 2 and "LoRAs/hour" in out


@pytest.mark.slow
def test_bench_faults_prints_the_promises_held_and_writes_results(run_cli, random_sd, tmp_path, monkeypatch):
    import bench.faults.report as report

    monkeypatch.setattr(report.write_results, "__defaults__", (tmp_path / "results",))
    code, out, err = run_cli("bench", "faults", f"base.ref={random_sd}", "--manifest", ROOT / "manifests" / "tiny-shapes.yaml",
                             "--scenario", "scorer-crash", "--scenario", "non-finite-loss", "--trials", "1", "--trials", "non-finite-loss=2",
                             "--work-dir", tmp_path)
    assert code == 0, err
    files = list((tmp_path / "results").glob("faults-*.json"))
    assert len(files) == 1
    results = json.loads(files[0].read_text())
    assert [(r["scenario"], r["variant"], r["trials"], r["held"]) for r in results["rows"]] == [
        ("non-finite-loss", "cohort", 1, 1), ("non-finite-loss", "one at a time", 1, 1), ("scorer-crash", "cohort", 1, 1)]  # scenario order
    assert "lol bench faults: 3 trials" in out and "results:" in out


@pytest.mark.parametrize("option, message", [("--trials=0", "give N ≥ 1"), ("--trials=kil=3", "SCENARIO=N"),
                                             ("--scenario=nope", "'nope' is not one of 'kill'")])
def test_bench_faults_refuses_bad_options(run_cli, option, message):
    code, _, err = run_cli("bench", "faults", option, "--manifest", ROOT / "manifests" / "tiny-shapes.yaml")
    assert code == 2 and message in err


def test_bench_load_measures_each_reader_in_fresh_processes(run_cli, tmp_path, monkeypatch):
    """`lol bench load`: populations written by `python -m bench.measure write-population`, each read by
    `python -m bench.load_worker` in its own process; one row per reader with what it read."""
    import bench.measure as bench

    monkeypatch.setattr(bench.write_results, "__defaults__", (tmp_path / "results",))
    code, out, err = run_cli("bench", "load", "--sd-loras", "3", "--tiny-loras", "4", "--work-dir", tmp_path)
    assert code == 0, err
    results = json.loads(next((tmp_path / "results").glob("load-*.json")).read_text())["results"]
    assert [(r["mode"], r["loras"]) for r in results] == [
        ("tiny: tensors after open", 4), ("SD-1.4 rank 4: stream", 3), ("SD-1.4 rank 4: per-file", 3)]
    assert results[1]["extra"]["floats_per_lora"] == 99_648 * 4 and all(r["peak_rss_mb"] > 50 for r in results)

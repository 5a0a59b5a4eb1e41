"""`lol bench` runs the real CLI in child processes and writes a results file (no timing asserted)."""

from __future__ import annotations

import json

from conftest import ROOT


def test_bench_finetune_writes_results(run_cli, random_sd, tmp_path, monkeypatch):
    import pipeline.bench as bench

    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(bench.write_results, "__defaults__", (tmp_path / "results",))
    code, out, err = run_cli("bench", "finetune", f"base.ref={random_sd}", "hyperparameters.steps=1",
                             "hyperparameters.batch_size=1", "--manifest", ROOT / "manifests" / "tiny-shapes.yaml",
                             "--count", "2", "--modes", "process,sequential")
    assert code == 0, err
    files = list((tmp_path / "results").glob("finetune-*.json"))
    assert len(files) == 1
    results = json.loads(files[0].read_text())["results"]
    assert [r["mode"] for r in results] == ["process", "sequential"]
    assert all(r["loras"] == 2 and r["seconds"] > 0 and r["peak_rss_mb"] > 50 for r in results)
    assert results[0]["processes"] == 2 and "LoRAs/hour" in out

"""`lol experiment ranks|transfer`: the CLI reads the published folders a store holds and writes results."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT
from published_format import BIG, NORM, gl_population, write_published

RANKS = ROOT / "manifests" / "tiny-shapes-ranks.yaml"
SHAPES = ROOT / "manifests" / "tiny-shapes.yaml"
CONTINUED = ROOT / "manifests" / "tiny-shapes-continued.yaml"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process CLI, tiny models
FAST = ["learn.predictors=[mlp, glnet]", "learn.seeds=2", "learn.epochs=5", "learn.tuning_budget=2", "learn.selection_seeds=1"]


def test_experiment_ranks_trains_on_seen_ranks_and_reports_unseen(run_cli, tmp_path):
    factors, rows = gl_population([1, 2, 4], 40, seed=0)
    write_published(tmp_path / "store" / "published" / "tiny-shapes-ranks", factors, rows, {**NORM, **BIG})
    code, out, err = run_cli("experiment", "ranks", RANKS, *FAST, "--store", tmp_path / "store",
                             "--train-rank", "1", "--train-rank", "2", "--test-rank", "4")
    assert code == 0, err
    assert "train [1, 2], test [4]" in out and "glnet" in out and "unseen" in out
    done = [line for line in err.splitlines() if " done (" in line]  # not a terminal: one timestamped line per unit
    assert len(done) == 4 and "glnet on attributes done" in err and "done (4 unit(s), " in done[-1]
    ranks = tmp_path / "store" / "learn" / "tiny-shapes-ranks" / "ranks"
    results = json.loads((ranks / "train-1-2_test-4" / "rank_generalisation.json").read_text())
    assert results["train_ranks"] == [1, 2] and results["test_ranks"] == [4] and results["select_on_rank"] is None
    # configs chosen on rank 2 held out: a folder of its own beside the first setting's, both in the report
    code, out, err = run_cli("experiment", "ranks", RANKS, *FAST, "--store", tmp_path / "store",
                             "--train-rank", "1", "--train-rank", "2", "--test-rank", "4", "--select-on-rank", "2")
    assert code == 0, err
    results = json.loads((ranks / "train-1-2_test-4_select-2" / "rank_generalisation.json").read_text())
    assert results["select_on_rank"] == 2 and results["rows"]["selection_validation"] == results["rows_per_split_and_rank"]["validation"]["2"] > 0
    assert sorted(p.name for p in ranks.iterdir()) == ["train-1-2_test-4", "train-1-2_test-4_select-2"]
    code, out, err = run_cli("experiment", "ranks", RANKS, *FAST, "--store", tmp_path / "store")  # the defaults: the same setting
    assert code == 0, err
    assert sorted(p.name for p in ranks.iterdir()) == ["train-1-2_test-4", "train-1-2_test-4_select-2"]
    code, out, err = run_cli("report", RANKS, *FAST, "--store", tmp_path / "store")
    assert code == 0, err
    report = (tmp_path / "store" / "learn" / "tiny-shapes-ranks" / "report.md").read_text()
    assert "train on ranks [1, 2], test on unseen ranks [4]\n" in report
    assert "train on ranks [1, 2], test on unseen ranks [4], configs chosen on held-out rank 2" in report
    code, _, err = run_cli("experiment", "ranks", RANKS, *FAST, "--store", tmp_path / "store", "--test-rank", "16")
    assert code == 2 and "16" in err


def test_experiment_transfer_tests_on_the_other_population(run_cli, tmp_path):
    factors, rows = gl_population([2], 120, seed=1)
    write_published(tmp_path / "store" / "published" / "tiny-shapes", factors, rows, {**NORM, **BIG})
    factors, rows = gl_population([2], 120, seed=2)
    write_published(tmp_path / "store" / "published" / "tiny-shapes-continued", factors, rows, {**NORM, **BIG})
    code, out, err = run_cli("experiment", "transfer", SHAPES, *FAST, "--to", CONTINUED, "--store", tmp_path / "store",
                             "--workers", "2")  # mlp and glnet units in two processes
    assert code == 0, err
    assert "tiny-shapes → tiny-shapes-continued" in out and "b_test" in out
    assert (tmp_path / "store" / "learn" / "tiny-shapes-continued" / "transfer-from-tiny-shapes" / "transfer.json").is_file()
    assert "done (4 unit(s), " in err  # units finished in workers are reported too
    # the report of the source population shows the experiment beside its main table
    for command in ("train", "report"):
        code, out, err = run_cli(command, SHAPES, *FAST, "--store", tmp_path / "store")
        assert code == 0, err
        assert command != "train" or ("glnet on clip_score.clip_score done" in err and "done (4 unit(s), " in err)
    learn = tmp_path / "store" / "learn" / "tiny-shapes"
    report = (learn / "report.md").read_text()
    assert "## Main table" in report and "## Transfer: trained on tiny-shapes, tested on tiny-shapes and on tiny-shapes-continued" in report
    assert "| tiny-shapes test | tiny-shapes-continued test |" in report
    assert (learn / "figures" / "transfer-tiny-shapes-tiny-shapes-continued.png").is_file()


def test_a_manifests_widened_search_reaches_the_rank_experiments_selection(run_cli, tmp_path):
    """`learn.search` widens GL-net's space for `lol experiment ranks` (here: configs chosen on a held-out rank);
    a field GL-net does not have is refused before anything trains, with the fields it does have."""
    factors, rows = gl_population([1, 2, 4], 40, seed=0)
    write_published(tmp_path / "store" / "published" / "tiny-shapes-ranks", factors, rows, NORM)
    ranks = ["--train-rank", "1", "--train-rank", "2", "--test-rank", "4", "--select-on-rank", "2"]
    code, out, err = run_cli("experiment", "ranks", RANKS, *FAST, "learn.predictors=[glnet]", "learn.seeds=1",
                             "learn.search={glnet: {sclae_free: [true]}}", "--store", tmp_path / "store", *ranks)
    assert code != 0 and "'sclae_free' is neither a config field of glnet" in err and "scale_free" in err
    code, out, err = run_cli("experiment", "ranks", RANKS, *FAST, "learn.search={mlp: {batch_size: [100000]}}",
                             "--store", tmp_path / "store", *ranks)
    assert code != 0 and "learn.search.mlp.batch_size: at most 4,096 LoRAs per batch" in err
    assert not (tmp_path / "store" / "learn" / "tiny-shapes-ranks").exists()
    code, out, err = run_cli("experiment", "ranks", RANKS, *FAST, "learn.predictors=[glnet]", "learn.seeds=1",
                             "learn.search={glnet: {scale_free: [true], spectral_filters: [[1, 2]]}}",
                             "--store", tmp_path / "store", *ranks)
    assert code == 0, err
    results = json.loads(next((tmp_path / "store" / "learn" / "tiny-shapes-ranks" / "ranks").glob(
        "*/rank_generalisation.json")).read_text())
    assert results["settings"]["search"] == {"glnet": {"scale_free": [True], "spectral_filters": [[1, 2]]}}
    trials = results["tasks"]["clip_score.clip_score"]["predictors"]["glnet"]["selection"]["trials"]
    assert [t["candidate"]["model"].get("scale_free") for t in trials] == [None, True]
    assert trials[1]["candidate"]["model"]["spectral_filters"] == [1, 2]


@pytest.mark.slow
def test_sigterm_stops_lol_train_and_its_unit_workers(tmp_path):
    """SIGTERM to `lol train --workers 2` ends it and terminates its worker processes; before, the parent died and
    the workers trained on, orphaned, until their units ended (a GL-net unit: an hour on tiny-arc)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    factors, rows = gl_population([2], 120, seed=1)
    write_published(tmp_path / "store" / "published" / "tiny-shapes", factors, rows, NORM)
    lol = str(Path(sys.executable).with_name("lol"))
    train = subprocess.Popen([lol, "train", str(SHAPES), "learn.predictors=[mlp, glnet]", "learn.epochs=5000",
                              "learn.tuning_budget=1", "learn.seeds=1", "--store", str(tmp_path / "store"), "--workers", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ})
    deadline, workers = time.monotonic() + 120, []
    while len(workers) < 2 and train.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        workers = [p for p in psutil.Process(train.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2, "the workers did not start within 2 min"
    time.sleep(5)  # inside their units (5,000 epochs: minutes)
    signalled = time.monotonic()
    train.send_signal(signal.SIGTERM)
    logs, _ = train.communicate(timeout=60)
    assert train.returncode == 143 and time.monotonic() - signalled < 30, logs[-2000:]
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"worker processes still running after SIGTERM: {alive}"
    assert not list((tmp_path / "store" / "learn" / "tiny-shapes" / "runs").glob("*.json"))  # no unit half-written

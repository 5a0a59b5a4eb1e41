"""`lol bench orchestration --server …` plumbing (bench/orchestration.py): the fixed-time bench trainer,
how it is put in place, the figures computed from samples, and (slow) 20 jobs through a real server."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT
from safetensors.numpy import load_file

from bench.orchestration import (
    MODULES_ENV,
    TRAINED_LOG_ENV,
    FixedTimeTrainer,
    bench_server,
    summarise,
    sustained_rate,
)
from flows.server_settings import RECOMMENDED_SERVER_ENV
from pipeline.finetune.runner import finetune_population
from pipeline.manifest import Manifest
from pipeline.stages import override_trainer, trainer_factory
from storage import Store

SHAPES = ROOT / "manifests" / "tiny-shapes.yaml"


def test_override_trainer_is_scoped_and_code_only():
    real = trainer_factory("diffusion")
    with override_trainer("diffusion", FixedTimeTrainer):
        assert trainer_factory("diffusion") is FixedTimeTrainer
        assert trainer_factory("causal_lm") is not FixedTimeTrainer
    assert trainer_factory("diffusion") is real


@pytest.mark.parametrize("cohort_size", [1, 3])
def test_fixed_time_trainer_commits_real_adapters_once_each(tmp_path, monkeypatch, cohort_size):
    monkeypatch.setenv(MODULES_ENV, json.dumps({"down.attn1.to_q": [8, 8], "down.attn1.to_v": [8, 8]}))
    monkeypatch.setenv(TRAINED_LOG_ENV, str(tmp_path / "trained.txt"))
    manifest = Manifest.from_yaml(SHAPES, overrides=["count=5", f"execution.cohort_size={cohort_size}"])
    store = Store(str(tmp_path / "store"))
    summary = finetune_population(manifest, store, lambda: FixedTimeTrainer(0.0))
    assert len(summary.trained) == 5 and not summary.failed
    population = store.population("tiny-shapes")
    job = summary.trained[0]
    assert population.verify_job(job) == []
    record = population.record(job)
    assert record["metrics"]["bench"] == "fixed-time" and record["metrics"]["cohort"] in ({1} if cohort_size == 1 else {2, 3})
    tensors = load_file(str(tmp_path / "store" / "populations" / "tiny-shapes" / "jobs" / job / "adapter" / "adapter_model.safetensors"))
    rank = json.loads((tmp_path / "store" / "populations" / "tiny-shapes" / "jobs" / job / "spec.json").read_text())["spec"]["rank"]
    assert tensors["base_model.model.down.attn1.to_q.lora_A.weight"].shape == (rank, 8)
    assert sorted((tmp_path / "trained.txt").read_text().split()) == sorted(summary.trained)


def test_summary_figures_from_samples():
    samples = [{"t": t, "done": done, "load1": 2.0, "server_rss_mb": 200.0 + t, "db_mb": 5.0 + t}
               for t, done in [(0, 0), (10, 10), (20, 50), (30, 90), (40, 100)]]
    assert sustained_rate(samples, 100) == pytest.approx((90 - 10) / 20)
    result = {"wall_s": 40.0, "samples": samples, "steady_s_per_job_per_worker": 0.15}
    summary = summarise(result, jobs=100, workers=2, job_seconds=0.05)
    assert summary["jobs_per_s"] == 2.5
    assert summary["overhead_ms_per_job"] == pytest.approx(1000 * (40 * 2 / 100 - 0.05))
    assert summary["steady_overhead_ms_per_job"] == pytest.approx(100.0)
    assert (summary["server_rss_mb_start"], summary["server_rss_mb_peak"], summary["db_mb_end"]) == (200.0, 240.0, 45.0)


@pytest.mark.slow
def test_twenty_jobs_through_a_real_sqlite_server(tmp_path):
    """A real `prefect server start` (SQLite), process work pool, 2 workers: every job trained once, figures written."""
    arms, path = bench_server("sqlite", 20, 2, [1], 0.0, library=False, every_s=2.0, timeout_s=600,
                              work_dir=tmp_path, out_dir=tmp_path / "results")
    (arm,) = arms
    assert arm["records"] == 20 and arm["trained_twice"] == 0 and arm["failed_json"] == 0, arm
    assert [r["state"] for r in arm["flow_runs"]] == ["COMPLETED", "COMPLETED"]
    assert arm["task_runs"]["completed"] >= 20  # one task per job (+ none failed)
    assert arm["server_env"] == RECOMMENDED_SERVER_ENV  # batched task-run recording, as docker-compose.yml has it
    # what the running server says it uses: the settings reached it
    assert arm["server_event_settings"]["task_run_recorder"] == {"batch_size": 200, "flush_interval": 1.0}
    assert arm["server_event_settings"]["event_persister"]["batch_size"] == 200
    assert all(log["events dropped by the server"] == 0 for log in arm["log_failures"].values())
    assert arm["summary"]["jobs_per_s"] > 0 and arm["summary"]["server_rss_mb_peak"] > 50
    assert json.loads(path.read_text())["arms"][0]["records"] == 20


def test_the_servers_dropped_event_warning_is_counted_as_a_failure(tmp_path):
    """Prefect's own in-memory broker, one subscriber with a full queue (10,000 events waiting): what it logs
    for the events it drops is what the bench counts."""
    import asyncio
    import io
    import logging

    from prefect.server.utilities.messaging import memory

    from bench.orchestration import Cluster

    logged = io.StringIO()
    handler = logging.StreamHandler(logged)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    memory.logger.addHandler(handler)

    async def publish_past_a_full_queue() -> int:
        topic = memory.Topic("lol-test-events")
        subscription = topic.subscribe(dead_letter_queue_path=tmp_path / "dlq")
        try:
            for i in range(10_003):  # nobody reads: the queue fills at 10,000
                await topic.publish(memory.MemoryMessage(b"{}", {"id": str(i)}))
            return subscription._queue.qsize()
        finally:
            topic.unsubscribe(subscription)

    try:
        waiting = asyncio.run(publish_past_a_full_queue())
    finally:
        memory.logger.removeHandler(handler)
    assert waiting == 10_000
    (tmp_path / "server.log").write_text(logged.getvalue())
    counts = Cluster(tmp_path, "sqlite", 1, server_env={}).log_failures()
    assert counts["server"]["events dropped by the server"] == 3


def test_a_task_prefect_ended_without_running_counts_as_failed_not_done():
    """Seen in the SQLite bench: a task 'Finished in state Pending()' and its call returned None."""
    from flows.population import _outcome, _ran

    assert _outcome(lambda: _ran(["trained"]), 2) == (["trained"], None)
    result, why = _outcome(lambda: _ran(None), 2)  # after with_api_retries ran it again as long as it could
    assert result is None and "did not run" in why


def test_load_manifest_parses_a_text_once_per_process_and_sees_edits(tmp_path):
    from flows.population import load_manifest

    path = tmp_path / "m.yaml"
    path.write_text(SHAPES.read_text())
    first, _ = load_manifest(str(path), ["count=7"])
    assert load_manifest(str(path), ["count=7"])[0] is first  # the same text and overrides: parsed once
    assert load_manifest(str(path), ["count=8"])[0].count == 8
    path.write_text(SHAPES.read_text().replace("count:", "count: 9 #", 1))
    assert load_manifest(str(path))[0].count == 9  # an edited file is parsed again

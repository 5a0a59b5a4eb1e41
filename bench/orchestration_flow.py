"""The flow `lol bench orchestration --server …` deploys: the population's `finetune_population`
flow, unchanged, trained by the bench-only `FixedTimeTrainer` (bench/orchestration.py)."""

from __future__ import annotations

from prefect import flow

from bench.orchestration import FixedTimeTrainer
from flows.population import finetune_population, run_stage
from pipeline.stages import override_trainer


@flow(name="bench_finetune")
def bench_finetune(manifest: str, overrides: list[str], store: str, shard_spec: str | None = None,
                   job_seconds: float = 0.05) -> dict[str, int]:
    """`finetune_population(manifest, overrides, store, shard_spec=…)` with every LoRA 'trained' in `job_seconds`."""
    with override_trainer("diffusion", lambda: FixedTimeTrainer(job_seconds)):
        return run_stage("finetune_population", lambda: finetune_population(manifest, overrides, store, shard_spec=shard_spec))

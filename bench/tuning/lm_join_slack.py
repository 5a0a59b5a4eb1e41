"""How much padding LM cohorts should accept when joining their members' batches (JOIN_SLACK).

Trains the first COUNT jobs of tiny-arc in cohorts of 16 at each slack, and one at a time, in one
process; prints one JSON line per setting (wall seconds).

Usage: python bench/tuning/lm_join_slack.py STORE [THREADS] [COUNT]   (STORE holds the built bases)
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import pipeline.finetune.causal_lm as causal_lm
from pipeline.finetune.runner import cohort_order
from pipeline.jobs import expand
from pipeline.manifest import Manifest
from storage import Store


def main() -> None:
    store, threads, count = Store(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1, int(sys.argv[3]) if len(sys.argv) > 3 else 32
    torch.set_num_threads(threads)
    manifest = Manifest.from_yaml("manifests/tiny-arc.yaml")
    jobs = sorted(expand(manifest, limit=count), key=cohort_order)
    trainer = causal_lm.CausalLMTrainer("cpu")
    trainer.setup(manifest, store)
    for slack in (None, 1.0, 1.1, 1.25, 1.5):
        out = Path(tempfile.mkdtemp())
        started = time.perf_counter()
        if slack is None:
            for job in jobs:
                trainer.run(job, out / job.job_id)
        else:
            causal_lm.JOIN_SLACK["cpu"] = slack
            for i in range(0, len(jobs), 16):
                trainer.train_cohort([trainer.cohort_task(j, out / j.job_id) for j in jobs[i:i + 16]])
        print(json.dumps({"mode": "sequential" if slack is None else "cohort", "slack": slack, "jobs": count,
                          "threads": threads, "seconds": round(time.perf_counter() - started, 2)}), flush=True)


if __name__ == "__main__":
    main()

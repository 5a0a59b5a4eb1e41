"""Worker programs that tests run in subprocesses (python tests/store_workers.py MODE ...)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from job_specs import spec_json  # noqa: E402

from storage import Store  # noqa: E402


def commit_slowly(store_url: str, tag: str, staged: str, ready: str) -> None:
    """Commit the job `spec_json("pop", tag)`, but stall for a minute after the first staged file lands (to be killed)."""
    store = Store(store_url)
    population = store.population("pop")
    original = store.write_bytes

    def stalling_write(rel: str, data: bytes) -> None:
        original(rel, data)
        if rel.endswith(".safetensors"):
            Path(ready).write_text("written")
            time.sleep(60)

    store.write_bytes = stalling_write
    job_id, text = spec_json("pop", tag)
    population.write_spec(job_id, text)
    population.commit(job_id, staged, {"loss": 1.0})


def claim_all(store_url: str, worker: str, go: str, out: str, count: str) -> None:
    """Wait for the start signal, then try to claim every job; write the ones won."""
    population = Store(store_url).population("pop")
    while not os.path.exists(go):
        time.sleep(0.001)
    won = [f"job{i:04d}" for i in range(int(count)) if population.claim(f"job{i:04d}", worker, lease_s=600)]
    Path(out).write_text(json.dumps(won))


if __name__ == "__main__":
    {"commit_slowly": commit_slowly, "claim_all": claim_all}[sys.argv[1]](*sys.argv[2:])

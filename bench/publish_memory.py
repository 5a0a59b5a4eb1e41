"""Peak memory of `lol publish` against the population's size (issue #19: publish in bounded memory).

Writes a store of N SD-1.4-shaped rank-4 LoRAs for the jobs of manifests/celeba-sd14.yaml (random
factors in the real layout: attn1/attn2 to_q/to_v of every transformer block, 398,592 floats per
LoRA, committed with records and sealed scores as the finetune and score stages leave them),
then publishes it in a fresh process and records its peak RSS (VmHWM) and wall time.

Usage: python bench/publish_memory.py WORK_DIR N [N …]   → bench/results/publish-memory-<date>.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from bench.measure import sd14_lora_modules
from pipeline.jobs import expand
from pipeline.manifest import Manifest
from pipeline.score import scorer_id
from storage import Store

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "manifests" / "celeba-sd14.yaml"
PUBLISH = """
import sys, time
from pipeline.manifest import Manifest
from pipeline.publish import publish_population
from storage import Store
started = time.perf_counter()
summary = publish_population(Manifest.from_yaml(sys.argv[1], overrides=sys.argv[3:]), Store(sys.argv[2]))
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(sum(summary.rows.values()), round(time.perf_counter() - started, 1), round(hwm_kb / 1024, 1))
"""


def write_store(folder: Path, count: int, seed: int = 0) -> list[str]:
    """A store holding `count` committed, scored SD-1.4-shaped rank-4 LoRAs; returns the overrides used."""
    overrides = [f"count={count}"]
    manifest = Manifest.from_yaml(MANIFEST, overrides=overrides)
    store = Store(str(folder))
    population = store.population(manifest.population.name)
    population.write_manifest(MANIFEST.read_text())
    rng = np.random.default_rng(seed)
    modules = sd14_lora_modules()
    config = json.dumps({"r": 4, "lora_alpha": manifest.lora.alpha, "peft_type": "LORA",
                         "target_modules": list(manifest.lora.target_modules)})
    sids = [(spec.name, scorer_id(spec)) for spec in manifest.scorers]
    with tempfile.TemporaryDirectory() as tmp:
        for job in expand(manifest):
            staged = Path(tmp) / job.job_id
            (staged / "adapter").mkdir(parents=True)
            tensors = {}
            for name, (n_in, n_out) in modules.items():
                tensors[f"base_model.model.{name}.lora_A.weight"] = rng.standard_normal((4, n_in), dtype=np.float32)
                tensors[f"base_model.model.{name}.lora_B.weight"] = rng.standard_normal((n_out, 4), dtype=np.float32) * 0.01
            save_file(tensors, str(staged / "adapter" / "adapter_model.safetensors"))
            (staged / "adapter" / "adapter_config.json").write_text(config)
            population.write_spec(job.job_id, job.to_json())
            population.commit(job.job_id, staged, {"bench": "publish-memory"})
            for name, sid in sids:
                population.write_score(job.job_id, sid, {"job_id": job.job_id, "scorer": name, "scorer_id": sid,
                                                         "labels": {"value": float(rng.random())}, "versions": {},
                                                         "settings": {}, "scored_at": 0.0})
            for path in sorted(staged.rglob("*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
            staged.rmdir()
    return overrides


def main() -> None:
    work, counts = Path(sys.argv[1]), [int(n) for n in sys.argv[2:]]
    results = []
    for count in counts:
        folder = work / f"store-{count}"
        started = time.perf_counter()
        overrides = write_store(folder, count)
        written_s = time.perf_counter() - started
        output = subprocess.run([sys.executable, "-c", PUBLISH, str(MANIFEST), str(folder), *overrides],
                                capture_output=True, text=True, check=True).stdout.split()
        rows, seconds, peak_mb = int(output[-3]), float(output[-2]), float(output[-1])
        results.append({"loras": count, "published_rows": rows, "floats_per_lora": 398_592,
                        "adapter_gigabytes": round(count * 398_592 * 4 / 1e9, 2), "publish_seconds": seconds,
                        "peak_rss_mb": peak_mb, "store_write_seconds": round(written_s, 1)})
        print(json.dumps(results[-1]), flush=True)
    out = ROOT / "bench" / "results" / f"publish-memory-{time.strftime('%Y%m%d')}.json"
    out.write_text(json.dumps({"command": "python bench/publish_memory.py WORK " + " ".join(map(str, counts)),
                               "results": results}, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    main()

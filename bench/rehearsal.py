"""Paper rehearsal bench: CPU seconds and peak RSS per LoRA, per stage, at the paper's model shapes.

Runs each paper manifest (manifests/celeba-sd14.yaml, imagenette-sd14-r32.yaml, qwen2-arc.yaml,
unchanged) on the stand-ins of tests/paper_standins.py by the overrides of tests/paper_rehearsal.py,
one stage per fresh process (`python -m pipeline.cli STAGE …`), and records for every stage the
process's CPU seconds (user + system, from wait4), wall seconds and peak RSS, plus the per-LoRA
training seconds each finetune record holds. Writes bench/results/rehearsal-{scale}-{timestamp}.json.

    python bench/rehearsal.py                       # exact configs, CPU: 64 px, 2 steps, ≤64 tokens
    python bench/rehearsal.py --scale small         # reduced widths (what the default tests run)
    python bench/rehearsal.py --paper-shapes        # 512 px, paper33 prompts × 20 steps (bench/gpu.sh)

Stand-in models are built once under --models (default $LOL_STANDINS or /tmp/lol-standins).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import paper_rehearsal  # noqa: E402  (tooling beside the tests)


def run_stage(argv: list[str], env: dict[str, str], log) -> dict:
    """Run `lol ARGV` in a fresh process; its exit code, CPU and wall seconds, peak RSS."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *argv], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"exit_code": process.returncode, "wall_s": round(time.perf_counter() - started, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def finetune_seconds(store: Path, population: str) -> list[float]:
    """The training seconds each finetune record holds (the model load excluded)."""
    seconds = []
    for record in sorted((store / "populations" / population / "jobs").glob("*/record.json")):
        metrics = json.loads(record.read_text()).get("metrics", {})
        if "train_seconds" in metrics:
            seconds.append(float(metrics["train_seconds"]))
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=("exact", "small"), default="exact")
    parser.add_argument("--populations", default=",".join(paper_rehearsal.POPULATIONS))
    parser.add_argument("--count", type=int, default=4, help="LoRAs per population")
    parser.add_argument("--paper-shapes", action="store_true", help="512 px and the paper's scorer settings (GPU)")
    parser.add_argument("--models", type=Path, default=Path(os.environ.get("LOL_STANDINS", "/tmp/lol-standins")))
    parser.add_argument("--work", type=Path, default=None, help="data and stores (default: a fresh temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="lol-rehearsal-"))
    started = time.perf_counter()
    paths = paper_rehearsal.prepare(args.models / args.scale, work / "data", args.scale)
    build_s = round(time.perf_counter() - started, 1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    import torch

    facts = {"scale": args.scale, "count": args.count, "paper_shapes": args.paper_shapes, "cpus": os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
             "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
             "standins": {k: str(v) for k, v in paths.items()}, "standin_build_s": build_s}
    results = {}
    for population in [p.strip() for p in args.populations.split(",") if p.strip()]:
        store = work / f"store-{population}"
        shutil.rmtree(store, ignore_errors=True)
        overrides = paper_rehearsal.overrides(population, paths, args.scale, count=args.count, paper_shapes=args.paper_shapes)
        stages = {}
        with open(work / f"{population}.log", "w") as log:
            for stage in paper_rehearsal.STAGES:
                measured = run_stage(paper_rehearsal.stage_argv(stage, population, overrides, store), env, log)
                measured["cpu_s_per_lora"] = round(measured["cpu_s"] / args.count, 2)
                stages[stage] = measured
                print(f"{population:22s} {stage:9s} exit {measured['exit_code']}  cpu {measured['cpu_s']:8.1f} s  "
                      f"wall {measured['wall_s']:8.1f} s  peak RSS {measured['peak_rss_mb']:8.0f} MB", flush=True)
                if measured["exit_code"] != 0:
                    break
        train = finetune_seconds(store, population)
        results[population] = {"overrides": overrides, "stages": stages, "finetune_train_s_per_lora": train,
                               "log": str(work / f"{population}.log")}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "paper-shapes" if args.paper_shapes else args.scale
    path = args.out / f"rehearsal-{tag}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps({"facts": facts, "results": results}, indent=1) + "\n")
    print(f"results: {path}")
    return 0 if all(s["exit_code"] == 0 for r in results.values() for s in r["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

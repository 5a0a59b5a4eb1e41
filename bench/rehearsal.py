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
POPULATIONS = ("celeba-sd14", "imagenette-sd14-r32", "qwen2-arc")
STAGES = ("finetune", "score", "publish", "train")


def prepare(models: Path, work: Path, scale: str, count: int, paper_shapes: bool, populations: list[str]) -> dict:
    """Build the stand-ins and every population's overrides and stage command lines.

    Runs in a child process (`--prepare`): the stand-ins take gigabytes to build, and a child forked
    from a big parent inherits its peak RSS, so the measuring parent stays small."""
    sys.path.insert(0, str(ROOT / "tests"))
    import paper_rehearsal  # the stand-ins and overrides the tests use
    import torch

    started = time.perf_counter()
    paths = paper_rehearsal.prepare(models / scale, work / "data", scale)
    facts = {"scale": scale, "count": count, "paper_shapes": paper_shapes, "cpus": os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
             "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
             "standins": {k: str(v) for k, v in paths.items()}, "standin_build_s": round(time.perf_counter() - started, 1)}
    plans = {}
    for population in populations:
        store = work / f"store-{population}"
        overrides = paper_rehearsal.overrides(population, paths, scale, count=count, paper_shapes=paper_shapes)
        plans[population] = {"store": str(store), "overrides": overrides,
                             "stages": {stage: paper_rehearsal.stage_argv(stage, population, overrides, store) for stage in STAGES}}
    return {"facts": facts, "plans": plans}


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
    parser.add_argument("--populations", default=",".join(POPULATIONS))
    parser.add_argument("--count", type=int, default=4, help="LoRAs per population")
    parser.add_argument("--paper-shapes", action="store_true", help="512 px and the paper's scorer settings (GPU)")
    parser.add_argument("--models", type=Path, default=Path(os.environ.get("LOL_STANDINS", "/tmp/lol-standins")))
    parser.add_argument("--work", type=Path, default=None, help="data and stores (default: a fresh temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # the child's part: print the plan as JSON
    args = parser.parse_args(argv)
    populations = [p.strip() for p in args.populations.split(",") if p.strip()]
    unknown = sorted(set(populations) - set(POPULATIONS))
    if unknown:
        parser.error(f"--populations: unknown {unknown}; choose from {', '.join(POPULATIONS)}")

    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="lol-rehearsal-"))
    if args.prepare:
        print(json.dumps(prepare(args.models, work, args.scale, args.count, args.paper_shapes, populations)))
        return 0
    child = subprocess.run([sys.executable, __file__, "--prepare", "--scale", args.scale, "--populations", ",".join(populations),
                            "--count", str(args.count), "--models", str(args.models), "--work", str(work),
                            *(["--paper-shapes"] if args.paper_shapes else [])], cwd=ROOT, capture_output=True, text=True)
    if child.returncode != 0:
        sys.stderr.write(child.stderr[-4000:])
        return 1
    plan = json.loads(child.stdout.strip().splitlines()[-1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    results = {}
    for population, steps in plan["plans"].items():
        store = Path(steps["store"])
        shutil.rmtree(store, ignore_errors=True)
        stages = {}
        with open(work / f"{population}.log", "w") as log:
            for stage in STAGES:
                measured = run_stage(steps["stages"][stage], env, log)
                measured["cpu_s_per_lora"] = round(measured["cpu_s"] / args.count, 2)
                stages[stage] = measured
                print(f"{population:22s} {stage:9s} exit {measured['exit_code']}  cpu {measured['cpu_s']:8.1f} s  "
                      f"wall {measured['wall_s']:8.1f} s  peak RSS {measured['peak_rss_mb']:8.0f} MB", flush=True)
                if measured["exit_code"] != 0:
                    break
        results[population] = {"overrides": steps["overrides"], "stages": stages,
                               "finetune_train_s_per_lora": finetune_seconds(store, population), "log": str(work / f"{population}.log")}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "paper-shapes" if args.paper_shapes else args.scale
    path = args.out / f"rehearsal-{tag}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps({"facts": plan["facts"], "results": results}, indent=1) + "\n")
    print(f"results: {path}")
    return 0 if all(s["exit_code"] == 0 for r in results.values() for s in r["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# GPU figures for the paper populations (issue 17, item 6). NOT RUN YET: no GPU has been lent to
# this project so far, so docs/paper-populations.md has CPU figures only; run this on the first
# CUDA machine and record its JSON under bench/results/ (the doc says which numbers to copy where).
#
#   bash bench/gpu.sh                      # from the repository root, the venv in .venv/
#   PY=python LOL_STANDINS=/scratch/standins bash bench/gpu.sh
#
# 1. the exact-config rehearsal at the paper's shapes: SD-1.4 stand-in at 512 px (the manifests'
#    resolution), clip_score with the paper's 33 prompts × 20 steps, Qwen2-0.5B stand-in at the
#    manifests' full sequence lengths (no max_length cut), fp16 / bf16 as the manifests say;
#    8 LoRAs per population (enough for three splits), every stage in its own process: per-stage seconds and peak RSS
#    → bench/results/rehearsal-paper-shapes-*.json (builds ~6.5 GB of stand-ins once, under $LOL_STANDINS);
# 2. `lol bench unet --config sd15 --adapters 8 --dtype bf16`: 8 LoRAs trained sequentially vs in one
#    cohort on an SD-1.5-shaped UNet (LoRA-steps/s, TFLOP/s) → bench/results/unet-sd15-*.json.
# Needs ~20 GB of GPU memory and ~10 minutes on one H100-class GPU (estimate, not measured).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STANDINS=${LOL_STANDINS:-/tmp/lol-standins}
export HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
mkdir -p bench/results
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: no CUDA device visible; nothing measured")'
stamp=$(date -u +%Y%m%dT%H%M%S)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
} > "bench/results/gpu-device-$stamp.txt"

echo "== 1/2 paper rehearsal at the exact configs and the paper's shapes"
"$PY" bench/rehearsal.py --scale exact --paper-shapes --count 8 --models "$STANDINS" --out bench/results

echo "== 2/2 lol bench unet --config sd15 --adapters 8 --dtype bf16"
"$PY" -m pipeline.cli bench unet --config sd15 --adapters 8 --dtype bf16

echo "results: bench/results/gpu-device-$stamp.txt, bench/results/rehearsal-paper-shapes-*.json, bench/results/unet-sd15-*.json"

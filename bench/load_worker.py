"""One `lol bench load` measurement in a fresh process: `python -m bench.load_worker MODE FOLDER`.

Prints `MODE COUNT SECONDS PEAK_MB` (peak = VmHWM of this process). Modes: `stream` (the published
parquet through lol_models.data.stream), `per-file` (one safetensors file per LoRA, the same
product), `open` (a memory-mapped Arrow folder turned into tensors; timed from the open).
"""

from __future__ import annotations

import glob
import os
import sys
import time

import datasets
import torch
from safetensors.torch import load_file

from lol_models.data import read_layout, stream, table_to_dataset
from lol_models.weights import LoraWeights


def main(mode: str, folder: str) -> str:
    torch.set_num_threads(int(os.environ.get("LOL_TORCH_THREADS", torch.get_num_threads())))
    start = time.perf_counter()
    total, count = 0.0, 0
    if mode == "stream":
        for batch in stream(folder, "train", batch_size=64):
            total += float(sum(g.u.sum() + g.v.sum() for g in batch.weights.groups))
            count += len(batch)
    elif mode == "per-file":
        paths = sorted(glob.glob(folder + "/files/*.safetensors"))
        for batch_start in range(0, len(paths), 64):  # the same product as `stream`: batches of 64 as LoraWeights
            states = [load_file(p) for p in paths[batch_start:batch_start + 64]]
            names = sorted({k[:-len(".lora_A.weight")] for k in states[0] if k.endswith(".lora_A.weight")})
            us = [torch.stack([s[n + ".lora_B.weight"] for s in states]) for n in names]  # pair A with B by key
            vs = [torch.stack([s[n + ".lora_A.weight"].T for s in states]) for n in names]
            batch = LoraWeights.from_layers(names, us, vs)
            total += float(sum(g.u.sum() + g.v.sum() for g in batch.groups))
            count += len(states)
    elif mode == "open":
        layout, labels = read_layout(folder)
        table = datasets.load_from_disk(folder + "/arrow")["train"].data.table  # open (memory-map)
        start = time.perf_counter()  # time from here: tensors
        count = len(table_to_dataset(table, layout, labels))
    else:
        raise SystemExit(f"mode {mode!r}: choose stream, per-file or open")
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return f"{mode} {count} {time.perf_counter() - start:.4f} {hwm_kb / 1024:.1f}"


if __name__ == "__main__":
    print(main(sys.argv[1], sys.argv[2]))

"""Scaling experiment: forward time and peak memory of each model on GPT-3-shaped LoRAs.

One rank-r d×d LoRA per layer, for the GPT-3 family (Brown et al. 2020, Table 2.1):
125M … 175B. Each (model, size) is measured in a fresh child process with an address-space
limit, so running out of memory ends that measurement with "out of memory" instead of
taking the machine down; sizes past a model's first failure are not tried.

Shapes: B batch, L layers, d width, r rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

GPT3_SIZES = {  # name: (layers, d_model)
    "125M": (12, 768), "350M": (24, 1024), "760M": (24, 1536), "1.3B": (24, 2048),
    "2.7B": (32, 2560), "6.7B": (32, 4096), "13B": (40, 5140), "175B": (96, 12288),
}


# Lift mlp_dense's element budget so it runs until memory, not a configured cap, stops it.
UNBOUNDED = {"mlp_dense": {"max_layer_elements": 1 << 62}}


@dataclass
class ScalingPoint:
    model: str
    size: str
    layers: int
    d: int
    parameters: int | None
    forward_ms: float | None
    peak_rss_mb: float | None
    status: str  # "ok" | "out of memory" | "too large for model" | error text


CHILD = r'''
import json, resource, sys, time
import torch
cfg = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_limit"], cfg["memory_limit"]))
torch.set_num_threads(cfg["threads"])
from lol_models.registry import build_model
from lol_models.weights import LoraWeights
try:
    torch.manual_seed(0)
    L, d, r, B = cfg["layers"], cfg["d"], cfg["rank"], cfg["batch"]
    u = torch.randn(B, L, d, r) / d ** 0.5   # (B, L, d, r) — every layer d×d, so one stacked group
    v = torch.randn(B, L, d, r) / d ** 0.5
    weights = LoraWeights.from_layers([f"layer{i}" for i in range(L)], list(u.unbind(1)), list(v.unbind(1)))
    del u, v
    model = build_model(cfg["model"], weights.layout, 1, cfg["model_config"]).eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        model(weights)                               # warm-up
        times = []
        for _ in range(cfg["repeats"]):
            start = time.perf_counter(); model(weights); times.append(time.perf_counter() - start)
    out = {"status": "ok", "parameters": params, "forward_ms": 1000 * sorted(times)[len(times) // 2]}
except MemoryError:
    out = {"status": "out of memory"}
except RuntimeError as exc:
    text = str(exc)
    out = {"status": "out of memory" if ("alloc" in text.lower() or "memory" in text.lower()) else text[:200]}
except ValueError as exc:
    out = {"status": "too large for model: " + str(exc)[:160]}
out["peak_rss_mb"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
print("RESULT " + json.dumps(out))
'''


def measure(model: str, size: str, rank: int = 4, batch: int = 1, repeats: int = 5,
            memory_limit_gb: float = 16.0, threads: int = 1) -> ScalingPoint:
    layers, d = GPT3_SIZES[size]
    config = {"model": model, "layers": layers, "d": d, "rank": rank, "batch": batch, "repeats": repeats,
              "memory_limit": int(memory_limit_gb * 2**30), "threads": threads,
              "model_config": UNBOUNDED.get(model)}
    process = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    line = next((line for line in process.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:  # killed (e.g. by the kernel) before it could report
        status = "out of memory" if process.returncode in (-9, 137) or "MemoryError" in process.stderr else \
            (process.stderr.strip().splitlines() or [f"exit {process.returncode}"])[-1][:200]
        return ScalingPoint(model, size, layers, d, None, None, None, status)
    result = json.loads(line[len("RESULT "):])
    return ScalingPoint(model, size, layers, d, result.get("parameters"), result.get("forward_ms"),
                        result.get("peak_rss_mb"), result["status"])


def scaling(models: list[str], sizes: list[str] | None = None, **options) -> list[ScalingPoint]:
    """Every model over the sizes in order, stopping a model at its first failure."""
    points = []
    for model in models:
        for size in sizes or list(GPT3_SIZES):
            point = measure(model, size, **options)
            points.append(point)
            if point.status != "ok":
                break
    return points


def plot(points: list[ScalingPoint], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    order = list(GPT3_SIZES)
    for model in dict.fromkeys(p.model for p in points):
        ok = [p for p in points if p.model == model and p.status == "ok"]
        xs = [order.index(p.size) for p in ok]
        axes[0].plot(xs, [p.forward_ms for p in ok], marker="o", label=model)
        axes[1].plot(xs, [p.peak_rss_mb for p in ok], marker="o", label=model)
    for ax, label in zip(axes, ("forward time (ms, batch 1)", "peak RSS (MB)")):
        ax.set_xticks(range(len(order)), order, rotation=30)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xlabel("GPT-3 size (one rank-4 d×d LoRA per layer)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def as_rows(points: list[ScalingPoint]) -> list[dict]:
    return [asdict(p) for p in points]

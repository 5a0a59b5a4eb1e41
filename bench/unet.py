"""`lol bench unet`: LoRA training throughput on an SD-shaped UNet with random weights.

Weights do not matter for throughput, so the UNet is built from its config (nothing is
downloaded): `sd15` is Stable Diffusion 1.5's UNet (860M parameters, 64×64×4 latents = 512 px,
77×768 text states); `small` is a scaled-down one for CPUs and tests. Rank-4 LoRAs on
to_q/to_k/to_v/to_out.0, batch 1 per adapter, AdamW, MSE on random targets:

- `sequential`: K adapters one after the other, each wrapped by peft, trained, unloaded
  (what one worker does without cohorts);
- `cohort`: the same K adapters trained together by `pipeline.finetune.cohort.train_members`
  (batch K, each row routed to its adapter).

FLOPs per step come from `torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions,
forward and backward), so achieved TFLOP/s = FLOPs × steps / seconds, reported next to the
device's peak where it is known.

Shapes: K adapters, C latent channels, s latent side, S text tokens, E text width.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench import BenchError
from pipeline import runtime

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {"sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
             "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
             "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3},
    "small": {"sample_size": 16, "block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": 32,
              "attention_head_dim": 4, "norm_num_groups": 16,
              "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
}
TEXT_TOKENS = 77
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}  # dense


@dataclass
class UnetMeasurement:
    mode: str
    adapters: int
    steps: int
    seconds: float
    tflop_per_step: float  # one optimizer step of one adapter (batch 1), forward + backward
    peak_memory_mb: float

    @property
    def adapter_steps_per_second(self) -> float:
        return self.adapters * self.steps / self.seconds

    @property
    def achieved_tflops(self) -> float:
        return self.tflop_per_step * self.adapter_steps_per_second


def build_unet(name: str, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    if name not in CONFIGS:
        raise BenchError(f"unknown UNet config {name!r}; configs: {', '.join(CONFIGS)}")
    torch.manual_seed(0)
    return UNet2DConditionModel(**CONFIGS[name]).to(device, dtype).requires_grad_(False)


def _inputs(unet, rows: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype):
    """Random (noisy latents (rows, C, s, s), timesteps (rows,), text states (rows, S, E), target)."""
    c, s, e = unet.config.in_channels, unet.config.sample_size, unet.config.cross_attention_dim
    latents = torch.randn(rows, c, s, s, generator=generator).to(device, dtype)
    states = torch.randn(rows, TEXT_TOKENS, e, generator=generator).to(device, dtype)
    timesteps = torch.randint(1000, (rows,), generator=generator).to(device)
    return latents, timesteps, states, torch.randn(rows, c, s, s, generator=generator).to(device, dtype)


def _lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="gaussian")


def step_tflop(unet, device: torch.device, dtype: torch.dtype, rank: int = 4) -> float:
    """TFLOP of one forward + backward of one LoRA'd sample."""
    from peft import get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    model = get_peft_model(unet, _lora_config(rank))
    try:
        latents, timesteps, states, target = _inputs(unet, 1, torch.Generator().manual_seed(0), device, dtype)
        with FlopCounterMode(display=False) as counter:
            F.mse_loss(model(latents, timesteps, states).sample.float(), target.float()).backward()
        return counter.get_total_flops() / 1e12
    finally:
        model.unload()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_sequential(unet, adapters: int, steps: int, device: torch.device, dtype: torch.dtype, rank: int = 4) -> float:
    """Seconds to train `adapters` LoRAs one after the other (peft wrap, `steps` steps, unload)."""
    from peft import get_peft_model

    generator = torch.Generator().manual_seed(1)
    _sync(device)
    started = time.perf_counter()
    for _ in range(adapters):
        model = get_peft_model(unet, _lora_config(rank))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for _ in range(steps):
            latents, timesteps, states, target = _inputs(unet, 1, generator, device, dtype)
            F.mse_loss(model(latents, timesteps, states).sample.float(), target.float()).backward()
            optimizer.step()
            optimizer.zero_grad()
        unet = model.unload()
    _sync(device)
    return time.perf_counter() - started


class _RandomStream:
    """A member's data: one random sample per draw."""

    def __init__(self, unet, seed: int, device: torch.device, dtype: torch.dtype):
        self.unet, self.generator, self.device, self.dtype = unet, torch.Generator().manual_seed(seed), device, dtype

    def draw(self):
        return _inputs(self.unet, 1, self.generator, self.device, self.dtype)


def run_cohort(unet, adapters: int, steps: int, device: torch.device, dtype: torch.dtype, rank: int = 4) -> float:
    """Seconds to train `adapters` LoRAs together (`train_members`, batch 1 per adapter), set-up included."""
    from pipeline.cohort.layers import cohort_layers
    from pipeline.cohort.peft_io import init_factors
    from pipeline.finetune.cohort import Member, train_members

    _sync(device)
    started = time.perf_counter()
    initial = []
    for k in range(adapters):
        unet, factors = init_factors(unet, _lora_config(rank), seed=k)
        initial.append(factors)
    members = [Member(str(k), k, None, _RandomStream(unet, k, device, dtype), 1, steps, 1e-4, 1e-2, Path("."))
               for k in range(adapters)]
    with cohort_layers(unet, TARGETS) as (routing, layers):
        for member, factors in zip(members, initial):
            for name, layer in layers.items():
                layer.add_slot(member.slot, factors[name])

        def forward_losses(active):
            draws = [m.data.draw() for m in active]
            routing.set_blocks([m.slot for m in active], [1] * len(active))
            latents, timesteps, states, targets = (torch.cat(part) for part in zip(*draws))
            prediction = unet(latents, timesteps, states).sample.float()
            return [F.mse_loss(prediction[i:i + 1], targets[i:i + 1].float()) for i in range(len(active))], [False] * len(active)

        train_members(unet, members, layers, forward_losses)
    _sync(device)
    return time.perf_counter() - started


def bench_unet(config: str, adapters: int, steps: int, device: str | None = None, dtype: str = "float32",
               modes: tuple[str, ...] = ("sequential", "cohort")) -> tuple[list[UnetMeasurement], dict[str, Any]]:
    """Measure each mode once (after a one-step warm-up of each); returns (measurements, device facts)."""
    target = runtime.compute_device(device)
    torch_dtype = {"float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[dtype]
    unet = build_unet(config, target, torch_dtype)
    tflop = step_tflop(unet, target, torch_dtype)
    runners = {"sequential": run_sequential, "cohort": run_cohort}
    unknown = [m for m in modes if m not in runners]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; modes: {', '.join(runners)}")
    results = []
    for mode in modes:
        runners[mode](unet, min(adapters, 2), 1, target, torch_dtype)  # warm-up: kernels, allocator
        if target.type == "cuda":
            torch.cuda.reset_peak_memory_stats(target)
        seconds = runners[mode](unet, adapters, steps, target, torch_dtype)
        peak = torch.cuda.max_memory_allocated(target) / 2**20 if target.type == "cuda" else float("nan")
        results.append(UnetMeasurement(mode, adapters, steps, round(seconds, 3), tflop, round(peak, 1)))
    name = torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu"
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None) if torch_dtype == torch.bfloat16 else None
    return results, {"device": name, "dtype": dtype, "config": config, "peak_tflops": peak_tflops,
                     "parameters": sum(p.numel() for p in unet.parameters())}


def write_unet_results(config: str, results: list, facts: dict) -> Path:
    """`bench/results/unet-{config}-{time}.json`: the device facts and every mode's measurement."""
    from dataclasses import asdict

    from bench.measure import write_json

    return write_json(f"unet-{config}", {"facts": facts, "results": [
        {**asdict(m), "adapter_steps_per_second": m.adapter_steps_per_second, "achieved_tflops": m.achieved_tflops}
        for m in results]})

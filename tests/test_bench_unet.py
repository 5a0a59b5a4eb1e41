"""`lol bench unet` on the small UNet shape: both modes train real LoRAs and report FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from bench.unet import bench_unet, build_unet, step_tflop


def test_flops_of_a_step_match_a_second_count():
    unet = build_unet("small", torch.device("cpu"), torch.float32)
    first = step_tflop(unet, torch.device("cpu"), torch.float32)
    assert first > 0 and step_tflop(unet, torch.device("cpu"), torch.float32) == pytest.approx(first)
    assert not any(p.requires_grad for p in unet.parameters())  # the LoRA wrap was taken off again


def test_both_modes_run_and_report_throughput(run_cli):
    results, facts = bench_unet("small", adapters=3, steps=2, device="cpu", dtype="float32")
    assert [m.mode for m in results] == ["sequential", "cohort"]
    assert all(m.seconds > 0 and m.tflop_per_step > 0 and math.isfinite(m.achieved_tflops) for m in results)
    assert facts["device"] == "cpu" and facts["parameters"] > 0
    code, stdout, _ = run_cli("bench", "unet", "--config", "nope", "--device", "cpu")
    assert code != 0 and "unknown UNet config 'nope'" in stdout + _


def test_the_sd15_shape_has_sd15s_parameter_count():
    from diffusers import UNet2DConditionModel

    from bench.unet import CONFIGS

    with torch.device("meta"):  # shapes only, no memory
        unet = UNet2DConditionModel(**CONFIGS["sd15"])
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # runwayml/stable-diffusion-v1-5's UNet

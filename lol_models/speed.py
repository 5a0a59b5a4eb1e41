"""Speed: predicting a label with a trained LoL predictor versus computing it.

The paper's point: a predictor reads a LoRA's weights in one batched forward pass, while the
label itself (the CLIP score: generate images with the LoRA loaded, embed them with CLIP)
costs a diffusion sampling run per LoRA. `compare_speed` measures both on the same machine:

- predicting: one warm-up pass, then `repeats` timed passes of the predictor over all N LoRAs
  in batches (weights already on the device, CUDA synchronised); seconds per LoRA is the median
  pass time / N;
- computing: `score_one(i)` for each of the chosen LoRAs, timed one by one (setup such as
  loading the base and CLIP is excluded and reported separately by the caller); seconds per
  LoRA is the mean.

`speedup` = computing / predicting, per LoRA. The label computation comes in as a callable, so
this module stays free of the pipeline (`pipeline/speed.py::clip_score_speed` wires the
`clip_score` scorer in).

Shape legend: N LoRAs timed, S LoRAs scored, T targets.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from lol_models.common import LoLModel
from lol_models.train import predict
from lol_models.weights import LoraWeights

__all__ = ["SpeedResult", "compare_speed", "time_predictions", "time_scoring"]


@dataclass
class SpeedResult:
    """Per-LoRA cost of predicting a label versus computing it, and the values both gave."""

    predictor: str
    label: str
    loras_predicted: int  # N LoRAs in each timed pass of the predictor
    predict_repeats: int  # timed passes (median taken)
    predict_batch_size: int
    predict_seconds_per_lora: float
    loras_scored: int  # S LoRAs whose label was computed
    images_per_lora: int  # images generated (and CLIP-embedded) per scored LoRA
    score_seconds_per_lora: float  # mean over the S LoRAs
    speedup: float  # score_seconds_per_lora / predict_seconds_per_lora
    predicted: list[float]  # the predictor's values for the S scored LoRAs (label units)
    scored: list[float]  # the computed values for the same LoRAs
    score_seconds: list[float]  # each scored LoRA's time
    device: str
    torch_threads: int
    extra: dict[str, Any] = field(default_factory=dict)  # caller's context (setup time, settings, ids)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_predictions(model: LoLModel, weights: LoraWeights, *, target_mean: Tensor | None = None,
                     target_std: Tensor | None = None, batch_size: int = 1024, repeats: int = 5,
                     device: str | torch.device | None = None) -> tuple[float, Tensor]:
    """(median seconds per LoRA over `repeats` batched passes, predictions Tensor (N, T) in label units).

    The model and weights are moved to `device` (default: the model's) before timing; regression
    outputs are mapped back with target_mean/target_std (each (T,)) when given.
    """
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"repeats and batch_size must be ≥ 1, got {repeats} and {batch_size}")
    param = next(iter(model.parameters()))
    device = torch.device(device) if device is not None else param.device
    model = model.to(device)
    weights = weights.to(device=device, dtype=param.dtype)
    n = weights.batch_size
    out = predict(model, weights, batch_size)  # warm-up (allocations, kernels)
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        out = predict(model, weights, batch_size)  # (N, T)
        _sync(device)
        times.append(time.perf_counter() - started)
    if target_mean is not None and target_std is not None:
        out = out * target_std.cpu() + target_mean.cpu()
    return statistics.median(times) / n, out


def time_scoring(score_one: Callable[[int], float], count: int) -> tuple[list[float], list[float]]:
    """(values, seconds) of `score_one(i)` for i in 0..count-1, each call timed on its own."""
    if count < 1:
        raise ValueError(f"need at least one LoRA to score, got {count}")
    values, seconds = [], []
    for i in range(count):
        started = time.perf_counter()
        values.append(float(score_one(i)))
        seconds.append(time.perf_counter() - started)
    return values, seconds


def compare_speed(model: LoLModel, weights: LoraWeights, scored_rows: Sequence[int],
                  score_one: Callable[[int], float], *, predictor: str, label: str, images_per_lora: int,
                  target_mean: Tensor | None = None, target_std: Tensor | None = None, batch_size: int = 1024,
                  repeats: int = 5, device: str | torch.device | None = None,
                  extra: dict[str, Any] | None = None) -> SpeedResult:
    """Time the predictor over all N LoRAs of `weights` and `score_one` over the rows `scored_rows`.

    score_one(k) computes the label of LoRA `scored_rows[k]` (row of `weights`). The predictions
    reported for the scored LoRAs are the timed pass's outputs at those rows.
    """
    if not scored_rows:
        raise ValueError("scored_rows is empty: choose at least one LoRA to compute the label of")
    bad = [r for r in scored_rows if not 0 <= r < weights.batch_size]
    if bad:
        raise ValueError(f"scored_rows {bad} are outside the {weights.batch_size} LoRAs timed")
    per_lora, predictions = time_predictions(model, weights, target_mean=target_mean, target_std=target_std,
                                             batch_size=batch_size, repeats=repeats, device=device)
    values, seconds = time_scoring(score_one, len(scored_rows))
    score_per_lora = sum(seconds) / len(seconds)
    used = next(iter(model.parameters())).device
    return SpeedResult(
        predictor=predictor, label=label, loras_predicted=weights.batch_size, predict_repeats=repeats,
        predict_batch_size=batch_size, predict_seconds_per_lora=per_lora, loras_scored=len(scored_rows),
        images_per_lora=images_per_lora, score_seconds_per_lora=score_per_lora,
        speedup=score_per_lora / per_lora if per_lora > 0 else float("inf"),
        predicted=[float(predictions[r, 0]) for r in scored_rows], scored=values, score_seconds=seconds,
        device=str(used), torch_threads=torch.get_num_threads(), extra=dict(extra or {}),
    )

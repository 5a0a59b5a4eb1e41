"""Synthetic LoRA populations for tests, smoke runs and sanity benchmarks.

Shape legend
    N LoRAs, n/m rows of U/V, r rank.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lol_models.symmetry import gl_act, random_gl_like
from lol_models.weights import LoraWeights

__all__ = ["DEFAULT_SHAPES", "frobenius_task", "random_lora_weights"]

# three groups' worth of layers, including a repeated shape (stacked) and a layer with n < typical r
DEFAULT_SHAPES: dict[str, tuple[int, int]] = {"a": (8, 6), "b": (5, 7), "c": (8, 6), "d": (2, 9)}


def random_lora_weights(
    n_loras: int,
    rank: int,
    shapes: Mapping[str, tuple[int, int]] = DEFAULT_SHAPES,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    log_scale_spread: float = 1.0,
) -> LoraWeights:
    """Gaussian U, V per layer; each LoRA-layer's U is scaled by exp(uniform(±log_scale_spread))."""
    us, vs = [], []
    for n, m in shapes.values():
        scale = torch.exp((torch.rand(n_loras, 1, 1, generator=generator, dtype=torch.float64) * 2 - 1)
                          * log_scale_spread)
        us.append(torch.randn(n_loras, n, rank, generator=generator, dtype=torch.float64) * scale)
        vs.append(torch.randn(n_loras, m, rank, generator=generator, dtype=torch.float64))
    return LoraWeights.from_layers(list(shapes), us, vs).to(dtype)


def frobenius_task(
    n_loras: int,
    rank: int = 2,
    shapes: Mapping[str, tuple[int, int]] = DEFAULT_SHAPES,
    *,
    layer: str | None = None,
    max_cond: float = 10.0,
    scale_range: float = 3.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[LoraWeights, Tensor]:
    """A GL-invariant regression task: y = ‖U_ℓ V_ℓᵀ‖_F of one layer ℓ (default: the first).

    Every input then gets an independent random g_i ∈ GL(r) per layer (condition number `max_cond`,
    overall scale log-uniform in [1/scale_range, scale_range]), so the raw factors carry the label
    only through GL-invariant combinations. Returns (weights, y (N,)).
    """
    gen = torch.Generator().manual_seed(seed)
    w = random_lora_weights(n_loras, rank, shapes, generator=gen)
    u, v = w.layer(layer or next(iter(shapes)))
    y = (u @ v.transpose(-1, -2)).flatten(1).norm(dim=1)  # (N,)
    w = gl_act(w, random_gl_like(w, max_cond=max_cond, scale_range=scale_range, generator=gen))
    return w.to(dtype), y.to(dtype)

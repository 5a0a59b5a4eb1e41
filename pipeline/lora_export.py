"""A stored diffusion LoRA in the form diffusers' `pipe.load_lora_weights` reads.

The store keeps adapters as peft writes them for a bare UNet: keys
`base_model.model.<module>.lora_{A,B}.weight` and the scale alpha/r in adapter_config.json.
diffusers' pipeline loader looks for `unet.<module>…` keys and reads no adapter_config.json, so
`pipe.load_lora_weights(adapter_dir)` silently loads nothing from such a folder. This module
writes what it does load: `unet.<module>.lora_A.weight` = A and `unet.<module>.lora_B.weight` =
(alpha / r)·B, so diffusers' default scale (alpha = r) gives exactly ΔW = (alpha/r)·B·A.

    from pipeline.lora_export import write_diffusers_lora
    pipe.load_lora_weights(write_diffusers_lora(adapter_dir, out_dir), adapter_name="celeb")
"""

from __future__ import annotations

from pathlib import Path

import torch

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file name load_lora_weights looks for


def diffusers_lora_state_dict(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """{`unet.<module>.lora_A.weight`: A, `unet.<module>.lora_B.weight`: (alpha/r)·B} of a stored UNet adapter."""
    from pipeline.cohort.peft_io import read_factors

    factors, _ = read_factors(Path(adapter_dir))
    state: dict[str, torch.Tensor] = {}
    for name, f in factors.items():
        state[f"unet.{name}.lora_A.weight"] = f.A.contiguous()
        state[f"unet.{name}.lora_B.weight"] = (f.B * f.scaling).contiguous()
    return state


def write_diffusers_lora(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(out_dir)`; returns out_dir."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(diffusers_lora_state_dict(adapter_dir), str(out / DIFFUSERS_WEIGHT_NAME))
    return out

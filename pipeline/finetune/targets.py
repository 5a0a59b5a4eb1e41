"""Check a manifest's LoRA target modules against a model before any job trains."""

from __future__ import annotations

import torch

from pipeline.bases import BaseModelError


def check_target_modules(model: torch.nn.Module, targets: list[str] | tuple[str, ...], where: str = "the model") -> None:
    """Every target must name (a suffix of) at least one Linear/Conv layer; else list candidates.

    `where` names the model in the message ("the UNet", "the causal LM").
    """
    names = [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        paired = sorted({".".join(n.rsplit(".", 2)[-2:]) for n in names if "attn" in n})
        raise BaseModelError(f"target module(s) {missing} do not exist in {where}; candidates: {', '.join(leaves)} "
                         f"(or qualified: {', '.join(paired[:12])}{', …' if len(paired) > 12 else ''})")

"""peft at the edges of a cohort: adapters start as peft starts them and leave as peft saves them.

`init_factors` seeds torch and lets peft's `get_peft_model` create the LoRA layers, exactly as
a job trained alone does, then reads their weights and takes the layers off again, so a cohort
adapter's initial A and B are the ones it would have alone. `save_adapter` puts trained factors
into a fresh peft wrap and calls `save_pretrained`: the folder is an ordinary peft adapter.
`read_factors` reads a saved adapter (safetensors) back for scoring.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lol_models.published import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, module_factors
from pipeline.cohort import CohortError
from pipeline.cohort.layers import LoraFactors, Routing

ADAPTER_NAME = "default"


def _lora_layers(peft_model) -> dict[str, nn.Module]:
    """{qualified name in the base model: peft LoRA layer} of a peft-wrapped model."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(PEFT_PREFIX): module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)}


def init_factors(model: nn.Module, config, seed: int) -> tuple[nn.Module, dict[str, LoraFactors]]:
    """(the bare model again, {module name: initial factors}) of an adapter seeded with `seed`.

    `torch.manual_seed(seed)` then `get_peft_model(model, config)` is how the trainers start a
    job alone; the RNG draws (and so A's initial values) are the same here.
    """
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    factors = {name: LoraFactors(layer.lora_A[ADAPTER_NAME].weight.detach().clone(),
                                 layer.lora_B[ADAPTER_NAME].weight.detach().clone(),
                                 float(layer.scaling[ADAPTER_NAME]))
               for name, layer in _lora_layers(peft_model).items()}
    return peft_model.unload(), factors


def save_naming_base(peft_model, out_dir: Path | str, base: tuple[str, str | None] | None) -> None:
    """`peft_model.save_pretrained(out_dir)`, its adapter_config.json naming `base` = (ref, revision) where peft
    found no name: a diffusers UNet or a tiny-world model has no `name_or_path`, and `lol predict` checks an
    adapter's base by that name. A name peft found (a hub model's id or path) is kept. The name is added to the
    written config afterwards, as peft writes it (sorted keys, indent 2): named before saving, peft would look
    the base up on the hub for its vocabulary size on every save."""
    peft_model.save_pretrained(str(out_dir))
    if base is None:
        return
    path = Path(out_dir) / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    if config.get("base_model_name_or_path"):
        return
    config["base_model_name_or_path"], config["revision"] = base[0], config.get("revision") or base[1]
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def save_adapter(model: nn.Module, config, factors: dict[str, LoraFactors], out_dir: Path,
                 base: tuple[str, str | None] | None = None) -> nn.Module:
    """Write `factors` as the peft adapter folder `out_dir` (config + safetensors), naming `base` (ref, revision)
    as `save_naming_base` does; returns the bare model."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    try:
        layers = _lora_layers(peft_model)
        if set(layers) != set(factors):
            raise ValueError(f"adapter layers {sorted(set(factors) ^ set(layers))[:4]} differ between the cohort and peft's wrap")
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_A[ADAPTER_NAME].weight.copy_(factors[name].A)
                layer.lora_B[ADAPTER_NAME].weight.copy_(factors[name].B)
        save_naming_base(peft_model, out_dir, base)
    finally:
        model = peft_model.unload()
    return model


def read_factors(adapter_dir: Path, device: torch.device | str = "cpu") -> tuple[dict[str, LoraFactors], dict]:
    """({module name: factors}, adapter_config) of a peft adapter folder (safetensors only)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_file, weights_file = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not weights_file.is_file() or not config_file.is_file():
        there = sorted(p.name for p in adapter_dir.iterdir()) if adapter_dir.is_dir() else "no such folder"
        raise CohortError(f"{adapter_dir} is not a peft adapter (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}; it holds: {there})")
    config = json.loads(config_file.read_text())
    if config.get("use_rslora") or config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CohortError(f"{adapter_dir}: rsLoRA, DoRA and per-module rank/alpha patterns are not plain LoRAs, which "
                         "is all this pipeline trains and scores with clip_score; the LM scorers score them with "
                         "execution.cohort_size=1")
    tensors = load_file(str(weights_file), device=str(device))
    try:
        pairs = module_factors(tensors)
    except ValueError as exc:
        raise CohortError(f"{weights_file}: {exc}") from None
    if not pairs:
        raise CohortError(f"{weights_file} holds no lora_A/lora_B weights")
    factors = {name: LoraFactors(A, B, float(config["lora_alpha"]) / A.shape[0]) for name, (A, B) in pairs.items()}
    return factors, config


@contextmanager
def stored_adapters_on(model: nn.Module, adapter_dirs: Sequence[Path], device: torch.device | str = "cpu") -> Iterator[Routing]:
    """K stored adapters on `model` at once, frozen, adapter k in slot k (for scoring them in the same
    forward passes); yields the routing that says which rows go through which slot. They must target
    the same modules. The model's own layers are back when the block ends."""
    from pipeline.cohort.layers import cohort_layers

    loaded = [read_factors(d, device) for d in adapter_dirs]
    targets = {tuple(sorted(config["target_modules"])) for _, config in loaded}
    if len(targets) != 1:
        raise CohortError(f"adapters scored together must target the same modules; these target {sorted(targets)}")
    with cohort_layers(model, list(next(iter(targets)))) as (routing, layers):
        for slot, (factors, _) in enumerate(loaded):
            for name, layer in layers.items():
                layer.add_slot(slot, factors[name], trainable=False)
        yield routing

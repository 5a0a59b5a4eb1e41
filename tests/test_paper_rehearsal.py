"""The paper rehearsal (issue 17, the acceptance test): the three paper manifests, unchanged, run
finetune → score → publish → learn (`lol finetune|score|publish|train`) on stand-ins by overrides alone.

Stand-ins: tests/paper_standins.py (random weights, the architecture configs of SD-1.4, Qwen2-0.5B
and open_clip ViT-B-16), data in the hub layouts (tests/paper_rehearsal.py). The default tier runs
the reduced-width variants (same module names and structure); `slow` runs the exact configs.
Asserted on real outputs: the adapters' layout (celeba-sd14: 64 target matrices, 99,648·r
parameters at the exact config), diffusers `load_lora_weights` / peft `PeftModel.from_pretrained`
loading them, labels, the published dataset through plain `datasets.load_dataset`, and every
predictor (GL-net and the baselines) trained on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import paper_rehearsal
import paper_standins
import pytest
import torch
from safetensors.torch import load_file

from pipeline.manifest import Manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread", "prefect_harness")

SD_TARGETS = ("attn1.to_q", "attn1.to_v", "attn2.to_q", "attn2.to_v")
RANK = {"celeba-sd14": 4, "imagenette-sd14-r32": 32, "qwen2-arc": 4}
PREDICTORS = {"mlp", "mlp_svd", "mlp_oalign", "mlp_dense", "transformer", "glnet"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-standins")
    return paper_rehearsal.prepare(root / "models", root / "data", "small")


def check_rehearsal(run_cli, population: str, paths: dict[str, Path], scale: str, store: Path, count: int) -> dict:
    """`lol run` (finetune → score → publish → learn through Prefect) by overrides alone; {job_id: adapter folder}."""
    args = paper_rehearsal.overrides(population, paths, scale, count=count)
    assert not any(a.startswith(("lora.", "population.")) for a in args)  # the LoRAs are the manifest's
    code, out, err = run_cli(*paper_rehearsal.run_argv(population, args, store))
    assert code == 0, f"lol run: {err}\n{out[-2000:]}"
    scorers = len(Manifest.from_yaml(paper_rehearsal.manifest(population), overrides=args).scorers)
    assert f"trained: {count}" in out and f"scored: {count * scorers}" in out, out[-3000:]  # one score per LoRA and scorer
    jobs = sorted((store / "populations" / population / "jobs").glob("*/record.json"))
    assert len(jobs) == count
    return {p.parent.name: p.parent / "adapter" for p in jobs}


def check_sd_adapter(adapter: Path, unet_config: dict, rank: int) -> None:
    """64 target matrices (attn1/attn2 to_q/to_v of 16 transformer blocks), r·(in + out) parameters each."""
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    layout = paper_standins.sd_lora_layout(unet_config)
    modules = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
    assert len(modules) == len(layout) == 64 and len(tensors) == 128
    assert {".".join(m.split(".")[-2:]) for m in modules} == set(SD_TARGETS)
    assert sum(t.numel() for t in tensors.values()) == paper_standins.lora_parameters(layout, rank)
    assert all(t.shape[0] == rank for k, t in tensors.items() if k.endswith("lora_A.weight"))


def check_loads_in_diffusers(sd: Path, adapter: Path, tmp: Path) -> None:
    """`pipe.load_lora_weights` (via pipeline.lora_export) adds exactly peft's ΔW = (alpha/r)·B·A to the UNet."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import PeftModel

    from pipeline.lora_export import write_diffusers_lora

    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    c = unet.config
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, c.in_channels, 8, 8, generator=generator)
    states = torch.randn(1, 77, c.cross_attention_dim, generator=generator)
    t = torch.tensor([500])
    with torch.no_grad():
        base = unet(x, t, states).sample
        reference = PeftModel.from_pretrained(unet, adapter)(x, t, states).sample  # peft reads alpha from adapter_config.json
    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(write_diffusers_lora(adapter, tmp / "diffusers-lora")), adapter_name="rehearsal")
    assert pipe.get_list_adapters() == {"unet": ["rehearsal"]}
    with torch.no_grad():
        loaded = pipe.unet(x, t, states).sample
    effect = (reference - base).abs().max()
    assert effect > 0 and (loaded - reference).abs().max() <= 1e-4 * max(1.0, float(reference.abs().max()))


def check_published(store: Path, population: str, label_columns: set[str]) -> None:
    """The published folder loads with plain `datasets.load_dataset`; predictors were trained on it."""
    import datasets

    folder = store / "published" / population
    loaded = datasets.load_dataset(str(folder))
    assert set(loaded) == {"train", "validation", "test"} and all(len(loaded[s]) > 0 for s in loaded)
    assert label_columns <= set(loaded["train"].column_names)
    runs = sorted((store / "learn" / population / "runs").glob("*.json"))
    records = [json.loads(p.read_text()) for p in runs]
    assert {r["predictor"] for r in records} == PREDICTORS
    trained = [r for r in records if "error" not in r]
    assert {r["predictor"] for r in trained} >= PREDICTORS - {"mlp_dense"}
    assert all(r["parameters"] > 0 and r["per_seed"] for r in trained)


def test_celeba_sd14_rehearsal(run_cli, small, tmp_path):
    store = tmp_path / "store"
    adapters = check_rehearsal(run_cli, "celeba-sd14", small, "small", store, count=12)
    unet_config = json.loads((small["sd"] / "unet" / "config.json").read_text())
    for adapter in adapters.values():
        check_sd_adapter(adapter, unet_config, RANK["celeba-sd14"])
    check_loads_in_diffusers(small["sd"], next(iter(adapters.values())), tmp_path)
    scores = list((store / "populations" / "celeba-sd14" / "jobs").glob("*/scores/clip_score-*.json"))
    assert len(scores) == 12
    check_published(store, "celeba-sd14", {"clip_score.clip_score", "attributes.Male", "attributes.No_Beard"})


def test_imagenette_sd14_r32_rehearsal(run_cli, small, tmp_path):
    store = tmp_path / "store"
    adapters = check_rehearsal(run_cli, "imagenette-sd14-r32", small, "small", store, count=8)
    unet_config = json.loads((small["sd"] / "unet" / "config.json").read_text())
    for adapter in adapters.values():
        check_sd_adapter(adapter, unet_config, RANK["imagenette-sd14-r32"])
    check_published(store, "imagenette-sd14-r32", {"membership.tench", "membership.parachute"})


def test_qwen2_arc_rehearsal(run_cli, small, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store = tmp_path / "store"
    adapters = check_rehearsal(run_cli, "qwen2-arc", small, "small", store, count=8)
    config = json.loads((small["lm"] / "config.json").read_text())
    head = config["hidden_size"] // config["num_attention_heads"]
    adapter = next(iter(adapters.values()))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 2 * config["num_hidden_layers"]  # q_proj, v_proj of every layer, A and B
    v_out = config["num_key_value_heads"] * head
    per_layer = RANK["qwen2-arc"] * (2 * config["hidden_size"] + config["hidden_size"] + v_out)
    assert sum(t.numel() for t in tensors.values()) == per_layer * config["num_hidden_layers"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small["lm"]), adapter)
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))}) == ["q_proj", "v_proj"]
    check_published(store, "qwen2-arc", {"mc_accuracy.acc", "mc_accuracy.acc_norm", "eval_loss.eval_loss", "sources.MCAS"})


def test_exact_configs_have_the_paper_lora_layouts():
    """From the configs alone: celeba-sd14 (r = 4) targets 64 matrices, 99,648·r parameters; qwen2-arc 48, 67,584·r."""
    layout = paper_standins.sd_lora_layout(paper_standins.SD14_UNET)
    assert len(layout) == 64 and paper_standins.lora_parameters(layout, 1) == 99_648
    q = paper_standins.QWEN2_0_5B
    v_out = q["num_key_value_heads"] * q["hidden_size"] // q["num_attention_heads"]
    assert v_out == 128 and q["num_hidden_layers"] * (2 * q["hidden_size"] + q["hidden_size"] + v_out) == 67_584


@pytest.mark.exact
@pytest.mark.parametrize("population", paper_rehearsal.POPULATIONS)
def test_exact_config_rehearsal(run_cli, population, tmp_path_factory, tmp_path):
    """The same at the exact SD-1.4 / Qwen2-0.5B / ViT-B-16 shapes (builds ~6.5 GB of stand-ins once; minutes)."""
    root = tmp_path_factory.getbasetemp() / "exact-standins"
    paths = paper_rehearsal.prepare(root / "models", root / "data", "exact")
    store = tmp_path / "store"
    # celeba publishes group-disjoint splits by identity: 4 identities cannot fill train, validation and test
    adapters = check_rehearsal(run_cli, population, paths, "exact", store, count=12 if population == "celeba-sd14" else 4)
    adapter = next(iter(adapters.values()))
    if population == "qwen2-arc":
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        assert len(tensors) == 96 and sum(t.numel() for t in tensors.values()) == 67_584 * RANK[population]
        return
    check_sd_adapter(adapter, paper_standins.SD14_UNET, RANK[population])
    assert sum(t.numel() for t in load_file(str(adapter / "adapter_model.safetensors")).values()) == 99_648 * RANK[population]
    if population == "celeba-sd14":
        check_loads_in_diffusers(paths["sd"], adapter, tmp_path)


def test_gpu_script_parses_and_runs_both_benchmarks():
    """bench/gpu.sh (not runnable without a GPU) is valid bash and runs what docs/paper-populations.md says."""
    import subprocess

    script = paper_rehearsal.ROOT / "bench" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "bench/rehearsal.py --scale exact --paper-shapes" in text and "bench unet --config sd15 --adapters 8 --dtype bf16" in text

"""The paper rehearsal: each paper manifest, unchanged, run on stand-ins by overrides alone.

Shared by tests/test_paper_rehearsal.py (reduced widths, default suite; exact configs, `slow`)
and bench/rehearsal.py (CPU seconds and peak RSS per stage at the exact shapes; bench/gpu.sh on a GPU).

- models: tests/paper_standins.py (SD-1.4, Qwen2-0.5B and open_clip ViT-B-16 configs, random weights);
- data: CelebA, Imagenette and ARC in their hub layouts (tests/hub_standins.py), sized so every
  split of the published dataset gets LoRAs: CelebA with `CELEBA_IDENTITIES` identities of
  `CELEBA_IMAGES` images each, ARC with every source the qwen2-arc manifest names (so its
  `sources` list needs no override), Imagenette's 10 classes.
- `overrides(population, paths, scale)` is the whole difference from the shipped manifest:
  where the stand-ins are, and how much work (count, steps, resolution, prompts, limits, splits
  fractions so that a dozen LoRAs fill three splits, small predictors).
"""

from __future__ import annotations

from pathlib import Path

import hub_standins
import paper_standins
from datasets import Dataset

from bench.rehearsal import POPULATIONS, STAGES  # noqa: F401  (named once, for the bench and the tests)

ROOT = Path(__file__).resolve().parents[1]
CELEBA_IDENTITIES, CELEBA_IMAGES = 8, 3
# the 19 non-Mercury sources of manifests/qwen2-arc.yaml, plus Mercury (which it leaves out)
ARC_SOURCES = ("Mercury", "ACTAAP", "AIMS", "AKDE&ED", "CSZ", "FCAT", "LEAP", "MCAS", "MDSA", "MEA", "MEAP", "MSA",
               "NAEP", "NCEOGA", "NYSEDREGENTS", "OHAT", "TAKS", "TIMSS", "VASoL", "WASL")
MODELS = {"small": {"sd": "sd14-small", "lm": "qwen2-0.5b-small", "clip": "vit-b-16-small"},
          "exact": {"sd": "sd14", "lm": "qwen2-0.5b", "clip": "vit-b-16"}}


def write_celeba(root: Path) -> Path:
    """flwrlabs/celeba's layout and schema (hub_standins.write_celeba) with CELEBA_IDENTITIES identities."""
    config = hub_standins.CELEBA_CONFIG
    folder = root / config
    folder.mkdir(parents=True, exist_ok=True)
    features = hub_standins.celeba_features()
    identities = {1000 + 37 * i: CELEBA_IMAGES for i in range(CELEBA_IDENTITIES)}
    train = Dataset.from_dict(hub_standins._celeba_rows(identities, 0), features=features)
    half = len(train) // 2
    train.select(range(half)).to_parquet(str(folder / "train-00000-of-00002.parquet"))
    train.select(range(half, len(train))).to_parquet(str(folder / "train-00001-of-00002.parquet"))
    for split, start in (("valid", 5000), ("test", 6000)):
        Dataset.from_dict(hub_standins._celeba_rows({start: 2}, start), features=features).to_parquet(
            str(folder / f"{split}-00000-of-00001.parquet"))
    hub_standins._write_readme(root, {
        "license": "other",
        "configs": [{"config_name": config, "data_files": [
            {"split": s, "path": f"{config}/{s}-*"} for s in ("train", "valid", "test")]}],
    })
    return root


def _arc_rows(config: str, split: str, per_source: int) -> dict[str, list]:
    rows: dict[str, list] = {"id": [], "question": [], "choices": [], "answerKey": []}
    for s, source in enumerate(ARC_SOURCES):
        for i in range(per_source):
            n = s * per_source + i
            labels = ["1", "2", "3", "4"] if n % 5 == 4 else ["A", "B", "C", "D"]
            rows["id"].append(f"{source}_{config[4:]}_{split}_{n}")
            rows["question"].append(f"Which {split} answer about energy and water fits question {n} of {source}?")
            rows["choices"].append({"text": [f"the {w} answer" for w in ("first", "second", "third", "fourth")], "label": labels})
            rows["answerKey"].append(labels[n % 4])
    return rows


def write_arc(root: Path) -> Path:
    """allenai/ai2_arc's layout and schema (hub_standins.write_arc) with every source of the qwen2-arc manifest."""
    sizes = {"train": 3, "validation": 1, "test": 1}  # questions per source and config
    for config in ("ARC-Challenge", "ARC-Easy"):
        folder = root / config
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in sizes.items():
            Dataset.from_dict(_arc_rows(config, split, n), features=hub_standins.arc_features()).to_parquet(
                str(folder / f"{split}-00000-of-00001.parquet"))
    hub_standins._write_readme(root, {
        "license": "cc-by-sa-4.0",
        "configs": [{"config_name": c, "data_files": [{"split": s, "path": f"{c}/{s}-*"} for s in sizes]}
                    for c in ("ARC-Challenge", "ARC-Easy")],
    })
    return root


def prepare(models_root: Path, data_root: Path, scale: str) -> dict[str, Path]:
    """Build (once) the stand-in models of `scale` ("small" or "exact") and write the stand-in data."""
    paths = {role: paper_standins.build(name, models_root) for role, name in MODELS[scale].items()}
    writers = {"celeba": write_celeba, "imagenette": hub_standins.write_imagenette, "arc": write_arc}
    for name, writer in writers.items():
        folder = data_root / name
        paths[name] = folder if (folder / ".written").is_file() else writer(folder)
        (folder / ".written").touch()
    return paths


def manifest(population: str) -> Path:
    return ROOT / "manifests" / f"{population}.yaml"


def clip_override(paths: dict[str, Path], scale: str) -> str:
    """The scorer's CLIP: the exact ViT-B-16 by name + a local checkpoint file; the reduced one by its folder."""
    if scale == "exact":
        return f"model: ViT-B-16, pretrained: '{paths['clip'] / 'open_clip_model.safetensors'}'"
    return f"model: 'local-dir:{paths['clip']}'"


def overrides(population: str, paths: dict[str, Path], scale: str, count: int = 8, paper_shapes: bool = False) -> list[str]:
    """Every override of the rehearsal of `population`: where the stand-ins are and how much work.

    paper_shapes (bench/gpu.sh): keep the manifest's 512 px and its scorer settings (paper33 prompts,
    20 steps) and no max_length cut; only the count, steps/epochs and data sizes shrink."""
    learn = ["learn.predictors=[mlp, mlp_svd, mlp_oalign, mlp_dense, transformer, glnet]", "learn.seeds=1",
             "learn.epochs=3", "learn.batch_size=4", "learn.hidden=16", "learn.tuning_budget=1",
             "learn.split=published",  # a dozen LoRAs: too few groups for the protocol's split by group name
             "publish.splits={train: 0.5, validation: 0.25, test: 0.25}"]
    if scale == "exact":
        learn[0] = "learn.predictors=[mlp, mlp_svd, mlp_oalign, transformer, glnet]"  # mlp_dense: ΔW of SD-1.4 is 10⁸ floats
    common = ["base.revision=null", f"count={count}", *learn]
    if population == "qwen2-arc":
        bench = f"folder:{paths['arc']}"
        return [f"base.ref={paths['lm']}", f"data.source={bench}", *common, "hyperparameters.epochs=1",
                "hyperparameters.batch_size=8", *([] if paper_shapes else ["hyperparameters.max_length=64"]),
                f"scorers=[{{name: mc_accuracy, benchmark: '{bench}', split: test, limit: 8, batch_size: 8}}, "
                f"{{name: eval_loss, dataset: '{bench}', split: validation, limit: 8, batch_size: 8}}, {{name: sources}}]"]
    shapes = [] if paper_shapes else ["hyperparameters.resolution=64"]
    if population == "celeba-sd14":
        clip = (f"{{name: clip_score, {clip_override(paths, scale)}, prompts: paper33, seed: 42, steps: 20, guidance_scale: 7.5}}"
                if paper_shapes else
                f"{{name: clip_score, {clip_override(paths, scale)}, prompts: ['a photo of a person'], seed: 42, steps: 2, "
                f"guidance_scale: 7.5, resolution: 64}}")
        return [f"base.ref={paths['sd']}", f"data.source=folder:{paths['celeba']}", *common,
                f"data.subsets.num_groups={CELEBA_IDENTITIES}", f"data.subsets.group_size={CELEBA_IMAGES}",
                "hyperparameters.steps=2", "hyperparameters.gradient_accumulation=1", *shapes,
                f"scorers=[{clip}, {{name: attributes, attributes: [Male, Young, Wearing_Lipstick, Big_Lips, No_Beard]}}]"]
    if population == "imagenette-sd14-r32":
        return [f"base.ref={paths['sd']}", f"data.source=folder:{paths['imagenette']}", *common,
                f"data.subsets.images_per_class={min(2, hub_standins.IMAGENETTE_TRAIN_PER_CLASS)}",
                "hyperparameters.steps=2", *shapes]
    raise ValueError(f"no rehearsal for {population!r}; populations: {', '.join(POPULATIONS)}")


def run_argv(population: str, args: list[str], store: Path) -> list[str]:
    """`lol run MANIFEST OVERRIDES… --store STORE`: every stage through Prefect (run_population)."""
    return ["run", str(manifest(population)), *args, "--store", str(store)]


def stage_argv(stage: str, population: str, args: list[str], store: Path) -> list[str]:
    """`lol STAGE MANIFEST OVERRIDES… --store STORE` (publish never pushes)."""
    return [stage, str(manifest(population)), *args, "--store", str(store), *(["--no-push"] if stage == "publish" else [])]

"""A smoke population built once per session (4 LoRAs of a random SD-shaped base, scored and
published), and fresh copies of its store for tests that damage it."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "manifests" / "tiny-shapes.yaml"
# Trials per randomised scenario; raise it to measure (docs/reliability.md gives the command).
TRIALS = int(os.environ.get("LOL_RELIABILITY_TRIALS", "0")) or None


def smoke_overrides(base: str | Path, *extra: str) -> list[str]:
    return [f"base.ref={base}", "count=4", "hyperparameters.steps=1", "hyperparameters.batch_size=1",
            "lora.rank=[2, 4]", "data.subsets.num_groups=4",
            "scorers=[{name: attributes, attributes: [shape=circle]}]",
            # a seeded draw that fills every split (2 / 1 / 1 of the 4 groups)
            "publish.splits={train: 0.5, validation: 0.25, test: 0.25}", "publish.split_seed=0", *extra]


@pytest.fixture(scope="session")
def smoke_population(random_sd, tmp_path_factory) -> tuple[Path, list[str]]:
    """(store folder, overrides): 4 finetuned, scored, published LoRAs. Copy it before changing it."""
    import torch

    from pipeline.finetune.diffusion import DiffusionTrainer
    from pipeline.finetune.runner import finetune_population
    from pipeline.manifest import Manifest
    from pipeline.publish import publish_population
    from pipeline.score.runner import score_population
    from storage import Store

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tmp_path_factory.mktemp("smoke") / "store"
        overrides = smoke_overrides(random_sd)
        manifest = Manifest.from_yaml(SHAPES, overrides=overrides)
        store = Store(str(folder))
        store.population(manifest.population.name).write_manifest(SHAPES.read_text())
        assert len(finetune_population(manifest, store, DiffusionTrainer).trained) == 4
        assert not score_population(manifest, store).failed
        publish_population(manifest, store)
    finally:
        torch.set_num_threads(threads)
    return folder, overrides


@pytest.fixture
def smoke_copy(smoke_population, tmp_path):
    """(Store, Manifest) over a private copy of the smoke population's store (symlinks kept as links)."""
    from pipeline.manifest import Manifest
    from storage import Store

    folder, overrides = smoke_population
    shutil.copytree(folder, tmp_path / "store", symlinks=True)
    return Store(str(tmp_path / "store")), Manifest.from_yaml(SHAPES, overrides=overrides)


def tree_digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` (following the top-level link)."""
    folder = Path(folder).resolve()
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_report(name: str, outcomes: list[dict]) -> None:
    """With LOL_RELIABILITY_REPORT=DIR, keep every trial's outcome (the tables of docs/reliability.md)."""
    import json

    folder = os.environ.get("LOL_RELIABILITY_REPORT")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.json").write_text(json.dumps(outcomes, indent=1))


@pytest.fixture(scope="session")
def fault_lab(random_sd, tmp_path_factory):
    """The fault scenarios' bench (bench.faults.lab) on the random SD-shaped base, shared by the
    test_faults_* modules (its reference runs are made once)."""
    from bench.faults.lab import FaultLab

    return FaultLab(str(SHAPES), [f"base.ref={random_sd}"], tmp_path_factory.mktemp("faults"), lease_s=2.0)


def check_trials(name: str, trials) -> None:
    """Keep the outcomes (LOL_RELIABILITY_REPORT) and assert every promise held in every trial."""
    write_report(name, [t.as_dict() for t in trials])
    broken = [f"{t.scenario} ({t.variant}) trial {t.trial}: {'; '.join(t.problems)}" for t in trials if not t.ok]
    assert not broken, "\n".join(broken)

"""The paper manifests finetune and score from `folder:` stand-ins, by overrides alone.

- qwen2-arc on an ARC stand-in (tests/hub_standins.py) with the smoke tiny:qa-lm: LoRAs trained on
  real ARC sources, scored by mc_accuracy / eval_loss on the folder's test / validation splits.
- celeba-sd14 on a CelebA stand-in with the random SD-shaped pipeline: one identity per LoRA,
  labelled by the attributes scorer from the 40 bool columns.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hub_standins import CELEBA_TRAIN_IDENTITIES, write_arc, write_celeba

from pipeline import stages
from pipeline.bases.cache import ensure_base
from pipeline.finetune.diffusion import DiffusionTrainer
from pipeline.finetune.runner import finetune_population
from pipeline.jobs import expand
from pipeline.manifest import Manifest
from pipeline.score import make_scorer
from pipeline.score.lm_scorers import McAccuracyScorer, benchmark_examples
from storage import Store

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))


def test_qwen2_arc_finetunes_and_scores_from_a_folder_of_arc(tmp_path):
    arc = write_arc(tmp_path / "ai2_arc")
    bench = f"folder:{arc}"
    m = Manifest.from_yaml(ROOT / "manifests" / "qwen2-arc.yaml", overrides=[
        "base.ref=tiny:qa-lm", "base.revision=null", "base.size=smoke", f"data.source={bench}",
        "data.subsets.sources=[MCAS, TIMSS, Mercury, NYSEDREGENTS]", "count=2", "hyperparameters.epochs=1",
        "hyperparameters.batch_size=8",
        f"scorers=[{{name: mc_accuracy, benchmark: '{bench}', split: test, limit: 8}}, "
        f"{{name: eval_loss, dataset: '{bench}', split: validation, limit: 8}}, {{name: sources}}]"])
    store = Store(str(tmp_path / "store"))
    ensure_base("qa-lm", store, size="smoke")
    trained = stages.finetune(m, store)
    assert len(trained.trained) == 2 and not trained.failed
    population = store.population("qwen2-arc")
    jobs = list(expand(m))
    for job in jobs:
        metrics = population.record(job.job_id)["metrics"]
        kept = [s for s in job.spec.data["sources"]]
        # ARC stand-in: 56 train questions over 7 sources, 8 each; this job trained on its kept sources' questions
        assert metrics["num_examples"] == 8 * len(kept)
        assert metrics["data"]["source"] == bench and set(metrics["data"]["fingerprints"]) == {"ARC-Challenge", "ARC-Easy"}
    scored = stages.score(m, store)
    assert not scored.failed
    from pipeline.score import scorer_id

    for spec, split in ((m.scorers[0], "test"), (m.scorers[1], "validation")):  # the benchmark's fingerprint in each score
        read = population.read_score(jobs[0].job_id, scorer_id(spec))["provenance"]["dataset"]
        assert read["source"] == bench and read["split"] == split and set(read["fingerprints"]) == {"ARC-Challenge", "ARC-Easy"}
    stages.publish(m, store, push=False)
    card = (tmp_path / "store" / "published" / "qwen2-arc" / "README.md").read_text()
    fingerprint = metrics["data"]["fingerprints"]["ARC-Easy"]
    assert f"- data: `{bench}` config ARC-Challenge, ARC-Easy, revision `n/a`, split `train`" in card and fingerprint in card
    labels = scored.labels
    assert len(labels["acc"]) == len(labels["acc_norm"]) == len(labels["eval_loss"]) == 2
    assert all(0 <= v <= 1 for v in labels["acc"] + labels["acc_norm"]) and all(v > 0 for v in labels["eval_loss"])
    assert set(labels) >= {"MCAS", "TIMSS", "Mercury", "NYSEDREGENTS"}
    questions = benchmark_examples(bench, "test", 8, m.scorers[0])
    assert [q.id for q in questions][:2] == ["Mercury_Challenge_test_0", "MCAS_Challenge_test_1"]  # stored order
    scorer = McAccuracyScorer(m.scorers[0])
    scorer.setup(m, store)
    assert len(scorer.questions) == 8


def test_celeba_sd14_finetunes_one_identity_per_lora_from_a_folder(random_sd, tmp_path):
    celeba = write_celeba(tmp_path / "celeba")
    m = Manifest.from_yaml(ROOT / "manifests" / "celeba-sd14.yaml", overrides=[
        f"base.ref={random_sd}", "base.revision=null", f"data.source=folder:{celeba}",
        "data.subsets.num_groups=5", "data.subsets.group_size=4", "count=3", "hyperparameters.steps=1",
        "hyperparameters.gradient_accumulation=1", "hyperparameters.resolution=32", "scorers=[{name: attributes, attributes: [Male, Young, No_Beard]}]"])
    store = Store(str(tmp_path / "store"))
    summary = finetune_population(m, store, DiffusionTrainer)
    assert len(summary.trained) == 3 and not summary.failed
    population = store.population("celeba-sd14")
    identities = sorted(CELEBA_TRAIN_IDENTITIES)
    scorer = make_scorer(m.scorers[0])
    scorer.setup(m, store)
    for job in expand(m):
        metrics = population.record(job.job_id)["metrics"]
        identity = identities[job.spec.data["group"]]
        assert metrics["num_images"] == min(4, CELEBA_TRAIN_IDENTITIES[identity])
        assert metrics["data"]["config"] == ["img_align+identity+attr"]
        labels = scorer.score(job, None)
        assert set(labels) == {"Male", "Young", "No_Beard"} and set(labels.values()) <= {0, 1}

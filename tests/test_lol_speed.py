"""Speed: predicting the CLIP score with a trained predictor versus computing it, on a smoke-size population."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT

pytest.importorskip("easy_vqa", reason="the shapes data needs `pip install --no-deps easy-vqa==1.0`")

from lol_models.speed import compare_speed, time_predictions  # noqa: E402
from lol_models.tasks import load_splits  # noqa: E402
from lol_models.train import LabeledLoras, TrainConfig, predict, train_and_evaluate  # noqa: E402
from pipeline import stages  # noqa: E402
from pipeline.manifest import Manifest  # noqa: E402
from pipeline.score import scorer_id  # noqa: E402
from pipeline.speed import clip_score_speed  # noqa: E402
from storage import Store  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLUMN = "clip_score.clip_score"
OVERRIDES = [
    "base.size=smoke", "count=12", "data.subsets.num_groups=12", "hyperparameters.steps=1", "hyperparameters.batch_size=1",
    "scorers=[{name: clip_score, model: 'tiny:shapes-clip', size: smoke, prompts: ['a red circle', 'a blue square'], "
    "steps: 2, guidance_scale: 2.0, batch_size: 2}]",
    "publish.splits={train: 0.5, validation: 0.25, test: 0.25}", "publish.split_seed=0", "learn.epochs=2",
]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """12 one-step LoRAs of the smoke tiny:shapes-sd, CLIP-scored (2 prompts, 2 steps) and published."""
    store = Store(str(tmp_path_factory.mktemp("store")))
    manifest = Manifest.from_yaml(ROOT / "manifests" / "tiny-shapes.yaml", overrides=OVERRIDES)
    assert len(stages.finetune(manifest, store).trained) == 12
    assert not stages.score(manifest, store).failed
    stages.publish(manifest, store)
    return manifest, store


def test_predicting_is_timed_against_the_clip_score_scorer(published, tmp_path):
    manifest, store = published
    splits = load_splits(store.local_path("published/tiny-shapes"), "published")  # 12 LoRAs: too few groups to re-split
    data = {name: LabeledLoras(s.weights, s.targets([COLUMN])) for name, s in splits.items()}
    trained = train_and_evaluate("mlp_svd", data["train"], data["validation"], data["test"],
                                 model_config={"hidden": (8,)}, config=TrainConfig(epochs=2, batch_size=4))
    result = clip_score_speed(manifest, store, tmp_path, loras_scored=2, trained=trained, repeats=3, device="cpu")

    print(f"per LoRA: predict {result.predict_seconds_per_lora:.2e} s, compute {result.score_seconds_per_lora:.3f} s "
          f"({result.images_per_lora} images); speedup {result.speedup:.0f}x")
    n_all = sum(len(s) for s in splits.values())
    assert (result.predictor, result.label, result.loras_predicted, result.loras_scored) == ("mlp_svd", COLUMN, n_all, 2)
    assert result.images_per_lora == 2 and result.extra["denoising_steps"] == 2
    assert result.predict_seconds_per_lora > 0 and all(s > 0 for s in result.score_seconds)
    assert result.score_seconds_per_lora == pytest.approx(sum(result.score_seconds) / 2)
    assert result.speedup == pytest.approx(result.score_seconds_per_lora / result.predict_seconds_per_lora)
    assert result.speedup > 1  # two diffusion samplings + CLIP per LoRA against one small forward pass

    # the predicted values are the model's outputs on the scored test LoRAs, in CLIP-score units
    test = splits["test"]
    expected = predict(trained.model, test.weights.index([0, 1]))[:, 0] * trained.target_std + trained.target_mean
    assert result.predicted == pytest.approx(expected.tolist(), rel=1e-5)
    # the computed values are real CLIP scores: the same as the score stage stored for those LoRAs
    population = store.population("tiny-shapes")
    stored = [population.read_score(job_id, scorer_id(manifest.scorers[0]))["labels"]["clip_score"]
              for job_id in test.job_ids[:2]]
    assert result.extra["job_ids"] == test.job_ids[:2]
    assert result.scored == pytest.approx(stored, rel=1e-5)
    assert result.scored == pytest.approx(test.labels[COLUMN][:2].tolist(), rel=1e-5)

    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["speedup"] == pytest.approx(result.speedup) and saved["predicted"] == result.predicted


def test_without_a_trained_predictor_one_is_trained_with_the_learn_settings(published):
    manifest, store = published
    result = clip_score_speed(manifest, store, loras_scored=1, predictor="mlp", repeats=1, device="cpu")
    assert result.predictor == "mlp" and result.loras_scored == 1 and len(result.predicted) == 1
    assert (store.local_path("learn/tiny-shapes/speed") / "speed.json").is_file()


def test_time_predictions_maps_back_to_label_units_and_checks_rows():
    from lol_models.registry import build_model
    from lol_models.synthetic import random_lora_weights

    weights = random_lora_weights(10, 2, dtype=torch.float32)
    model = build_model("mlp_svd", weights.layout, 1, {"hidden": (4,)})
    seconds, out = time_predictions(model, weights, target_mean=torch.tensor([50.0]), target_std=torch.tensor([2.0]),
                                    repeats=2)
    assert seconds > 0 and out.shape == (10, 1)
    assert out[:, 0].tolist() == pytest.approx((predict(model, weights)[:, 0] * 2 + 50).tolist())
    with pytest.raises(ValueError, match="outside the 10 LoRAs"):
        compare_speed(model, weights, [3, 12], lambda k: 0.0, predictor="mlp_svd", label="y", images_per_lora=1)

"""`tiny:shapes-clip`: real smoke builds (a few seconds each), saved, reloaded through open_clip.

No mocks: every test trains the smoke recipe on real easy-vqa images. The full build (minutes
of CPU) is in the `slow` tier.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

pytest.importorskip("easy_vqa", reason="the shapes data needs `pip install --no-deps easy-vqa==1.0`")
open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from pipeline.data.shapes import ShapesSource  # noqa: E402
from tinyworld import shapes_clip  # noqa: E402

SAMPLE_PROMPTS = ["a red circle", "a teal rectangle", "a yellow triangle", "a shape", "an image of a blue circle", ""]


@pytest.fixture(scope="module")
def smoke_config() -> dict:
    return shapes_clip.recipe_config("smoke")


@pytest.fixture(scope="module")
def holdout() -> list:
    return list(ShapesSource().examples("holdout"))


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory, smoke_config):
    """One smoke build: (folder, metrics, progress calls)."""
    out = tmp_path_factory.mktemp("shapes-clip-smoke")
    calls: list[tuple[int, int]] = []
    metrics = shapes_clip.build(smoke_config, out, lambda step, total: calls.append((step, total)))
    return out, metrics, calls


def check_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- recipe


def test_module_interface():
    assert (shapes_clip.NAME, shapes_clip.KIND, shapes_clip.SIZES) == ("shapes-clip", "clip", ("smoke", "full"))
    assert len(shapes_clip.CAPTIONS) == 24 and len(set(shapes_clip.CAPTIONS)) == 24
    fingerprint = shapes_clip.data_fingerprint()
    assert fingerprint.startswith("shapes-") and fingerprint == shapes_clip.data_fingerprint()


@pytest.mark.parametrize("size", ["smoke", "full"])
def test_recipe_config_is_json_and_valid(size):
    config = shapes_clip.recipe_config(size)
    assert json.loads(json.dumps(config)) == config
    recipe = shapes_clip.ClipRecipe.from_dict(config)
    assert recipe.to_dict() == config
    assert config["model"]["text_cfg"]["vocab_size"] == 49408
    assert config["model"]["vision_cfg"]["image_size"] == 32


def test_recipe_errors_name_the_problem():
    with pytest.raises(ValueError, match="sizes smoke, full"):
        shapes_clip.recipe_config("medium")
    config = shapes_clip.recipe_config("smoke")
    with pytest.raises(ValueError, match="stepz"):
        shapes_clip.ClipRecipe.from_dict({**config, "train": {**config["train"], "stepz": 3}})
    with pytest.raises(ValueError, match="holdout_fraction"):
        shapes_clip.ClipRecipe.from_dict({**config, "data": {**config["data"], "holdout_fraction": 1.5}})
    with pytest.raises(ValueError, match="vocab_size 49408"):
        model = {**config["model"], "text_cfg": {**config["model"]["text_cfg"], "vocab_size": 1000}}
        shapes_clip.ClipRecipe.from_dict({**config, "model": model})


# ----------------------------------------------------------------------------- build, save, load


def test_smoke_build_saves_safetensors_and_open_clip_config(smoke_build, smoke_config):
    out, metrics, calls = smoke_build
    name = smoke_config["model_name"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{name}.json", "open_clip_config.json", "open_clip_model.safetensors"]
    )
    assert json.loads((out / f"{name}.json").read_text()) == smoke_config["model"]
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"] == smoke_config["model"]
    state = load_file(str(out / "open_clip_model.safetensors"))
    assert state["token_embedding.weight"].shape == (49408, smoke_config["model"]["text_cfg"]["width"])
    assert state["positional_embedding"].shape[0] == smoke_config["model"]["text_cfg"]["context_length"]
    assert all(t.dtype == torch.float32 for t in state.values())

    steps = smoke_config["train"]["steps"]
    assert calls == [(i, steps) for i in range(1, steps + 1)]
    assert json.loads(json.dumps(metrics)) == metrics
    assert metrics["steps"] == steps
    assert metrics["parameters"] == sum(t.numel() for t in state.values())  # every tensor is a parameter
    assert metrics["eval_images"] == smoke_config["data"]["max_eval"]
    assert 0.0 <= metrics["zero_shot_top1"] <= 1.0 and metrics["train_seconds"] > 0


def test_load_reproduces_the_in_memory_model(tmp_path, smoke_config, holdout):
    result = shapes_clip.train(smoke_config, tmp_path)
    shapes_clip.save_weights(result.model, tmp_path)
    model, preprocess, tokenizer = shapes_clip.load(tmp_path)

    check_same_state(result.model.state_dict(), model.state_dict())
    assert not model.training
    pixels = torch.stack([preprocess(e.load_image()) for e in holdout[:8]])
    assert torch.equal(pixels, torch.stack([result.preprocess(e.load_image()) for e in holdout[:8]]))
    tokens = tokenizer(SAMPLE_PROMPTS)
    assert torch.equal(tokens, result.tokenizer(SAMPLE_PROMPTS))
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels), result.model.encode_image(pixels))
        assert torch.equal(model.encode_text(tokens), result.model.encode_text(tokens))

    # the folder is also an open_clip "local-dir:" model
    local, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    check_same_state(local.state_dict(), model.state_dict())


def test_same_seed_same_weights_other_seed_differs(tmp_path, smoke_build, smoke_config):
    out, metrics, _ = smoke_build
    again = shapes_clip.build(smoke_config, tmp_path / "again")
    first = load_file(str(out / "open_clip_model.safetensors"))
    check_same_state(first, load_file(str(tmp_path / "again" / "open_clip_model.safetensors")))
    assert again["weights_sha256"] == metrics["weights_sha256"]
    assert again["zero_shot_top1"] == metrics["zero_shot_top1"]

    other = shapes_clip.build({**smoke_config, "seed": smoke_config["seed"] + 1}, tmp_path / "other")
    assert other["weights_sha256"] != metrics["weights_sha256"]


def test_build_leaves_the_global_rng_alone(tmp_path, smoke_config):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    shapes_clip.train(smoke_config, tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_is_open_clips_clip_bpe(smoke_build, smoke_config):
    out, _, _ = smoke_build
    model, _, tokenizer = shapes_clip.load(out)
    context = smoke_config["model"]["text_cfg"]["context_length"]
    reference = open_clip.get_tokenizer("ViT-B-32")(SAMPLE_PROMPTS)  # standard CLIP BPE, 77 tokens
    ids = tokenizer(SAMPLE_PROMPTS)
    assert ids.shape == (len(SAMPLE_PROMPTS), context)
    assert torch.equal(ids, reference[:, :context])
    assert not reference[:, context:].any()  # nothing was truncated
    assert torch.equal(ids, open_clip.get_tokenizer(smoke_config["model_name"])(SAMPLE_PROMPTS))
    assert model.token_embedding.num_embeddings == len(tokenizer.encoder) == 49408


def test_load_explains_a_folder_that_is_not_a_build(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="notes.txt"):
        shapes_clip.load(tmp_path)
    with pytest.raises(ValueError, match="no such directory"):
        shapes_clip.load(tmp_path / "missing")


# ----------------------------------------------------------------------------- zero-shot


def test_zero_shot_accuracy_counts_nearest_caption(smoke_build, holdout):
    out, metrics, _ = smoke_build
    model, preprocess, tokenizer = shapes_clip.load(out)
    examples = holdout[:6]
    with torch.no_grad():  # the nearest caption, computed here independently of the module
        image = model.encode_image(torch.stack([preprocess(e.load_image()) for e in examples]))
        text = model.encode_text(tokenizer(list(shapes_clip.CAPTIONS)))
        sims = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    nearest = [shapes_clip.CAPTIONS[i] for i in sims.argmax(dim=1).tolist()]
    wrong = [next(c for c in shapes_clip.CAPTIONS if c != n) for n in nearest]

    def relabel(captions):
        return [replace(e, caption=c) for e, c in zip(examples, captions)]

    assert shapes_clip.zero_shot_accuracy(model, preprocess, tokenizer, relabel(nearest)) == 1.0
    assert shapes_clip.zero_shot_accuracy(model, preprocess, tokenizer, relabel(wrong)) == 0.0
    half = nearest[:3] + wrong[3:]
    assert shapes_clip.zero_shot_accuracy(model, preprocess, tokenizer, relabel(half)) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        shapes_clip.zero_shot_accuracy(model, preprocess, tokenizer, [])

    # the build's reported figure is this function on the first `max_eval` holdout images
    evaluated = holdout[: metrics["eval_images"]]
    assert shapes_clip.zero_shot_accuracy(model, preprocess, tokenizer, evaluated) == metrics["zero_shot_top1"]


def test_augment_keeps_shape_and_range(smoke_config):
    settings = shapes_clip.ClipRecipe.from_dict(smoke_config).augment
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    pixels = (torch.rand(16, 3, 32, 32) - mean) / std
    out = shapes_clip.augment(pixels, settings, mean, std, torch.Generator().manual_seed(0))
    assert out.shape == pixels.shape
    unnormalised = out * std + mean
    assert unnormalised.min() >= -1e-6 and unnormalised.max() <= 1 + 1e-6
    again = shapes_clip.augment(pixels, settings, mean, std, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    off = replace(settings, hflip_p=0.0, max_shift_px=0, blur_p=0.0, noise_p=0.0)
    assert torch.allclose(shapes_clip.augment(pixels, off, mean, std, torch.Generator()), pixels, atol=1e-5)


def test_multi_positive_loss_treats_repeated_captions_as_positives():
    labels = torch.tensor([0, 0, 1])
    good = torch.tensor([[10.0, -10.0], [10.0, -10.0], [-10.0, 10.0]])  # both caption-0 images near caption 0
    # image→text ≈ 0; text→image: caption 0 splits its target over two images, floor log 2
    assert shapes_clip.multi_positive_clip_loss(good, labels).item() == pytest.approx(0.5 * math.log(2) / 2, abs=1e-4)
    assert shapes_clip.multi_positive_clip_loss(-good, labels) > 5.0


# ----------------------------------------------------------------------------- the real model


@pytest.mark.full_build
def test_full_build_reaches_the_quality_bar(tmp_path, holdout):
    metrics = shapes_clip.build(shapes_clip.recipe_config("full"), tmp_path)
    assert metrics["eval_images"] == len(holdout)
    assert metrics["zero_shot_top1"] >= 0.95, metrics
    assert (tmp_path / "open_clip_model.safetensors").stat().st_size <= 8 * 1024**2

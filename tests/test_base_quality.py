"""`lol bases evaluate`: prompt following by two judges and a LoRA's colour effect on tiny:shapes-sd.

Smoke-size bases in the default suite (the numbers are meaningless there; the plumbing,
the real trainer and both judges run); the bars themselves on the full bases are `full_build`.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("easy_vqa", reason="the shapes data needs `pip install --no-deps easy-vqa==1.0`")
torch = pytest.importorskip("torch")

from pipeline.data.shapes import COLORS  # noqa: E402
from tinyworld import shapes_quality, shapes_sd  # noqa: E402


def test_colour_examples_are_one_colour_and_seeded():
    picked = shapes_quality.colour_examples("teal", count=20, seed=3)
    assert len(picked) == 20 == len({e.id for e in picked})
    assert {e.attributes["color"] for e in picked} == {"teal"}
    assert len({e.attributes["shape"] for e in picked}) > 1  # shapes mixed: only the colour is shared
    assert [e.id for e in picked] == [e.id for e in shapes_quality.colour_examples("teal", count=20, seed=3)]
    with pytest.raises(ValueError, match="only .* training images are red"):
        shapes_quality.colour_examples("red", count=10**6)


def test_evaluate_on_smoke_bases_writes_both_judges(run_cli, tmp_path):
    out = tmp_path / "quality.json"
    grid = tmp_path / "grid.png"
    code, stdout, err = run_cli("bases", "evaluate", "--size", "smoke", "--samples", "1", "--effect-images", "3",
                                "--colour", "red", "--colour", "blue", "--output", out, "--grid", grid,
                                "--effect-grid", tmp_path / "effect.png",
                                "--store", tmp_path / "store")
    assert code == 0, err
    result = json.loads(out.read_text())
    following = result["prompt_following"]
    assert following["samples"] == 24
    for judge in ("clip", "pixels"):
        for key in ("color_accuracy", "shape_accuracy", "both_accuracy"):
            assert 0.0 <= following[judge][key] <= 1.0
        assert following[judge]["both_accuracy"] <= min(following[judge]["color_accuracy"], following[judge]["shape_accuracy"])
    effect = result["lora_effect"]
    assert sorted(effect["per_colour"]) == ["blue", "red"]
    assert effect["lora"]["steps"] <= 100 and effect["lora"]["rank"] == 4
    for row in effect["per_colour"].values():
        assert row["train_seconds"] > 0
        for judge in ("clip", "pixels"):
            assert 0.0 <= row[judge]["with_lora"] <= 1.0 and 0.0 <= row[judge]["without_lora"] <= 1.0
    from PIL import Image

    with Image.open(grid) as image:
        assert image.size == (6 * 32 * 4, 4 * 32 * 4)
    with Image.open(tmp_path / "effect.png") as image:  # rows: no LoRA, red, blue; 3 images each
        assert image.size == (110 + 3 * 32 * 3, 3 * 32 * 3)
    assert "pixels" in stdout and "clip" in stdout


def test_evaluate_rejects_an_unknown_colour(run_cli, tmp_path):
    code, _, err = run_cli("bases", "evaluate", "--size", "smoke", "--colour", "mauve", "--store", tmp_path / "s")
    assert code == 2 and "mauve" in err and "teal" in err
    assert not (tmp_path / "s" / "bases").exists()  # rejected before anything was built


def test_the_lora_effect_uses_the_population_trainer_and_leaves_the_base_clean(tmp_path):
    """The LoRA is trained, applied for generation, then removed: the base generates as before."""
    out = tmp_path / "sd"
    shapes_sd.build(shapes_sd.recipe_config("smoke"), out)
    pipe = shapes_sd.load(out)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = shapes_quality.lora_colour_effect(pipe, {"pixels": shapes_quality.pixel_judge}, ["green"], images=2,
                                               num_inference_steps=2, lora={"steps": 3})
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert result["per_colour"]["green"]["pixels"]["without_lora"] in (0.0, 0.5, 1.0)


@pytest.mark.full_build
def test_full_bases_meet_the_bars(tmp_path):
    from pipeline.bases.cache import ensure_base
    from storage import Store
    from tinyworld import shapes_clip

    store = Store(str(tmp_path / "store"))
    pipe = shapes_sd.load(ensure_base("shapes-sd", store).path)
    result = shapes_quality.evaluate_base(pipe, shapes_clip.load(ensure_base("shapes-clip", store).path))
    for judge in ("clip", "pixels"):
        assert result["prompt_following"][judge]["color_accuracy"] >= 0.60, result["prompt_following"]
        assert result["prompt_following"][judge]["shape_accuracy"] >= 0.50, result["prompt_following"]
        assert result["lora_effect"]["min_ratio"][judge] >= 2.0, result["lora_effect"]
    assert set(result["lora_effect"]["per_colour"]) == set(COLORS)

"""The built bases the repository ships (`pipeline/bases/shipped/`), so `make demo` need not pretrain.

Each shipped folder must be the full build of the *current* recipe (config, data fingerprint,
library versions): change a recipe and this test says to rebuild and ship it again.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("easy_vqa", reason="the shapes data needs `pip install --no-deps easy-vqa==1.0`")
torch = pytest.importorskip("torch")

from pipeline.bases.cache import (  # noqa: E402
    BUILD_FILE,
    SHIPPED_DIR,
    _folder_problems,
    ensure_base,
    recipe_for,
    ship,
    shipped_bytes,
    shipped_names,
)
from storage import Store  # noqa: E402

REBUILD = "rebuild and ship it: `lol bases build {name} --force --ship`"


@pytest.mark.parametrize("name", sorted(shipped_names()))
def test_each_base_ships_the_full_build_of_its_current_recipe(name):
    recipe = recipe_for(name, "full")
    folder = SHIPPED_DIR / recipe.folder
    present = sorted(p.name for p in SHIPPED_DIR.iterdir()) if SHIPPED_DIR.is_dir() else []
    assert folder.is_dir(), f"no shipped build for recipe {recipe.folder} (shipped: {present}); " + REBUILD.format(name=name)
    build = json.loads((folder / BUILD_FILE).read_text())
    assert build["recipe_hash"] == recipe.hash and build["recipe"] == recipe.as_json()
    assert _folder_problems(folder) == [], REBUILD.format(name=name)


def test_shipped_weights_fit_the_budget():
    sizes = shipped_bytes()
    assert sorted(sizes) == sorted(recipe_for(n, "full").folder for n in shipped_names()), sizes  # no stale folders
    assert sum(sizes.values()) <= 20_000_000, sizes


def test_an_empty_store_takes_the_shipped_builds_and_they_load(tmp_path):
    from pipeline.data.shapes import ShapesSource
    from tinyworld import qa_lm, shapes_clip, shapes_sd

    store = Store(str(tmp_path / "store"))
    built = {name: ensure_base(name, store) for name in shipped_names()}
    assert {b.source for b in built.values()} == {"shipped"}
    assert all(ensure_base(name, store).source == "cache" for name in shipped_names())

    pipe = shapes_sd.load(built["shapes-sd"].path)
    image = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)

    model, preprocess, tokenizer = shapes_clip.load(built["shapes-clip"].path)
    holdout = ShapesSource().examples("holdout")[:64]
    assert shapes_clip.zero_shot_accuracy(model, preprocess, tokenizer, holdout) >= 0.95

    lm, lm_tokenizer = qa_lm.load(built["qa-lm"].path)
    ids = lm_tokenizer("Question: What do plants need to grow?\nAnswer:", return_tensors="pt").input_ids
    assert torch.isfinite(lm(ids).logits).all()


def test_ship_replaces_the_older_build_of_the_same_base(tmp_path):
    store = Store(str(tmp_path / "store"))
    smoke = ensure_base("shapes-clip", store, size="smoke")
    shipped_dir = tmp_path / "shipped"
    stale = shipped_dir / "shapes-clip-smoke-000000000000"
    stale.mkdir(parents=True)
    target = ship(smoke, shipped_dir)
    assert sorted(p.name for p in shipped_dir.iterdir()) == [smoke.recipe.folder]
    assert _folder_problems(target) == []

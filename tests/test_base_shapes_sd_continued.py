"""`tiny:shapes-sd-continued`: the built tiny:shapes-sd trained further, resolved through the store's cache.

The build reuses shapes-sd's own training loop (`shapes_sd.train_steps`) on the parent's weights.
"""

from __future__ import annotations

import pytest
from conftest import ROOT

pytest.importorskip("easy_vqa", reason="the shapes data needs `pip install --no-deps easy-vqa==1.0`")
torch = pytest.importorskip("torch")

from pipeline.bases import BaseModelError, tiny_module  # noqa: E402
from pipeline.bases.cache import ensure_base, recipe_for  # noqa: E402
from pipeline.jobs import expand  # noqa: E402
from pipeline.manifest import TINY_BASES, Manifest  # noqa: E402
from storage import Store  # noqa: E402
from tinyworld import shapes_sd, shapes_sd_continued  # noqa: E402


def test_registered_as_a_diffusion_base_the_manifest_schema_knows():
    module = tiny_module("tiny:shapes-sd-continued")
    assert module is shapes_sd_continued and module.NAME == "shapes-sd-continued"
    assert TINY_BASES[module.NAME] == module.KIND == "diffusion" and module.SIZES == ("smoke", "full")


@pytest.mark.parametrize("size", ["smoke", "full"])
def test_recipe_names_the_current_parent_recipe(size):
    config = shapes_sd_continued.recipe_config(size)
    parent = recipe_for("shapes-sd", size)
    assert config["parent"] == {"name": "shapes-sd", "size": size, "recipe_hash": parent.hash}
    assert config["seed"] != parent.config["seed"] and config["train"]["lr"] < parent.config["train"]["lr"]
    assert config["train"]["steps"] == (500 if size == "full" else 2)
    assert recipe_for("shapes-sd-continued", size).hash != parent.hash
    assert shapes_sd_continued.data_fingerprint() == shapes_sd.data_fingerprint()


def test_a_new_parent_recipe_makes_a_new_continued_recipe(monkeypatch):
    before = recipe_for("shapes-sd-continued", "smoke").hash
    original = shapes_sd.recipe_config
    monkeypatch.setattr(shapes_sd, "recipe_config", lambda size: {**original(size), "seed": 7})
    assert recipe_for("shapes-sd-continued", "smoke").hash != before


def test_a_stale_parent_recipe_is_refused_before_anything_is_built(tmp_path):
    config = shapes_sd_continued.recipe_config("smoke")
    config["parent"] = {**config["parent"], "recipe_hash": "000000000000"}
    store = Store(str(tmp_path / "store"))
    with pytest.raises(BaseModelError, match="continues tiny:shapes-sd \\(smoke\\) recipe 000000000000, but the current"):
        shapes_sd_continued.build(config, tmp_path / "out", store=store)
    assert not store.exists("bases")


def test_smoke_build_continues_the_parent_of_the_same_store(tmp_path, monkeypatch, one_torch_thread):
    from safetensors.torch import load_file

    store = Store(str(tmp_path / "store"))
    built = ensure_base("shapes-sd-continued", store, size="smoke")
    parent = ensure_base("shapes-sd", store, size="smoke")
    assert built.source == "built" and parent.source == "cache"  # the parent was built into this store, once
    assert built.metrics["parent"]["recipe_hash"] == parent.recipe.hash and built.metrics["steps"] == 2
    assert 0 < built.metrics["relative_weight_change"]["unet"] < 0.5
    unet = "unet/diffusion_pytorch_model.safetensors"
    ours, theirs = load_file(str(built.path / unet)), load_file(str(parent.path / unet))
    assert ours.keys() == theirs.keys() and any(not torch.equal(ours[k], theirs[k]) for k in ours)
    vae = "vae/diffusion_pytorch_model.safetensors"
    ours, theirs = load_file(str(built.path / vae)), load_file(str(parent.path / vae))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # the identity autoencoder is not trained
    pipe = shapes_sd_continued.load(built.path)
    assert pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0].size == (32, 32)
    assert ensure_base("shapes-sd-continued", store, size="smoke").source == "cache"


def test_the_continued_population_repeats_tiny_shapes_jobs_on_the_other_base():
    shapes = list(expand(Manifest.from_yaml(ROOT / "manifests" / "tiny-shapes.yaml")))
    continued = list(expand(Manifest.from_yaml(ROOT / "manifests" / "tiny-shapes-continued.yaml")))
    assert len(shapes) == len(continued) == 320
    for a, b in zip(shapes, continued):
        assert b.spec.base["ref"] == "tiny:shapes-sd-continued"
        assert a.spec.model_dump(exclude={"base"}) == b.spec.model_dump(exclude={"base"})

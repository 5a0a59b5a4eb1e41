"""The build-once cache of bases: keyed by recipe, hit on the second call, corrupt → rebuilt."""

from __future__ import annotations

import pytest
import torch

import pipeline.bases as bases
from pipeline.bases import BaseModelError, tiny_module
from pipeline.bases.cache import BUILD_FILE, ensure_base, recipe_for
from storage import Store


@pytest.fixture
def linear(monkeypatch):
    import linear_base

    registered = bases.tiny_modules()
    monkeypatch.setattr(bases, "tiny_modules", lambda: {**registered, "linear": "linear_base"})
    linear_base.BUILDS.clear()
    return linear_base


def test_second_call_is_a_cache_hit(linear, tmp_path):
    store = Store(str(tmp_path / "store"))
    first = ensure_base("tiny:linear", store, size="smoke")
    second = ensure_base("linear", store, size="smoke")
    assert (first.source, second.source) == ("built", "cache")
    assert len(linear.BUILDS) == 1 and first.path == second.path
    assert torch.equal(linear.load(first.path), linear.load(second.path))
    assert first.path.name == f"linear-smoke-{first.recipe.hash}" and (first.path / BUILD_FILE).is_file()


def test_same_seed_same_weights_and_other_sizes_are_other_entries(linear, tmp_path):
    a = ensure_base("linear", Store(str(tmp_path / "a")), size="full")
    b = ensure_base("linear", Store(str(tmp_path / "b")), size="full")
    smoke = ensure_base("linear", Store(str(tmp_path / "a")), size="smoke")
    assert torch.equal(linear.load(a.path), linear.load(b.path))
    assert smoke.recipe.hash != a.recipe.hash


def test_recipe_hash_covers_library_versions(linear, monkeypatch):
    before = recipe_for("linear", "smoke").hash
    import pipeline.bases.cache as cache

    monkeypatch.setattr(cache, "library_versions", lambda: {"torch": "0.0"})
    assert recipe_for("linear", "smoke").hash != before


def test_corrupt_entry_is_rebuilt_not_loaded(linear, tmp_path):
    store = Store(str(tmp_path / "store"))
    built = ensure_base("linear", store, size="smoke")
    weights = built.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\xff\xff\xff\xff")
    messages = []
    again = ensure_base("linear", store, size="smoke", log=messages.append)
    assert again.source == "built" and len(linear.BUILDS) == 2
    assert any("corrupt" in m for m in messages)
    assert torch.isfinite(linear.load(again.path)).all()


def test_interrupted_build_without_build_file_is_rebuilt(linear, tmp_path):
    store = Store(str(tmp_path / "store"))
    built = ensure_base("linear", store, size="smoke")
    (built.path / BUILD_FILE).unlink()
    assert ensure_base("linear", store, size="smoke").source == "built"


def test_memory_store_builds_and_loads_through_a_local_copy(linear):
    store = Store("memory://lol-bases-test")
    built = ensure_base("linear", store, size="smoke")
    assert ensure_base("linear", store, size="smoke").source == "cache"
    assert linear.load(built.path).shape == (4, 1)


def test_unknown_tiny_name_lists_the_known_ones():
    with pytest.raises(BaseModelError, match="unknown built-in base 'tiny:shapes-xl'; known: ") as raised:
        tiny_module("tiny:shapes-xl")
    known = str(raised.value).split("known: ")[1].split(", ")
    assert sorted(known) == ["tiny:qa-lm", "tiny:shapes-clip", "tiny:shapes-sd", "tiny:shapes-sd-continued"]


def test_bases_cli_builds_and_lists(linear, tmp_path, run_cli):
    code, out, err = run_cli("bases", "build", "linear", "--size", "smoke", "--store", tmp_path / "s")
    assert code == 0, err
    assert "built" in out and "final_loss" in out
    code, out, _ = run_cli("bases", "build", "linear", "--size", "smoke", "--store", tmp_path / "s")
    assert code == 0 and "cache" in out
    code, out, _ = run_cli("bases", "list", "--store", tmp_path / "s")
    assert code == 0 and "linear-smoke-" in out



def test_concurrent_workers_build_a_missing_base_once(linear, tmp_path, monkeypatch):
    import threading
    import time

    real_build = linear.build

    def slow_build(config, out_dir, progress=None):  # long enough for the second worker to arrive mid-build
        time.sleep(0.5)
        return real_build(config, out_dir, progress)

    monkeypatch.setattr(linear, "build", slow_build)
    store_url = str(tmp_path / "store")
    sources: list[str] = []
    workers = [threading.Thread(target=lambda: sources.append(ensure_base("linear", Store(store_url), size="smoke").source))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(sources) == ["built", "cache"] and len(linear.BUILDS) == 1

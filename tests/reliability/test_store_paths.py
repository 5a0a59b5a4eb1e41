"""Paths from a manifest stay inside the store: names are validated, and `Store.path` refuses
`..`, absolute paths and symlinks that resolve outside the root — for reads, writes and deletes."""

from __future__ import annotations

import os
import uuid

import pytest

from pipeline.manifest import Manifest, ManifestError
from pipeline.publish import publish_population
from storage import Store, StoreError

from .conftest import SHAPES


@pytest.mark.parametrize("override, field", [
    ("population.name=../outside", "population.name"),
    ("population.name=/etc", "population.name"),
    ("population.name=a/b", "population.name"),
    ("population.name=a..b", "population.name"),
    ("population.name=..", "population.name"),
    ("population.name=.hidden", "population.name"),
    ('population.name="abc\\n"', "population.name"),
    ("publish.repo_id=../../x", "publish.repo_id"),
    ("publish.repo_id=/etc/passwd", "publish.repo_id"),
    ("publish.repo_id=me/a/../../b", "publish.repo_id"),
    ("publish.repo_id=me/..", "publish.repo_id"),
])
def test_manifest_names_that_become_paths_cannot_leave_the_store(override, field):
    with pytest.raises(ManifestError) as info:
        Manifest.from_yaml(SHAPES, overrides=[override])
    assert any(problem.startswith(field) for problem in info.value.problems), info.value.problems


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    return Store(f"memory://lol-paths-{uuid.uuid4().hex}")


@pytest.mark.parametrize("rel", ["../outside", "/etc/passwd", "populations/../../outside", "a/./../../b", "~/x", "a\x00b"])
def test_store_refuses_relative_paths_that_escape(store, rel):
    for call in (store.exists, store.read_bytes, store.delete, store.list_files, lambda r: store.write_bytes(r, b"x")):
        with pytest.raises(StoreError, match="leave the store"):
            call(rel)


def test_store_names_refuse_separators_and_trailing_newlines(store):
    for name in ("a/b", "..", "a..b", ".x", "abc\n", ""):
        with pytest.raises(StoreError, match="not a safe name"):
            store.population(name)


def _outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("do not touch")
    return outside


def test_a_population_folder_linked_outside_the_store_is_refused(tmp_path):
    store = Store(str(tmp_path / "store"))
    outside = _outside(tmp_path)
    os.makedirs(store.local_path("populations"), exist_ok=True)
    os.symlink(outside, store.local_path("populations/evil"))
    population = store.population("evil")
    assert population.record("job1") is None and dict(population.verify(["job1"]))["job1"][0].kind == "unsafe"
    for call in (lambda: population.write_spec("job1", "{}"), lambda: population.read_spec("job1"),
                 lambda: population.write_manifest("x: 1"), lambda: store.delete("populations/evil/precious.txt"),
                 lambda: store.local_path("populations/evil")):
        with pytest.raises(StoreError, match="outside the store"):
            call()
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]


def test_lol_finetune_into_a_linked_population_exits_2_and_writes_nothing_outside(tmp_path, run_cli, random_sd):
    from .conftest import smoke_overrides

    store = Store(str(tmp_path / "store"))
    outside = _outside(tmp_path)
    os.makedirs(store.local_path("populations"), exist_ok=True)
    os.symlink(outside, store.local_path("populations/tiny-shapes"))
    code, _, err = run_cli("finetune", SHAPES, *smoke_overrides(random_sd), "--store", store.url)
    assert code == 2 and "outside the store" in err, err
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]


def test_publish_through_a_planted_symlink_is_refused_and_its_target_survives(smoke_copy, tmp_path):
    """Publishing swapped the link and then deleted the previous target: a link planted at
    published/{name} pointing outside would have had that outside folder deleted."""
    store, manifest = smoke_copy
    outside = _outside(tmp_path)
    link = store.local_path("published") / manifest.population.name
    link.unlink()
    os.symlink(outside, link)
    publish_population(manifest, store)  # the planted link is replaced, never followed
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]
    assert (outside / "precious.txt").read_text() == "do not touch"
    assert os.path.realpath(link).startswith(os.path.realpath(store.local_path("published/.versions")))


def test_a_symlinked_file_inside_a_job_is_reported_by_verify(smoke_copy, tmp_path, run_cli):
    store, manifest = smoke_copy
    population = store.population(manifest.population.name)
    job_id = sorted(population.job_ids())[0]
    weights = store.local_path(population.job_rel(job_id, "adapter/adapter_model.safetensors"))
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(weights.read_bytes())
    weights.unlink()
    os.symlink(secret, weights)
    problems = dict(population.verify())[job_id]
    assert [(p.path, p.kind) for p in problems] == [("adapter/adapter_model.safetensors", "unsafe")]
    code, out, _ = run_cli("verify", SHAPES, *_overrides_of(manifest), "--store", store.url)
    assert code == 1 and "unsafe" in out and job_id in out


def _overrides_of(manifest: Manifest) -> list[str]:
    from .conftest import smoke_overrides

    return smoke_overrides(manifest.base.ref)


def test_download_dir_refuses_object_keys_that_climb_out_of_the_target(tmp_path):
    """Object stores keep `..` in keys verbatim; copying such a key to disk would write outside."""
    store = Store(f"memory://lol-paths-{uuid.uuid4().hex}")
    store.write_bytes("populations/p/jobs/j/adapter/ok.json", b"{}")
    store.fs.pipe_file(store.path("populations/p/jobs/j/adapter") + "/../../../../../escape.txt", b"x")
    target = tmp_path / "a" / "b" / "c" / "dl"
    with pytest.raises(StoreError, match="leave the store"):
        store.download_dir("populations/p/jobs/j/adapter", target)
    assert not list(tmp_path.rglob("escape.txt"))

"""Publishing a population as a Hugging Face dataset, and reading it back with plain `datasets`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT
from s3_server import s3_bucket  # noqa: F401  (the fixture)
from safetensors.numpy import load_file

from lol_models.published import row_to_adapter
from pipeline.finetune.diffusion import DiffusionTrainer
from pipeline.finetune.runner import finetune_population
from pipeline.manifest import Manifest
from pipeline.publish import PublishError, publish_population
from pipeline.score.runner import score_population
from storage import Store

SHAPES = ROOT / "manifests" / "tiny-shapes.yaml"


def shards(folder, split: str = "*") -> list[str]:
    """The parquet shards of `split` in a published folder, as paths inside it."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).glob(f"data/{split}-*.parquet"))


def overrides_of(manifest: Manifest) -> list[str]:
    """The overrides `population` built its manifest with."""
    return overrides(manifest.base.ref)


def overrides(base, *extra):
    return [f"base.ref={base}", "count=8", "hyperparameters.steps=1", "hyperparameters.batch_size=1",
            "lora.rank=[2, 4]", "data.subsets.num_groups=4",
            "scorers=[{name: attributes, attributes: [shape=circle, color=red|yellow|brown]}]", *extra]


@pytest.fixture(scope="module")
def population(random_sd, tmp_path_factory):
    """A store holding 8 finetuned, scored LoRAs of mixed rank (2 and 4) in 4 identity groups."""
    store = Store(str(tmp_path_factory.mktemp("store")))
    manifest = Manifest.from_yaml(SHAPES, overrides=overrides(random_sd))
    assert len(finetune_population(manifest, store, DiffusionTrainer).trained) == 8
    assert not score_population(manifest, store).failed
    return store, manifest


@pytest.fixture(scope="module")
def published(population):
    store, manifest = population
    summary = publish_population(manifest, store)
    return store, manifest, summary


def test_plain_load_dataset_in_a_fresh_process_sees_rows_columns_and_splits(published):
    store, _, summary = published
    code = textwrap.dedent(f"""
        import datasets, json
        ds = datasets.load_dataset({summary.folder!r})
        print(json.dumps({{name: [len(split), split.column_names, len(split[0]["weights"])] for name, split in ds.items()}}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                 "HOME": str(store.local_path("."))})
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert sum(n for n, _, _ in seen.values()) == 8 == sum(summary.rows.values())
    assert {name: n for name, (n, _, _) in seen.items()} == summary.rows
    columns = next(iter(seen.values()))[1]
    assert {"job_id", "rank", "weights", "attributes.shape_circle", "attributes.color_red_yellow_brown", "group"} <= set(columns)


def test_published_splits_are_the_protocols_group_splits(published):
    """With no split seed and the protocol's fractions, every published row sits in the split the
    LoL protocol gives its group, so `lol train` keeps the published splits as they are."""
    import datasets

    from lol_models.split_rule import group_split
    from pipeline.publish import split_of

    store, manifest, summary = published
    assert manifest.publish.split_seed is None
    on_disk = datasets.load_from_disk(str(Path(summary.folder) / "arrow"))
    placed = {(name, group) for name, split in on_disk.items() for group in split["group"]}
    assert len({g for _, g in placed}) > 1 and {name for name, _ in placed} == set(summary.rows)
    assert all(name == group_split(group) for name, group in placed)
    # an explicit seed keeps the seeded draw of (seed, group), which differs for some groups
    groups = [f"group:{i}" for i in range(200)]
    seeded = [split_of(g, dict(manifest.publish.splits), 0) for g in groups]
    assert seeded != [group_split(g) for g in groups] and set(seeded) == {"train", "validation", "test"}


def test_plain_load_dataset_reads_the_card_without_a_warning(published, tmp_path):
    """The card's `dataset_info` is whole (features; per split num_bytes and num_examples), so plain
    `datasets.load_dataset` takes it without a warning or log line (and checks the split sizes by it)."""
    import logging
    import warnings

    import datasets

    _, _, summary = published
    logged: list[logging.LogRecord] = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = logged.append
    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub")]  # `datasets` does not propagate
    for logger in loggers:
        logger.addHandler(catcher)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = datasets.load_dataset(summary.folder, cache_dir=str(tmp_path / "cache"))
    finally:
        for logger in loggers:
            logger.removeHandler(catcher)
    assert [record.getMessage() for record in logged] == []
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert {name: len(split) for name, split in ds.items()} == summary.rows
    header = yaml.safe_load((Path(summary.folder) / "README.md").read_text().split("---")[1])
    splits = {s["name"]: s for s in header["dataset_info"]["splits"]}
    assert {name: s["num_examples"] for name, s in splits.items()} == summary.rows
    assert all(s["num_bytes"] > 0 for s in splits.values())
    assert header["dataset_info"]["download_size"] == sum(p.stat().st_size for p in (Path(summary.folder) / "data").iterdir())


def test_a_row_rebuilds_the_exact_peft_adapter(published, tmp_path, random_sd):
    import datasets
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    store, manifest, summary = published
    folder = store.local_path(f"published/{manifest.population.name}")
    layout = json.loads((folder / "layout.json").read_text())
    ds = datasets.load_from_disk(str(folder / "arrow"))
    population = store.population(manifest.population.name)
    for split in ds.values():
        for row in split:
            rebuilt = row_to_adapter(row, layout, tmp_path / row["job_id"])
            stored_dir = store.local_path(population.job_rel(row["job_id"], "adapter"))
            original, copy = load_file(str(stored_dir / "adapter_model.safetensors")), load_file(str(rebuilt / "adapter_model.safetensors"))
            assert original.keys() == copy.keys()
            assert all(np.array_equal(original[k], copy[k]) for k in original)
    row = next(iter(ds.values()))[0]
    rebuilt = row_to_adapter(row, layout, tmp_path / "peft-check")
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([5]), torch.randn(1, 77, 32)
    with torch.no_grad():
        a = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(random_sd, subfolder="unet"), rebuilt)(x, t, text).sample
        b = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(random_sd, subfolder="unet"),
                                      store.local_path(population.job_rel(row["job_id"], "adapter")))(x, t, text).sample
    assert torch.equal(a, b)


def test_splits_are_group_disjoint_and_stable(published):
    import datasets

    store, manifest, _ = published
    ds = datasets.load_from_disk(str(store.local_path(f"published/{manifest.population.name}/arrow")))
    groups = {name: set(split["group"]) for name, split in ds.items()}
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not groups[a] & groups[b]


def test_card_yaml_parses_and_describes_the_dataset(published):
    store, manifest, summary = published
    text = (store.local_path(f"published/{manifest.population.name}") / "README.md").read_text()
    _, header, body = text.split("---", 2)
    meta = yaml.safe_load(header)
    assert meta["license"] == "cc-by-4.0"
    assert {s["split"] for s in meta["configs"][0]["data_files"]} == set(summary.rows)
    assert sum(s["num_examples"] for s in meta["dataset_info"]["splits"]) == 8
    assert "## Provenance" in body and "attributes-" in body and "## Label statistics" in body


def test_republish_swaps_versions_and_a_failed_publish_keeps_the_old(population, monkeypatch):
    import pipeline.card as card

    store, manifest = population
    publish_population(manifest, store)
    link = store.local_path(f"published/{manifest.population.name}")
    before = link.resolve()
    card_text = (link / "README.md").read_text()
    with monkeypatch.context() as patch:
        patch.setattr(card, "dataset_card", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
        with pytest.raises(RuntimeError, match="disk full"):
            publish_population(manifest, store)
    assert link.resolve() == before and (link / "README.md").read_text() == card_text
    publish_population(manifest, store)
    assert link.resolve() != before and not before.exists()  # the new version replaced the old one
    assert len(list((link.parent / ".versions").iterdir())) == 1


def test_a_killed_publishs_staging_folder_is_removed_by_the_next_publish(population, tmp_path, monkeypatch):
    """A publish SIGKILLed while its dataset is staged leaves the staged folder; the next publish on this host removes it."""
    import os
    import signal
    import tempfile
    import time

    from pipeline.finetune import staging

    store, manifest = population
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, pipeline.publish as publish
        from pipeline.manifest import Manifest
        from storage import Store
        publish._install = lambda *a: time.sleep(600)  # hold the staged folder until killed
        publish.publish_population(Manifest.from_yaml({str(SHAPES)!r}, overrides={overrides_of(manifest)!r}),
                                   Store({store.url!r}))
        """)], env={**os.environ, "TMPDIR": str(tmp_path)}, cwd=ROOT)
    left = staging.staging_root() / f"{__import__('socket').gethostname()}-{child.pid}"
    deadline = time.monotonic() + 120
    while not list(left.glob("lol-publish-*/folder/data")) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert list(left.glob("lol-publish-*/folder/data")), "the child never staged its dataset"
    summary = publish_population(manifest, store)
    assert not left.exists() and sum(summary.rows.values()) == 8
    assert list(staging.staging_root().iterdir()) == []  # this publish's own staging went too


@pytest.fixture
def hub(monkeypatch):
    """A hub on localhost (tests/fake_hub.py) that `huggingface_hub` talks to, and the token it takes."""
    import secrets

    from fake_hub import FakeHub
    from huggingface_hub import constants

    token = "hf_" + secrets.token_hex(16)
    with FakeHub(token) as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)  # what HF_ENDPOINT sets
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", token)
        yield fake


def hub_view(folder) -> dict[str, bytes]:
    """What the hub repo of a published folder should hold: everything but the Arrow copy."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] != "arrow"}


def test_publish_pushes_the_card_layout_labels_and_shards_through_upload_folder(population, hub):
    store, manifest = population
    private = Manifest.from_yaml(SHAPES, overrides=overrides(manifest.base.ref, "publish.repo_id=me/tiny", "publish.private=true"))
    summary = publish_population(private, store)
    assert summary.pushed and summary.message == "pushed to the hub as me/tiny"
    repo = hub.repos["me/tiny"]
    assert repo.visibility == "private" and hub.refused == []
    assert repo.files == hub_view(summary.folder)
    assert {"README.md", "layout.json", "labels.json"} <= set(repo.files) and shards(summary.folder)
    assert len(repo.commits) == 1  # the card and the shards it names arrive together


def test_a_push_sends_only_what_the_repo_lacks_and_removes_stale_shards(population, hub):
    from fake_hub import Repo

    store, manifest = population
    with_repo = Manifest.from_yaml(SHAPES, overrides=overrides(manifest.base.ref, "publish.repo_id=me/tiny"))
    folder = Path(publish_population(with_repo, store, push=False).folder)
    kept, stale = shards(folder)[0], "data/train-000000000000.parquet"
    hub.repos["me/tiny"] = Repo("public", {kept: (folder / kept).read_bytes(), stale: b"old rows", "notes.md": b"mine"})
    summary = publish_population(with_repo, store)
    assert summary.pushed
    repo = hub.repos["me/tiny"]
    assert repo.files == {**hub_view(summary.folder), "notes.md": b"mine"}  # files outside data/ are the owner's
    (commit,) = repo.commits
    assert kept not in commit["added"] and commit["deleted"] == [stale]
    publish_population(with_repo, store)  # nothing changed: nothing to commit
    assert len(repo.commits) == 1


def test_a_refused_push_keeps_the_local_folder_and_never_shows_the_token(population, hub, monkeypatch):
    store, manifest = population
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 32)
    with_repo = Manifest.from_yaml(SHAPES, overrides=overrides(manifest.base.ref, "publish.repo_id=me/tiny"))
    with pytest.raises(PublishError) as info:
        publish_population(with_repo, store)
    message = str(info.value)
    assert "but pushing to me/tiny failed" in message and "rerun `lol publish` to resume the push" in message
    assert "401" in message and "x" * 32 not in message and hub.unauthorized >= 1 and not hub.repos
    assert (store.local_path(f"published/{manifest.population.name}") / "README.md").is_file()


def test_offline_publish_says_it_did_not_push(population, monkeypatch):
    store, manifest = population
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with_repo = Manifest.from_yaml(SHAPES, overrides=overrides(manifest.base.ref, "publish.repo_id=me/tiny"))
    summary = publish_population(with_repo, store)
    assert not summary.pushed and "did not push to me/tiny: no HF_TOKEN set" in summary.message


def test_unscored_loras_are_listed_not_published_and_a_corrupt_one_stops_the_publish(population, tmp_path):
    store, manifest = population
    import shutil

    copy = Store(str(tmp_path / "copy"))
    shutil.copytree(store.local_path("populations"), copy.local_path("populations"))
    population_store = copy.population(manifest.population.name)
    jobs = sorted(population_store.job_ids())
    for score in copy.local_path(population_store.job_rel(jobs[1], "scores")).iterdir():
        score.unlink()
    summary = publish_population(manifest, copy)
    assert sum(summary.rows.values()) == 7 and summary.excluded[jobs[1]].startswith("not scored")
    weights = copy.local_path(population_store.job_rel(jobs[0], "adapter/adapter_model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    before = copy.local_path(f"published/{manifest.population.name}").resolve()
    with pytest.raises(PublishError, match=f"1 stored LoRA.*damaged.*{jobs[0]}"):
        publish_population(manifest, copy)
    assert copy.local_path(f"published/{manifest.population.name}").resolve() == before


def test_nothing_to_publish_is_a_clear_error(tmp_path, random_sd):
    manifest = Manifest.from_yaml(SHAPES, overrides=overrides(random_sd))
    with pytest.raises(PublishError, match="no verified, scored LoRA to publish"):
        publish_population(manifest, Store(str(tmp_path / "empty")))


def test_pull_gives_factors_whose_products_are_the_stored_updates(published):
    from lol_models.data import pull

    store, manifest, summary = published
    folder = store.local_path(f"published/{manifest.population.name}")
    population = store.population(manifest.population.name)
    total = 0
    for split in summary.rows:
        dataset = pull(folder, split=split)
        total += len(dataset)
        assert set(dataset.label_names) == {"attributes.shape_circle", "attributes.color_red_yellow_brown"}
        for i, job_id in enumerate(dataset.job_ids):
            stored = load_file(str(store.local_path(population.job_rel(job_id, "adapter/adapter_model.safetensors"))))
            record = json.loads(store.read_bytes(population.job_rel(job_id, "spec.json")))["spec"]
            scale = record["alpha"] / record["rank"]
            for group in dataset.weights.groups:
                for j, name in enumerate(group.names):
                    a = stored[f"base_model.model.{name}.lora_A.weight"]
                    b = stored[f"base_model.model.{name}.lora_B.weight"]
                    delta = group.u[i, j] @ group.v[i, j].T
                    assert torch.allclose(delta, torch.from_numpy(b @ a) * scale, atol=1e-6)
    assert total == 8


def test_pull_errors_name_the_problem(published, tmp_path):
    import shutil

    from lol_models.data import PulledDataError, pull, stream

    store, manifest, _ = published
    folder = store.local_path(f"published/{manifest.population.name}")
    with pytest.raises(PulledDataError, match="unknown split 'dev'"):
        pull(folder, split="dev")
    with pytest.raises(PulledDataError, match="not a published LoRA dataset"):
        pull(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    arrow_shard = sorted((copy / "arrow" / "train").glob("*.arrow"))[0]
    arrow_shard.write_bytes(arrow_shard.read_bytes()[:100])
    with pytest.raises(PulledDataError, match="corrupt Arrow shard"):
        list(stream(copy, split="train"))
    shutil.rmtree(copy / "arrow")  # without the Arrow view, streaming reads the parquet shards
    expected = len(pull(folder, "train"))
    assert sum(len(b) for b in stream(copy, split="train", batch_size=2)) == expected
    shard = sorted((copy / "data").glob("train-*.parquet"))[0]
    shard.write_bytes(b"PAR1" + b"\x00" * 64)
    with pytest.raises(PulledDataError, match="corrupt parquet shard"):
        list(stream(copy, split="train"))
    batches = list(stream(folder, split="train", batch_size=2))
    assert all(len(b) <= 2 for b in batches) and sum(len(b) for b in batches) == expected


def test_lol_pull_cli(published, run_cli):
    store, manifest, _ = published
    code, out, _ = run_cli("pull", store.local_path(f"published/{manifest.population.name}"), "--split", "train")
    assert code == 0 and "LoRAs, loaded in" in out and "attributes.shape_circle" in out


def _in_memory_shard_names(store: Store, manifest: Manifest, folder) -> dict[str, list[str]]:
    """The parquet shard names an in-memory writer gives (the algorithm publishing used before it
    streamed): every row's weights read from the store into one table per split."""
    import hashlib
    import io

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lol_models.published import flatten, module_factors
    from pipeline.publish import PARQUET_OPTIONS, assemble, read_adapter

    assembled = assemble(manifest, store)
    names: dict[str, list[str]] = {}
    for split in ("train", "validation", "test"):
        rows = [row for row in assembled.rows if row["split"] == split]
        if not rows:
            continue
        vectors = np.stack([flatten(module_factors(read_adapter(store, assembled.adapters[row["job_id"]])[0].tensors),
                                    assembled.layout) for row in rows])
        table = pa.table({key: [row[key] for row in rows] for key in rows[0]})
        table = table.append_column("weights", pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]))
        buffer = io.BytesIO()
        pq.write_table(datasets.Dataset(table).data.table, buffer, **PARQUET_OPTIONS)
        names[split] = [f"data/{split}-{hashlib.sha256(buffer.getvalue()).hexdigest()[:12]}.parquet"]
    return names


def test_streamed_publish_writes_the_bytes_an_in_memory_writer_writes(published):
    """Publishing streams rows shard by shard (bounded memory, issue #19); its parquet shards are
    byte-identical to those of one in-memory table per split (shard names are content hashes)."""
    store, manifest, summary = published
    card = (store.local_path(f"published/{manifest.population.name}") / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    written = {entry["split"]: sorted(shards(store.local_path(f"published/{manifest.population.name}"), entry["split"]))
               for entry in header["configs"][0]["data_files"]}
    assert written == _in_memory_shard_names(store, manifest, summary.folder)


def test_big_loras_get_smaller_shards_and_load_whole(population, tmp_path, monkeypatch):
    """A shard holds at most MAX_SHARD_BYTES of weights: with a tiny bound every row is its own
    shard, and plain `datasets.load_dataset` still reads every row in order."""
    import shutil

    import datasets

    import pipeline.publish as publish

    original, manifest = population
    shutil.copytree(original.root, tmp_path / "store", symlinks=True)
    store = Store(str(tmp_path / "store"))
    monkeypatch.setattr(publish, "MAX_SHARD_BYTES", 1)
    monkeypatch.setattr(publish, "BATCH_BYTES", 1)
    summary = publish.publish_population(manifest, store)
    folder = store.local_path(f"published/{manifest.population.name}")
    split = max(summary.rows, key=summary.rows.get)  # the largest split, whichever the group hash made it
    assert len(shards(folder, split)) == summary.rows[split] > 1
    loaded = datasets.load_dataset(str(folder), split=split, cache_dir=str(tmp_path / "cache"))
    from_disk = datasets.load_from_disk(str(folder / "arrow"))[split]
    assert sorted(loaded["job_id"]) == sorted(from_disk["job_id"]) and len(loaded) == summary.rows[split]


def test_a_publish_from_s3_writes_what_a_publish_from_a_local_disk_writes(population, s3_bucket, tmp_path):  # noqa: F811
    """The same store on moto's S3 (one listing, reads 8 at once): the same rows and the same shard bytes
    (parquet shards are named by their sha256)."""
    import fsspec

    store, manifest = population
    url = f"{s3_bucket}/publish-{tmp_path.name}"
    fs, root = fsspec.core.url_to_fs(url)
    fs.put(str(store.local_path("populations")).rstrip("/") + "/", f"{root}/populations", recursive=True)
    local, remote = publish_population(manifest, store), publish_population(manifest, Store(url))
    assert remote.rows == local.rows and remote.excluded == local.excluded
    remote_shards = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{remote.folder}/data/*.parquet"))
    assert remote_shards == [p.rsplit("/", 1)[-1] for p in shards(local.folder)]


def test_only_splits_publishes_the_planned_splits_alone(population, tmp_path):
    """A manifest run with `execution.only_splits` plans, finetunes and publishes only the jobs of
    those splits: the published dataset holds that split, every planned LoRA in it, nothing excluded."""
    import shutil

    from pipeline.jobs import expand
    from pipeline.publish import group_key, split_of

    store, manifest = population
    copy = Store(str(shutil.copytree(store.local_path("."), tmp_path / "store", symlinks=True)))
    splits = {job.job_id: split_of(group_key(job), dict(manifest.publish.splits), None) for job in expand(manifest)}
    wanted = splits[next(iter(splits))]
    only = Manifest.from_yaml(SHAPES, overrides=[*overrides_of(manifest), f"execution.only_splits=[{wanted}]"])
    assert finetune_population(only, copy, DiffusionTrainer).trained == []  # all of them are done already
    summary = publish_population(only, copy)
    assert summary.rows == {wanted: sum(s == wanted for s in splits.values())} and summary.excluded == {}, summary

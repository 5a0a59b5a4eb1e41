"""`hf:` and `folder:` data sources on stand-ins written in the paper datasets' exact hub layouts.

The stand-ins (tests/hub_standins.py) carry the real column names, features, config and split
names of flwrlabs/celeba, frgfm/imagenette and allenai/ai2_arc. No network: HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from hub_standins import (
    CELEBA_CONFIG,
    CELEBA_TRAIN_IDENTITIES,
    arc_features,
    write_arc,
    write_celeba,
    write_imagenette,
)

from pipeline.data import get_source, select_job_examples, source_examples
from pipeline.data.base import DataSourceError, ImageExample, QAExample
from pipeline.data.hub import (
    CELEBA_ATTRIBUTES,
    IMAGENETTE_CLASSES,
    DatasetUnavailableError,
    HubSource,
    arc_source,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("standins")
    write_celeba(root / "celeba")
    write_imagenette(root / "imagenette")
    write_arc(root / "ai2_arc")
    return root


def fresh(source: str, **options) -> HubSource:
    """An uncached source (get_source shares sources within a process)."""
    return HubSource(source, **options)


def ids(examples) -> list[str]:
    return [e.id for e in examples]


# ----------------------------------------------------------------------------- CelebA


def test_celeba_folder_reads_identities_and_bool_attributes_with_the_hub_defaults(standins):
    source = fresh(f"folder:{standins / 'celeba'}")
    assert source.ref.config == (CELEBA_CONFIG,)  # recognised as a copy of flwrlabs/celeba
    train = source.examples("train")
    assert len(train) == sum(CELEBA_TRAIN_IDENTITIES.values())
    example = train[0]
    assert isinstance(example, ImageExample) and example.load_image().size == (16, 16)
    assert set(CELEBA_ATTRIBUTES) <= set(example.attributes)
    assert {example.attributes[a] for a in CELEBA_ATTRIBUTES} <= {0, 1}
    assert len(source.examples("valid")) == 5  # the hub's split name, not "validation"
    assert train.identities() == sorted(CELEBA_TRAIN_IDENTITIES)  # group g is the g-th identity


def test_identity_groups_are_the_real_identities_and_small_ones_give_all_their_images(standins):
    train = fresh(f"folder:{standins / 'celeba'}").examples("train")
    identities = train.identities()  # [3, 7, 55, 101, 900] with 2, 5, 4, 6, 1 images
    for group, identity in enumerate(identities):
        chosen = train.job_examples({"kind": "identity_groups", "group": group, "group_size": 4}, seed=123)
        assert {e.attributes["identity"] for e in chosen} == {str(identity)}
        assert len(chosen) == min(4, CELEBA_TRAIN_IDENTITIES[identity])  # fewer than group_size: all of them
        assert len(set(ids(chosen))) == len(chosen)  # never repeated or padded
        again = train.job_examples({"kind": "identity_groups", "group": group, "group_size": 4}, seed=999)
        assert ids(again) == ids(chosen)  # a group's images do not depend on the job's seed


def test_min_identity_images_drops_small_identities_and_too_many_groups_is_an_error(standins):
    source = fresh(f"folder:{standins / 'celeba'}", columns={"min_identity_images": 4})
    train = source.examples("train")
    assert train.identities() == [7, 55, 101]  # 3 (2 images) and 900 (1 image) are not groups
    from pipeline.manifest import IdentityGroups

    with pytest.raises(DataSourceError, match=r"num_groups is 4, but split 'train' .* has 3 identities with ≥ 4 image"):
        train.check_subsets(IdentityGroups(kind="identity_groups", num_groups=4, group_size=4))
    train.check_subsets(IdentityGroups(kind="identity_groups", num_groups=3, group_size=4))


def test_job_data_does_not_depend_on_shard_order_or_on_the_readme(standins, tmp_path):
    original = fresh(f"folder:{standins / 'celeba'}").examples("train")
    swapped = tmp_path / "swapped"
    shutil.copytree(standins / "celeba", swapped)
    shards = swapped / CELEBA_CONFIG
    a, b = shards / "train-00000-of-00002.parquet", shards / "train-00001-of-00002.parquet"
    a.rename(shards / "tmp.parquet"), b.rename(a), (shards / "tmp.parquet").rename(b)  # rows now in another order
    (swapped / "README.md").unlink()  # split names come from the file names then
    other = fresh(f"folder:{swapped}").examples("train")
    assert ids(other) != ids(original)  # really stored in another order
    for group in range(5):
        d = {"kind": "identity_groups", "group": group, "group_size": 4}
        assert ids(other.job_examples(d, 1)) == ids(original.job_examples(d, 1))
    assert len(fresh(f"folder:{swapped}").examples("valid")) == 5


# ----------------------------------------------------------------------------- Imagenette


def test_imagenette_class_subsets_are_the_real_classes_by_name(standins):
    source = fresh(f"folder:{standins / 'imagenette'}")
    assert source.ref.config == ("full_size",)  # the default of the three configs the repo has
    train = source.examples("train")
    assert sorted(train.class_rows()) == sorted(IMAGENETTE_CLASSES.values())  # WordNet ids → the card's names
    d = {"kind": "class_subsets", "classes": ["tench", "English springer", "parachute"], "images_per_class": 2}
    chosen = train.job_examples(d, seed=4)
    assert [e.label for e in chosen] == ["tench"] * 2 + ["English springer"] * 2 + ["parachute"] * 2
    assert ids(train.job_examples(d, seed=4)) == ids(chosen)
    others = {tuple(ids(train.job_examples(d, seed=s))) for s in range(8)}
    assert len(others) > 1  # the job's seed picks which images of each class


def test_a_partial_download_of_one_config_is_still_recognised(standins, tmp_path):
    """`hf download frgfm/imagenette … --include 'full_size/*' --local-dir DIR` leaves one config
    folder and the download metadata under .cache/."""
    shutil.copytree(standins / "imagenette" / "full_size", tmp_path / "imagenette" / "full_size")
    (tmp_path / "imagenette" / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / "imagenette" / ".cache" / "huggingface" / "0000.parquet.metadata").write_text("x")
    source = fresh(f"folder:{tmp_path / 'imagenette'}")
    assert source.ref.config == ("full_size",)
    assert sorted(source.examples("train").class_rows()) == sorted(IMAGENETTE_CLASSES.values())


def test_a_class_not_in_the_dataset_names_the_valid_ones(standins):
    train = fresh(f"folder:{standins / 'imagenette'}").examples("train")
    with pytest.raises(DataSourceError, match=r"\['golden retriever'\] are not in split 'train'.*its classes: .*tench"):
        from pipeline.manifest import ClassSubsets

        train.check_subsets(ClassSubsets(kind="class_subsets", classes=["tench", "golden retriever"]))


def test_the_manifest_paths_draw_real_subsets(standins):
    from pipeline.jobs import expand
    from pipeline.manifest import Manifest

    m = Manifest.from_yaml(ROOT / "manifests" / "imagenette-sd14-r32.yaml", overrides=[
        f"data.source=folder:{standins / 'imagenette'}", "data.subsets.images_per_class=2", "count=4"])
    examples = source_examples(m)
    for job in expand(m):
        chosen = select_job_examples(examples, job.spec.data, job.spec.seed)
        assert [e.label for e in chosen] == [c for c in job.spec.data["classes"] for _ in range(2)]


# ----------------------------------------------------------------------------- ARC


def test_arc_folder_pools_both_configs_with_sources_from_id_prefixes(standins):
    source = fresh(f"folder:{standins / 'ai2_arc'}")
    assert source.ref.config == ("ARC-Challenge", "ARC-Easy")
    train = source.examples("train")
    assert len(train) == 56 and all(isinstance(q, QAExample) for q in train)
    assert {q.source for q in train} == {"Mercury", "MCAS", "TIMSS", "NYSEDREGENTS", "ACTAAP", "AKDE&ED", "LEAP"}
    assert arc_source("LEAP__5_10314") == "LEAP" and arc_source("AKDE&ED_2008_8_51") == "AKDE&ED"
    digit = next(q for q in train if q.id.endswith("_4"))  # row 4 uses labels 1..4 with answerKey "1"
    assert digit.answer == 0 and len(digit.choices) == 4
    assert {q.answer for q in train} == {0, 1, 2, 3}
    one = fresh(f"folder:{standins / 'ai2_arc'}", config="ARC-Easy").examples("test")
    assert len(one) == 10 and all("ARC-Easy" in q.question for q in one)


def test_source_subsets_draw_the_real_sources(standins):
    from pipeline.jobs import expand
    from pipeline.manifest import Manifest

    m = Manifest.from_yaml(ROOT / "manifests" / "qwen2-arc.yaml", overrides=[
        f"data.source=folder:{standins / 'ai2_arc'}", "data.subsets.sources=[MCAS, TIMSS, NYSEDREGENTS, Mercury]", "count=6"])
    examples = source_examples(m)
    for job in expand(m):
        chosen = select_job_examples(examples, job.spec.data, job.spec.seed)
        assert {q.source for q in chosen} == set(job.spec.data["sources"])


def test_a_save_to_disk_folder_reads_like_the_hub_copy(standins, tmp_path):
    import datasets

    for config in ("ARC-Challenge", "ARC-Easy"):
        parts = {s: datasets.Dataset.from_parquet(str(standins / "ai2_arc" / config / f"{s}-00000-of-00001.parquet"),
                                                  features=arc_features()) for s in ("train", "validation", "test")}
        datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "saved" / config))
    saved = fresh(f"folder:{tmp_path / 'saved'}").examples("validation")
    hub_copy = fresh(f"folder:{standins / 'ai2_arc'}").examples("validation")
    assert saved == hub_copy


def test_choices_answer_mismatch_names_the_question_and_the_valid_keys(tmp_path):
    import datasets

    rows = {"id": ["MCAS_1", "MCAS_2"], "question": ["q1", "q2"],
            "choices": [{"text": ["a", "b"], "label": ["A", "B"]}, {"text": ["a", "b"], "label": ["A", "B"]}],
            "answerKey": ["A", "E"]}
    (tmp_path / "qa").mkdir()
    datasets.Dataset.from_dict(rows, features=arc_features()).to_parquet(str(tmp_path / "qa" / "train-00000-of-00001.parquet"))
    with pytest.raises(DataSourceError, match=r"question 'MCAS_2' .*row 1.*answer key 'E' is not one of the choice labels \['A', 'B'\]"):
        fresh(f"folder:{tmp_path / 'qa'}").examples("train")


# ----------------------------------------------------------------------------- bad input


def test_a_mapped_column_that_is_missing_names_it_and_lists_the_columns(standins):
    source = fresh(f"folder:{standins / 'celeba'}", columns={"identity": "person"})
    with pytest.raises(DataSourceError, match=r"no column 'person' \(mapped as the identity\); its columns: image \(image\), celeb_id \(value:int64\)"):
        source.examples("train")


def test_an_unknown_split_lists_the_splits(standins):
    with pytest.raises(DataSourceError, match=r"no split 'validation'"):
        fresh(f"folder:{standins / 'celeba'}").examples("validation")


def test_an_unreadable_image_names_the_row(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat"])})
    (tmp_path / "bad" / "train").mkdir(parents=True)
    datasets.Dataset.from_dict({"image": [{"bytes": b"not an image", "path": None}], "label": [0]},
                               features=features).to_parquet(str(tmp_path / "bad" / "train" / "0000.parquet"))
    train = fresh(f"folder:{tmp_path / 'bad'}").examples("train")
    with pytest.raises(DataSourceError, match=r"\(folder:.*bad, split 'train', row 0\) cannot be read as an image"):
        train[0].load_image()


def write_image_folder(folder: Path, metadata: str, rows: list[dict]) -> None:
    """Images named by rows' `file_name`, and the rows as `datasets`' imagefolder metadata (csv or jsonl)."""
    import csv
    import json

    from PIL import Image

    folder.mkdir(parents=True)
    for i, row in enumerate(rows):
        Image.new("RGB", (8, 8), (30 * i, 60, 90)).save(folder / row["file_name"])
    with open(folder / f"metadata.{metadata}", "w", newline="") as f:
        if metadata == "csv":
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        else:
            f.writelines(json.dumps(row) + "\n" for row in rows)


@pytest.mark.parametrize("metadata", ["csv", "jsonl"])
def test_an_image_folder_with_metadata_beside_the_images_reads_as_datasets_imagefolder(tmp_path, metadata):
    """my-images/{img*.png, metadata.csv} (and train/ test/ folders each with their own metadata): the
    metadata file's columns join the images, as `datasets.load_dataset("imagefolder")` joins them."""
    import datasets
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    from pipeline.data.hub import IMAGEFOLDER_METADATA

    assert set(IMAGEFOLDER_METADATA) == set(ImageFolder.METADATA_FILENAMES)
    rows = [{"file_name": f"img{i}.png", "caption": f"a photo of {p}", "person": p, "smiling": i % 2 == 0}
            for i, p in enumerate(["bo", "ana", "bo", "ana", "cy"])]
    write_image_folder(tmp_path / "flat", metadata, rows)
    columns = {"caption": "caption", "identity": "person", "attributes": ["smiling"]}
    train = fresh(f"folder:{tmp_path / 'flat'}", columns=columns).examples("train")
    assert len(train) == 5 and train.identities() == ["ana", "bo", "cy"]
    assert sorted(e.caption for e in train) == sorted(r["caption"] for r in rows)
    assert sorted(e.attributes["smiling"] for e in train) == [0, 0, 1, 1, 1]
    expected = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "flat"), split="train")
    assert sorted(train[i].caption for i in range(5)) == sorted(expected["caption"])

    write_image_folder(tmp_path / "splits" / "train", metadata, rows[:3])
    write_image_folder(tmp_path / "splits" / "test", metadata, rows[3:])
    source = fresh(f"folder:{tmp_path / 'splits'}", columns=columns)
    assert source.splits() == ("test", "train")
    assert sorted(e.caption for e in source.examples("test")) == ["a photo of ana", "a photo of cy"]
    assert source.examples("train").identities() == ["ana", "bo"]


def test_a_metadata_file_joins_images_only(tmp_path):
    """Beside images a metadata file belongs to the image folder; alone it is a data file (a csv dataset
    may be called metadata.csv), and beside other data files it is still a mixed split."""
    from pipeline.data.hub import _builder

    assert _builder([str(tmp_path / "x.png"), str(tmp_path / "metadata.jsonl")]) == "imagefolder"
    assert _builder([str(tmp_path / "metadata.csv")]) == "csv"
    with pytest.raises(DataSourceError, match=r"mixed file types \['csv', 'parquet'\]"):
        _builder([str(tmp_path / "train-00000-of-00001.parquet"), str(tmp_path / "metadata.csv")])


def test_a_missing_folder_says_what_is_there(tmp_path):
    (tmp_path / "celeba-download").mkdir()
    with pytest.raises(DataSourceError, match=r"does not exist; .* holds: celeba-download"):
        fresh(f"folder:{tmp_path / 'celeba'}").examples("train")


# ----------------------------------------------------------------------------- offline


def test_an_uncached_hub_dataset_offline_fails_fast_with_the_fetch_command():
    started = time.monotonic()
    with pytest.raises(DatasetUnavailableError) as info:
        fresh("hf:flwrlabs/celeba").examples("train")
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "\n" not in message
    assert ("hf download flwrlabs/celeba --repo-type dataset --include 'img_align+identity+attr/*' "
            "--local-dir datasets/celeba") in message
    assert "HF_HOME=" in message and "data.source=folder:datasets/celeba" in message


def test_lol_finetune_of_a_paper_manifest_offline_is_one_line_and_exit_2(run_cli, tmp_path):
    code, out, err = run_cli("finetune", str(ROOT / "manifests" / "qwen2-arc.yaml"), "--store", str(tmp_path / "store"))
    assert code == 2
    assert "Traceback" not in out + err
    assert "hf download allenai/ai2_arc --repo-type dataset" in err
    assert not (tmp_path / "store" / "populations" / "qwen2-arc" / "jobs").exists()


def test_get_source_shares_a_source_within_the_process(standins):
    a = get_source(f"folder:{standins / 'ai2_arc'}", config=None, revision=None, columns=None)
    b = get_source(f"folder:{standins / 'ai2_arc'}", config=None, revision=None, columns=None)
    assert a is b

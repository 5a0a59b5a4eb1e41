"""`lol pull` on hostile published folders (issue 20, finding 4).

A published folder comes from outside. Whatever it holds — JSON nested past any recursion
limit, a split saved with 0 rows, Arrow file names that climb out of the folder or symlinks
that lead out of it, NaN/Inf labels — `pull` and `stream` answer with a `PulledDataError`
(the CLI: exit 2 and one error line), never a traceback, and never open a file outside the
folder.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

LABELS = {"score": {"scorer": "s", "scorer_id": "s-1", "label": "score"}}


def _layout():
    from lol_models.published import make_layout

    return make_layout({"m": (np.zeros((2, 3), np.float32), np.zeros((4, 2), np.float32))}, 2)


def _rows(prefix: str, n: int, labels=None) -> list[dict]:
    labels = labels if labels is not None else [float(i) for i in range(n)]
    return [{"job_id": f"{prefix}{i}", "group": f"g{i}", "rank": 2, "alpha": 2.0, "score": labels[i]} for i in range(n)]


def _write(folder: Path, splits: dict[str, list[dict]]) -> Path:
    """A published folder (arrow/, layout.json, labels.json) holding `splits` (split -> rows)."""
    import datasets

    from pipeline.publish import in_memory_dataset

    layout = _layout()
    rng = np.random.default_rng(0)
    dataset = {name: in_memory_dataset(rows, rng.standard_normal((len(rows), layout["size"])).astype(np.float32))
               for name, rows in splits.items()}
    folder.mkdir(parents=True, exist_ok=True)
    datasets.DatasetDict(dataset).save_to_disk(str(folder / "arrow"))
    (folder / "layout.json").write_text(json.dumps(layout))
    (folder / "labels.json").write_text(json.dumps(LABELS))
    return folder


@pytest.fixture
def published(tmp_path) -> Path:
    return _write(tmp_path / "published", {"train": _rows("job", 4), "test": _rows("t", 2)})


def _refused(folder, run_cli, match: str, split: str = "train") -> None:
    """pull and stream raise PulledDataError matching `match`; `lol pull` exits 2 without a traceback."""
    from lol_models.data import PulledDataError, pull, stream

    with pytest.raises(PulledDataError, match=match):
        pull(folder, split)
    with pytest.raises(PulledDataError, match=match):
        list(stream(folder, split))
    code, out, err = run_cli("pull", folder, "--split", split)
    assert code == 2 and "error:" in err and "Traceback" not in out + err, (code, out, err)


def test_the_intact_folder_loads(published, run_cli):
    from lol_models.data import pull, stream

    assert pull(published).job_ids == ["job0", "job1", "job2", "job3"] and len(pull(published, "test")) == 2
    assert sum(len(batch) for batch in stream(published, batch_size=3)) == 4
    code, out, _ = run_cli("pull", published)
    assert code == 0 and "4 LoRAs" in out


@pytest.mark.parametrize("name", ["layout.json", "labels.json"])
@pytest.mark.parametrize("depth", [100_000, 900])  # past the recursion limit; under it but absurd
def test_deeply_nested_json_is_refused(published, run_cli, name, depth):
    (published / name).write_text("[" * depth + "]" * depth)
    _refused(published, run_cli, "nested")


def test_deeply_nested_values_inside_a_valid_layout_are_refused(published, run_cli):
    layout = json.loads((published / "layout.json").read_text())
    layout["modules"][0]["name"] = json.loads("[" * 900 + "]" * 900)
    (published / "layout.json").write_text(json.dumps(layout))
    _refused(published, run_cli, "nested")
    labels = {"score": {"scorer": json.loads("[" * 20 + "]" * 20), "scorer_id": "s-1", "label": "score"}}
    (published / "labels.json").write_text(json.dumps(labels))
    (published / "layout.json").write_text(json.dumps(_layout()))
    _refused(published, run_cli, "labels.json")


def test_a_split_saved_with_zero_rows_is_refused(tmp_path, run_cli):
    import datasets

    from pipeline.publish import in_memory_dataset

    folder = _write(tmp_path / "published", {"train": _rows("job", 3)})
    empty = in_memory_dataset(_rows("x", 1), np.zeros((1, _layout()["size"]), np.float32)).select([])
    datasets.DatasetDict({"train": datasets.load_from_disk(str(folder / "arrow"))["train"], "test": empty}) \
        .save_to_disk(str(tmp_path / "arrow"))
    shutil.rmtree(folder / "arrow")
    shutil.move(str(tmp_path / "arrow"), folder / "arrow")
    from lol_models.data import pull

    assert len(pull(folder, "train")) == 3
    _refused(folder, run_cli, "0 rows", split="test")


@pytest.mark.parametrize("name", ["../../../outside.arrow", "/{outside}", "sub/../../../../outside.arrow"])
def test_data_file_names_that_leave_the_folder_are_refused_before_any_read(tmp_path, published, run_cli, name):
    # A valid Arrow file outside the folder, holding rows the folder does not have: the old reader loaded them.
    outside = _write(tmp_path / "elsewhere", {"train": _rows("OUTSIDE", 2)})
    secret = tmp_path / "outside.arrow"
    shutil.copy(next((outside / "arrow" / "train").glob("*.arrow")), secret)
    state_path = published / "arrow" / "train" / "state.json"
    state = json.loads(state_path.read_text())
    state["_data_files"] = [{"filename": name.format(outside=secret)}]
    state_path.write_text(json.dumps(state))
    assert (published / "arrow" / "train" / name.format(outside=secret)).resolve() == secret.resolve()
    _refused(published, run_cli, "plain file")


def test_symlinks_that_leave_the_folder_are_refused(tmp_path, published, run_cli):
    outside = _write(tmp_path / "elsewhere", {"train": _rows("OUTSIDE", 2)})
    shard = next((published / "arrow" / "train").glob("*.arrow"))
    shard.unlink()
    shard.symlink_to(next((outside / "arrow" / "train").glob("*.arrow")))
    _refused(published, run_cli, "outside the published folder")

    shutil.rmtree(published / "arrow")
    (published / "arrow").symlink_to(outside / "arrow")
    _refused(published, run_cli, "outside the published folder")

    (published / "arrow").unlink()
    _write(tmp_path / "again", {"train": _rows("job", 2)})
    shutil.copytree(tmp_path / "again" / "arrow", published / "arrow")
    (published / "labels.json").unlink()
    (published / "labels.json").symlink_to(outside / "labels.json")
    _refused(published, run_cli, "outside the published folder")


def test_a_published_folder_behind_a_symlink_still_loads(tmp_path, published):
    """`published/{population}` is itself a link into `.versions/`: links *to* the folder are fine."""
    from lol_models.data import pull

    link = tmp_path / "current"
    link.symlink_to(published)
    assert len(pull(link)) == 4


@pytest.mark.parametrize("split", ["../train", "../../elsewhere/arrow/train", "/tmp", ".hidden"])
def test_split_names_that_leave_the_folder_are_refused(tmp_path, published, run_cli, split):
    listing = published / "arrow" / "dataset_dict.json"
    listing.write_text(json.dumps({"splits": ["train", "test", split]}))
    _refused(published, run_cli, "plain file or split name", split=split)


def test_hostile_state_and_listing_files_are_refused(published, run_cli):
    state = published / "arrow" / "train" / "state.json"
    shard = json.loads(state.read_text())["_data_files"][0]["filename"]
    repeated = json.dumps({"_data_files": [{"filename": shard}] * 15000})  # second review: 30,000 rows, 3 GB
    for text, match in (('{"_data_files": "x"}', "_data_files"), ('{"_data_files": []}', "0 rows"),
                        (repeated, "more than once"),
                        ('{"_data_files": [{"filename": "data.parquet"}]}', "not an .arrow"),
                        ("[" * 5000 + "]" * 5000, "nested"), ("{", "not JSON")):
        state.write_text(text)
        _refused(published, run_cli, match)
    (published / "arrow" / "dataset_dict.json").write_text('{"splits": 3}')
    _refused(published, run_cli, "dataset_dict.json")


def test_a_corrupt_shard_is_refused(published, run_cli):
    shard = next((published / "arrow" / "train").glob("*.arrow"))
    shard.write_bytes(shard.read_bytes()[:100])
    _refused(published, run_cli, "corrupt")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_labels_fail_or_are_skipped_and_counted(tmp_path, run_cli, bad):
    from lol_models.data import PulledDataError, pull, stream

    folder = _write(tmp_path / "published", {"train": _rows("job", 5, [0.0, bad, 2.0, bad, 4.0])})
    with pytest.raises(PulledDataError, match=r"2 row\(s\) hold NaN/Inf labels, e.g. job1 \(score\)"):
        pull(folder)
    with pytest.raises(PulledDataError, match="NaN/Inf labels"):
        list(stream(folder))
    kept = pull(folder, non_finite="skip")
    assert kept.job_ids == ["job0", "job2", "job4"] and kept.skipped_labels == {"job1": 1, "job3": 1} and not kept.skipped
    assert kept.labels["score"].tolist() == [0.0, 2.0, 4.0]
    assert sum(len(b) for b in stream(folder, non_finite="skip", batch_size=2)) == 3
    code, out, err = run_cli("pull", folder)
    assert code == 2 and "NaN/Inf labels" in err and "Traceback" not in out + err
    code, out, _ = run_cli("pull", folder, "--non-finite", "skip")
    assert code == 0 and "skipped 2 row(s) with NaN/Inf labels: job1 (1), job3 (1)" in out


def test_non_finite_alpha_counts_as_non_finite_weights(tmp_path):
    from lol_models.data import PulledDataError, pull

    rows = _rows("job", 3)
    rows[2]["alpha"] = math.nan
    folder = _write(tmp_path / "published", {"train": rows})
    with pytest.raises(PulledDataError, match="NaN/Inf weights, e.g. job2"):
        pull(folder)
    assert pull(folder, non_finite="skip").skipped == {"job2": 1}


def test_a_float_rank_column_is_refused(tmp_path, run_cli):
    rows = _rows("job", 2)
    rows[1]["rank"] = math.nan
    folder = _write(tmp_path / "published", {"train": rows})
    _refused(folder, run_cli, "rank")


def test_a_folder_of_parquet_shards_only_is_read_inside_the_folder(tmp_path, published, run_cli):
    import datasets
    import pyarrow.parquet as pq

    from lol_models.data import pull

    (published / "data").mkdir()
    pq.write_table(datasets.load_from_disk(str(published / "arrow"))["train"].data.table, published / "data" / "train-0.parquet")
    shutil.rmtree(published / "arrow")
    assert pull(published).job_ids == ["job0", "job1", "job2", "job3"]
    # A README whose YAML header points the hub loader at files elsewhere changes nothing: only data/ is read.
    (published / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files: ../../**\n---\n")
    assert len(pull(published)) == 4
    outside = _write(tmp_path / "elsewhere", {"train": _rows("OUTSIDE", 2)})
    pq.write_table(datasets.load_from_disk(str(outside / "arrow"))["train"].data.table, tmp_path / "secret.parquet")
    (published / "data" / "train-1.parquet").symlink_to(tmp_path / "secret.parquet")
    _refused(published, run_cli, "outside the published folder")

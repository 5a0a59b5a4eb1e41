"""`lol finetune` / `lol run` check the data before any job trains (pipeline/preflight.py).

- an image a pending job would train on that does not decode: exit 2 naming the row and file;
- a scorer's benchmark that does not load: exit 2 before finetuning, not after it;
- a `folder:` whose files changed under a half-finished population: exit 2, while a copy of the
  same files elsewhere (other paths and modification times) is the same data.
Nothing is written to the store's jobs by a refused run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_standins import CELEBA_TRAIN_IDENTITIES, write_arc, write_celeba

from pipeline.data.content import folder_sha256, hub_commit
from pipeline.data.hub import HubSource

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def records(store: Path) -> list[Path]:
    return list(store.rglob("record.json"))


def corrupt_identity(celeba: Path, identity: int) -> int:
    """Replace the image bytes of every row of `identity` in the train shards; its first row in the split."""
    first, offset = None, 0
    for shard in sorted((celeba / "img_align+identity+attr").glob("train-*.parquet")):
        table = pq.read_table(shard)
        ids = table.column("celeb_id").to_pylist()
        images = table.column("image").to_pylist()
        rows = [i for i, v in enumerate(ids) if v == identity]
        for i in rows:
            images[i] = {"bytes": b"not an image", "path": f"broken-{offset + i}.jpg"}
        column = table.schema.get_field_index("image")
        table = table.set_column(column, table.schema.field(column), pa.array(images, type=table.schema.field(column).type))
        pq.write_table(table, shard)
        first = offset + rows[0] if first is None and rows else first
        offset += len(ids)
    assert first is not None, "the identity has images"
    return first


CELEBA = ["data.subsets.num_groups=1", "data.subsets.group_size=2", "count=2", "hyperparameters.steps=1",
          "hyperparameters.gradient_accumulation=1", "hyperparameters.resolution=32",
          "scorers=[{name: attributes, attributes: [Male]}]"]


def test_an_undecodable_training_image_exits_2_naming_its_row_before_any_job(run_cli, random_sd, tmp_path):
    celeba = write_celeba(tmp_path / "celeba")
    first = sorted(CELEBA_TRAIN_IDENTITIES)[0]  # group 0: every job of num_groups=1 trains on it
    row = corrupt_identity(celeba, first)
    code, out, err = run_cli("finetune", MANIFESTS / "celeba-sd14.yaml", f"base.ref={random_sd}", "base.revision=null",
                             f"data.source=folder:{celeba}", *CELEBA, "--store", tmp_path / "store")
    lines = error_lines(err)
    assert code == 2 and "Traceback" not in err and len(lines) == 1, out + err
    assert f"split 'train', row {row}" in lines[0] and "cannot be read as an image" in lines[0] and "broken-" in lines[0]
    assert not records(tmp_path / "store")


def test_lol_run_refuses_the_same_image_before_any_task(run_cli, random_sd, tmp_path, prefect_harness, capsys):
    celeba = write_celeba(tmp_path / "celeba")
    corrupt_identity(celeba, sorted(CELEBA_TRAIN_IDENTITIES)[0])
    capsys.readouterr()  # the stand-in writer's progress bars
    code, _, err = run_cli("run", MANIFESTS / "celeba-sd14.yaml", f"base.ref={random_sd}", "base.revision=null",
                           f"data.source=folder:{celeba}", *CELEBA, "--store", tmp_path / "store")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "cannot be read as an image" in lines[0], err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.strip()]) == 1, err[-3000:]  # no Prefect logs
    assert not (tmp_path / "store").exists()  # refused before the store was created


ARC = ["base.ref=tiny:qa-lm", "base.revision=null", "base.size=smoke", "data.subsets.sources=[MCAS, TIMSS]",
       "count=1", "hyperparameters.epochs=1", "hyperparameters.batch_size=8"]


def test_a_scorer_benchmark_that_does_not_load_exits_2_before_finetuning(run_cli, tmp_path):
    arc = write_arc(tmp_path / "ai2_arc")
    missing = tmp_path / "arc-typo"
    code, _, err = run_cli("finetune", MANIFESTS / "qwen2-arc.yaml", *ARC, f"data.source=folder:{arc}",
                           f"scorers=[{{name: mc_accuracy, benchmark: 'folder:{missing}', split: test, limit: 4}}]",
                           "--store", tmp_path / "store")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and f"benchmark folder {missing} (scorers[0].benchmark" in lines[0], err
    assert "does not exist" in lines[0] and not records(tmp_path / "store")


def test_changed_data_under_a_population_exits_2_and_a_copy_of_the_same_files_does_not(run_cli, tmp_path):
    arc = write_arc(tmp_path / "ai2_arc")
    store = tmp_path / "store"

    def finetune(folder: Path, count: int) -> tuple[int, str]:
        code, _, err = run_cli("finetune", MANIFESTS / "qwen2-arc.yaml", *ARC, f"count={count}", f"data.source=folder:{folder}",
                               f"scorers=[{{name: mc_accuracy, benchmark: 'folder:{folder}', split: test, limit: 4}}]",
                               "--store", store)
        return code, err

    assert finetune(arc, 1)[0] == 0 and len(records(store)) == 1
    copy = tmp_path / "elsewhere" / "ai2_arc"  # other path, other mtimes, same bytes: the same data
    shutil.copytree(arc, copy)
    os.utime(next(copy.rglob("*.parquet")), (1, 1))
    # the job ids hash the source as written, so point the original path at the copy's bytes
    shutil.rmtree(arc)
    shutil.copytree(copy, arc)
    assert finetune(arc, 2)[0] == 0 and len(records(store)) == 2

    shutil.rmtree(arc)
    write_arc(arc)  # the same layout with one question changed
    parquet = arc / "ARC-Easy" / "train-00000-of-00001.parquet"
    table = pq.read_table(parquet)
    questions = table.column("question").to_pylist()
    questions[0] = questions[0] + " (edited)"
    pq.write_table(table.set_column(table.schema.get_field_index("question"), "question", pa.array(questions)), parquet)
    code, err = finetune(arc, 3)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "has changed since its LoRAs were trained on it" in lines[0], err
    assert "config ARC-Easy" in lines[0] and "ARC-Challenge" not in lines[0] and "population.version" in lines[0]
    assert len(records(store)) == 2


def test_content_identifies_bytes_not_paths_and_names_unnamed_configs_default(tmp_path):
    arc = write_arc(tmp_path / "a")
    copy = shutil.copytree(arc, tmp_path / "b")
    assert folder_sha256(arc) == folder_sha256(copy)
    (copy / "ARC-Easy" / "notes.txt").write_text("x")  # not data: the same data
    (copy / "Thumbs.db").write_bytes(b"\0")
    assert folder_sha256(arc) == folder_sha256(copy)
    (copy / "ARC-Easy" / "extra-00000-of-00001.parquet").write_bytes(b"PAR1")  # a data file: other data
    assert folder_sha256(arc) != folder_sha256(copy)

    easy = tmp_path / "easy"
    shutil.copytree(arc / "ARC-Easy", easy)  # one unnamed config
    provenance = HubSource(f"folder:{easy}").provenance("train")
    assert set(provenance["fingerprints"]) == set(provenance["content"]) == {"default"}
    assert provenance["content"]["default"] == "sha256:" + folder_sha256(easy)


def test_two_folders_of_the_same_name_read_their_own_data(tmp_path):
    """`datasets` caches a README-declared folder by its name and file patterns; ours by its content."""
    first = write_celeba(tmp_path / "one" / "celeba")
    second = write_celeba(tmp_path / "two" / "celeba")
    corrupt_identity(second, 3)

    def images(folder: Path) -> list[bytes]:
        examples = HubSource(f"folder:{folder}", config="img_align+identity+attr").examples("train")
        return [e.image_bytes for e in examples.job_examples({"kind": "identity_groups", "group": 0, "group_size": 2}, 0)]

    assert all(b.startswith(b"\x89PNG") for b in images(first))
    assert images(second) == [b"not an image"] * 2


def test_hub_commit_reads_the_cache_ref(tmp_path):
    refs = tmp_path / "datasets--allenai--ai2_arc" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    assert hub_commit("allenai/ai2_arc", None, str(tmp_path)) == "a" * 40
    assert hub_commit("allenai/ai2_arc", "b" * 40, str(tmp_path)) == "b" * 40  # a commit pins itself
    assert hub_commit("allenai/ai2_arc", "v2", str(tmp_path)) is None


# ----------------------------------------------------------------------------- an outside review's findings

QUESTIONS = ["base.ref=tiny:qa-lm", "base.revision=null", "base.size=smoke", "count=1", "hyperparameters.epochs=1",
             "hyperparameters.mixed_precision=no", "scorers=[{name: sources}]"]


def write_questions(folder: Path, suffix: str = "jsonl", rows: int = 9) -> Path:
    import csv
    import json

    (folder / "train").mkdir(parents=True)
    items = [{"id": f"q{i}", "question": f"Which fact {i} holds?", "choices": [f"fact {k}" for k in range(4)],
              "answer": "ABCD"[i % 4], "topic": ("biology", "chemistry", "physics")[i % 3]} for i in range(rows)]
    path = folder / "train" / f"questions.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(item) + "\n" for item in items))
    else:  # CSV: the choices as a JSON list in their cell
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(items[0]))
            writer.writeheader()
            writer.writerows({**item, "choices": json.dumps(item["choices"])} for item in items)
    return folder


def questions(run_cli, folder: Path, store: Path, *extra: str) -> tuple[int, str]:
    code, _, err = run_cli("finetune", MANIFESTS / "example-own-questions.yaml", f"data.source=folder:{folder}",
                           *QUESTIONS, *extra, "--store", store)
    return code, err


def test_a_malformed_jsonl_line_is_one_line_naming_the_folder(run_cli, tmp_path):
    folder = write_questions(tmp_path / "q")
    with open(folder / "train" / "questions.jsonl", "a") as f:
        f.write('{"id": "x", "question": "broken\n')
    code, err = questions(run_cli, folder, tmp_path / "store")
    lines = [line for line in err.splitlines() if line.strip() and "examples/s]" not in line]  # datasets' bars in-process
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert "row 9" in lines[0] or "line 10" in lines[0], lines[0]  # where the broken line is
    assert f"split 'train' in {folder} cannot be read" in lines[0] and not records(tmp_path / "store")


def test_questions_in_a_csv_hold_their_choices_as_a_json_list(run_cli, tmp_path):
    code, err = questions(run_cli, write_questions(tmp_path / "q", "csv"), tmp_path / "store")
    assert code == 0, err
    assert len(records(tmp_path / "store")) == 1


def test_a_blank_source_cell_is_refused_naming_the_row(run_cli, tmp_path):
    folder = write_questions(tmp_path / "q")
    text = (folder / "train" / "questions.jsonl").read_text().replace('"topic": "chemistry"', '"topic": ""', 1)
    (folder / "train" / "questions.jsonl").write_text(text)
    code, err = questions(run_cli, folder, tmp_path / "store")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "row 1" in lines[0] and "no value in the source column 'topic'" in lines[0], err


def test_a_blank_identity_cell_is_refused_naming_the_row(tmp_path):
    from pipeline.data.base import DataSourceError

    folder = tmp_path / "people"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"img{i}.png")
    (folder / "metadata.csv").write_text("file_name,person\nimg0.png,ana\nimg1.png,\nimg2.png,bo\n")
    with pytest.raises(DataSourceError, match=r"row 1 has no value in column 'person'"):
        HubSource(f"folder:{folder}", columns={"identity": "person"}).examples("train")


def test_a_missing_local_base_folder_is_not_sent_to_the_hub(run_cli, tmp_path):
    folder = write_questions(tmp_path / "q")
    args = [a for a in QUESTIONS if not a.startswith(("base.ref", "base.size"))]
    code, _, err = run_cli("finetune", MANIFESTS / "example-own-questions.yaml", f"data.source=folder:{folder}", *args,
                           f"base.ref={tmp_path / 'nolm'}", "--store", tmp_path / "store")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert f"base folder {tmp_path / 'nolm'}" in lines[0] and "does not exist" in lines[0] and "hf download" not in lines[0]


def test_a_typo_in_an_attribute_is_refused_before_finetuning(run_cli, random_sd, tmp_path):
    celeba = write_celeba(tmp_path / "celeba")
    args = [a for a in CELEBA if not a.startswith("scorers=")]
    code, _, err = run_cli("finetune", MANIFESTS / "celeba-sd14.yaml", f"base.ref={random_sd}", "base.revision=null",
                           f"data.source=folder:{celeba}", *args, "scorers=[{name: attributes, attributes: [Smilling]}]",
                           "--store", tmp_path / "store")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "attribute 'Smilling'" in lines[0] and "Smiling" in lines[0], err
    assert not records(tmp_path / "store")


def test_scoring_is_refused_when_the_data_changed_under_the_population(run_cli, tmp_path):
    folder = write_questions(tmp_path / "q")
    store = tmp_path / "store"
    assert questions(run_cli, folder, store)[0] == 0
    text = (folder / "train" / "questions.jsonl").read_text().replace("Which fact 0 holds?", "Which fact 0 holds now?")
    (folder / "train" / "questions.jsonl").write_text(text)
    code, _, err = run_cli("score", MANIFESTS / "example-own-questions.yaml", f"data.source=folder:{folder}", *QUESTIONS,
                           "--store", store)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "has changed since its LoRAs were trained on it" in lines[0], err


def test_fetch_dry_run_names_a_folder_that_is_not_there(run_cli, tmp_path):
    code, out, err = run_cli("fetch", MANIFESTS / "example-own-questions.yaml", f"data.source=folder:{tmp_path / 'nope'}",
                             "--dry-run")
    assert code == 2 and f"dataset folder {tmp_path / 'nope'}" in out + err and "does not exist" in out + err, out + err

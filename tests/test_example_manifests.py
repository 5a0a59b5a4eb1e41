"""The bring-your-own-data examples (manifests/example-own-*.yaml) run on a user's folders as documented
(docs/paper-populations.md): an image folder with a metadata.csv of captions, people and attributes,
and JSON Lines questions in split folders. Only the base model (the reduced-width stand-ins of
tests/paper_standins.py), the data path and the amount of work are overridden."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import paper_standins
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
PEOPLE = ("ana", "bo", "cy")
TOPICS = ("biology", "chemistry", "physics")


def write_own_images(folder: Path) -> Path:
    """my-images/: 12 PNGs and metadata.csv (file_name, caption, person, smiling, glasses)."""
    folder.mkdir(parents=True)
    rows = []
    for i in range(12):
        Image.new("RGB", (24, 24), (20 * i, 90 + 5 * i, 200 - 10 * i)).save(folder / f"img{i:02d}.png")
        person = PEOPLE[i % 3]
        rows.append({"file_name": f"img{i:02d}.png", "caption": f"a photo of {person}", "person": person,
                     "smiling": "true" if i % 2 == 0 else "false", "glasses": "true" if i % 3 == 0 else "false"})
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def write_own_questions(folder: Path) -> Path:
    """my-questions/{train,validation,test}/questions.jsonl with id, question, choices, answer (letter), topic."""
    for split, n in (("train", 12), ("validation", 3), ("test", 6)):
        (folder / split).mkdir(parents=True)
        with open(folder / split / "questions.jsonl", "w") as f:
            for i in range(n):
                topic = TOPICS[i % 3]
                f.write(json.dumps({"id": f"{split}-{i}", "question": f"Which {topic} fact number {i} is true?",
                                    "choices": [f"fact {k}" for k in range(4)], "answer": "ABCD"[i % 4],
                                    "topic": topic}) + "\n")
    return folder


def run_stages(run_cli, manifest: str, args: list[str], store: Path, stages=("finetune", "score", "publish", "train")) -> None:
    for stage in stages:
        code, out, err = run_cli(stage, ROOT / "manifests" / manifest, *args, "--store", store,
                                 *(["--no-push"] if stage == "publish" else []))
        assert code == 0, f"lol {stage}: {err}\n{out[-2000:]}"


def test_own_image_folder_runs_with_the_example_manifest(run_cli, tmp_path):
    models = tmp_path / "models"
    sd, clip = paper_standins.build("sd14-small", models), paper_standins.build("vit-b-16-small", models)
    images = write_own_images(tmp_path / "my-images")
    store = tmp_path / "store"
    run_stages(run_cli, "example-own-images.yaml", [
        f"base.ref={sd}", "base.revision=null", f"data.source=folder:{images}", "count=6", "hyperparameters.steps=1",
        "hyperparameters.resolution=32", "learn.epochs=2", "learn.seeds=1", "learn.hidden=8", "learn.tuning_budget=1", "learn.split=published",
        f"scorers=[{{name: clip_score, model: 'local-dir:{clip}', prompts: [a photo of a person], steps: 1}}, "
        "{name: attributes, attributes: [smiling, glasses]}]"], store)
    jobs = sorted((store / "populations" / "example-own-images" / "jobs").glob("*/record.json"))
    assert len(jobs) == 6
    people = {json.loads(p.read_text())["metrics"]["num_images"] for p in jobs}
    assert people == {4}  # each person has 4 photos, group_size 4
    labels = json.loads((store / "published" / "example-own-images" / "labels.json").read_text())
    assert {"attributes.smiling", "attributes.glasses", "clip_score.clip_score"} <= set(labels)
    assert len(list((store / "learn" / "example-own-images" / "runs").glob("*.json"))) == 3 * 2


def test_own_questions_run_with_the_example_manifest(run_cli, tmp_path):
    lm = paper_standins.build("qwen2-0.5b-small", tmp_path / "models")
    questions = write_own_questions(tmp_path / "my-questions")
    source = f"folder:{questions}"
    columns = "{id: id, question: question, choices: choices, answer: answer, source: 'column:topic'}"
    store = tmp_path / "store"
    run_stages(run_cli, "example-own-questions.yaml", [
        f"base.ref={lm}", "base.revision=null", f"data.source={source}", "count=6", "hyperparameters.epochs=1",
        "learn.epochs=2", "learn.seeds=1", "learn.hidden=8", "learn.tuning_budget=1", "learn.split=published",
        f"scorers=[{{name: mc_accuracy, benchmark: '{source}', split: test, columns: {columns}}}, "
        f"{{name: eval_loss, dataset: '{source}', split: validation, columns: {columns}}}, {{name: sources}}]"], store)
    records = [json.loads(p.read_text()) for p in (store / "populations" / "example-own-questions" / "jobs").glob("*/record.json")]
    assert len(records) == 6 and all(r["metrics"]["num_examples"] % 4 == 0 and r["metrics"]["num_examples"] > 0 for r in records)
    labels = json.loads((store / "published" / "example-own-questions" / "labels.json").read_text())
    assert {"mc_accuracy.acc", "eval_loss.eval_loss", "sources.biology"} <= set(labels)

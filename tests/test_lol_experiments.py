"""The learn stage on a published-format dataset: train every predictor × task, evaluate, report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lol_models.experiments import evaluate, train_all
from lol_models.published import flatten, make_layout
from lol_models.report import report
from lol_models.splits import group_split
from lol_models.tasks import LearnSettings, tasks_of
from pipeline.publish import in_memory_dataset


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """90 random rank-2 LoRAs over 3 modules in the published layout, with invariant labels."""
    import datasets

    folder = tmp_path_factory.mktemp("published")
    rng = np.random.default_rng(0)
    shapes = {"block.0.to_q": (6, 8), "block.0.to_v": (6, 8), "block.1.to_q": (7, 5)}  # name: (in, out)
    rows, vectors = [], []
    for k in range(90):
        factors = {name: (rng.normal(size=(2, n_in)).astype(np.float32), rng.normal(size=(n_out, 2)).astype(np.float32))
                   for name, (n_in, n_out) in shapes.items()}
        layout = make_layout(factors, 2)
        vectors.append(flatten(factors, layout))
        a, b = factors["block.0.to_q"]
        norm = float(np.linalg.norm(b @ a))
        rows.append({"job_id": f"job{k:03d}", "group": f"group:{k}", "rank": 2, "alpha": 2.0,
                     "clip_score.clip_score": norm, "attributes.big": int(norm > 9.0),
                     "attributes.wide": int(np.linalg.norm(factors["block.1.to_q"][1]) > 3.5),
                     "split": ["train"] * 6 + ["validation", "validation", "test", "test"]})
        rows[-1]["split"] = rows[-1]["split"][k % 10]
    weights = np.stack(vectors)
    splits = {}
    for name in ("train", "validation", "test"):
        index = [i for i, r in enumerate(rows) if r["split"] == name]
        splits[name] = in_memory_dataset([rows[i] for i in index], weights[index])
    datasets.DatasetDict(splits).save_to_disk(str(folder / "arrow"))
    (folder / "layout.json").write_text(json.dumps(layout))
    labels = {"clip_score.clip_score": {"scorer": "clip_score", "scorer_id": "clip_score-x", "label": "clip_score"},
              "attributes.big": {"scorer": "attributes", "scorer_id": "attributes-x", "label": "big"},
              "attributes.wide": {"scorer": "attributes", "scorer_id": "attributes-x", "label": "wide"}}
    (folder / "labels.json").write_text(json.dumps(labels))
    return folder


def test_tasks_group_binary_scorers_and_split_regression_columns(published):
    from lol_models.data import PulledDataError, pull

    dataset = pull(published, "train")
    tasks = {t.name: t for t in tasks_of(dataset)}
    assert tasks["attributes"].kind == "multilabel" and tasks["attributes"].columns == ("attributes.big", "attributes.wide")
    assert tasks["clip_score.clip_score"].kind == "regression"
    assert [t.name for t in tasks_of(dataset, ["attributes"])] == ["attributes"]
    with pytest.raises(PulledDataError, match="unknown target"):
        tasks_of(dataset, ["accuracy"])


def test_train_evaluate_report(published, tmp_path):
    torch.set_num_threads(1)
    settings = LearnSettings(predictors=("mlp", "mlp_svd", "glnet"), seeds=2, epochs=8, batch_size=16, learning_rate=3e-3,
                             tuning_budget=2, selection_seeds=1, min_epochs=3, smooth_epochs=2)
    written = train_all(published, settings, tmp_path)
    assert len(written) == 3 * 2
    run = json.loads((tmp_path / "runs" / "mlp_svd--clip_score.clip_score.json").read_text())
    assert len(run["selection"]["trials"]) == 2 and run["selection"]["metric"] == "validation r2"
    assert all(r["best_epoch"] >= 2 for r in run["per_seed"])  # the epoch rule's minimum
    results = evaluate(tmp_path)
    task = results.tasks["clip_score.clip_score"]
    assert set(task["predictors"]) == {"mlp", "mlp_svd", "glnet"}
    record = task["predictors"]["mlp_svd"]
    assert len(record["per_seed"]) == 2 and np.isfinite(record["mean"]["r2"])
    assert record["mean"]["r2"] == pytest.approx(np.mean([r["test"]["r2"] for r in record["per_seed"]]))
    test_rows = sum(group_split(f"group:{k}") == "test" for k in range(90))  # the protocol's split, by group name
    assert len(record["test_predictions"]) == len(record["test_targets"]) == task["n_test"] == test_rows
    # mlp_svd sees the singular values, of which the label is a function: it must beat chance.
    assert record["mean"]["r2"] > 0.3, record["mean"]
    for metric in ("r2", "r2_train_var", "kendall_tau", "spearman_rho"):
        ci = record["ci"][metric]
        assert ci["low"] <= ci["value"] <= ci["high"] and ci["value"] == pytest.approx(record["mean"][metric])
    assert set(task["difference"]["vs"]) == {"mlp", "mlp_svd"} and task["difference"]["reference"] == "glnet"
    table = (tmp_path / "results.md").read_text()
    assert "| clip_score.clip_score | regression | R² |" in table and "± " in table and "Kendall τ-b" in table
    assert "| attributes | ROC-AUC | " in table and "glnet − mlp_svd" in table  # the differences table
    path = report(tmp_path, title="synthetic")
    text = path.read_text()
    assert "# synthetic" in text and "figures/clip_score_clip_score-scatter.png" in text
    assert (tmp_path / "figures" / "clip_score_clip_score-scatter.png").stat().st_size > 1000
    assert (tmp_path / "figures" / "attributes-roc_auc.png").is_file()

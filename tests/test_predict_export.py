"""`lol predict` (a trained predictor on peft LoRA folders) and `lol export` (a published row back to a
peft adapter folder), on a small real population: 8 one-step LoRAs of ranks 2 and 4 of the random
SD-shaped base, labelled by the attributes scorer, published and learned on (mlp and glnet)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from published_format import BIG, NORM, gl_population, write_published
from safetensors.numpy import load_file, save_file

from lol_models.data import pull, read_layout, read_rows
from lol_models.predict import Adapter, featurise
from lol_models.predictors import load_predictor, save_predictor
from lol_models.published import unflatten
from lol_models.registry import MODELS
from lol_models.train import LabeledLoras, TrainConfig, predict, train_and_evaluate
from lol_models.weights import Layout
from pipeline import stages
from pipeline.finetune.diffusion import DiffusionTrainer
from pipeline.finetune.runner import finetune_population
from pipeline.manifest import Manifest
from pipeline.predict import base_problem
from pipeline.publish import publish_population
from pipeline.score.runner import score_population
from storage import Store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = ROOT / "manifests" / "tiny-shapes.yaml"
POPULATION = "tiny-shapes"
# `lol predict` on a stored LoRA against the same predictor's batched forward on its published row
# (probabilities of the attributes): measured ≤ 8.4e-8 (glnet) and ≤ 6.6e-9 (mlp) — float32 forwards
# of a batch of one versus a whole split. The bound leaves two orders of magnitude for other CPUs.
PREDICT_ATOL = 1e-5


def overrides(base):
    return [f"base.ref={base}", "count=8", "data.subsets.num_groups=8", "hyperparameters.steps=1",
            "hyperparameters.batch_size=1", "lora.rank=[2, 4]",
            "scorers=[{name: attributes, attributes: [shape=circle, color=red|yellow|brown]}]",
            # a seeded draw that gives each of the three splits at least one of the 8 groups
            "publish.splits={train: 0.5, validation: 0.25, test: 0.25}", "publish.split_seed=0",
            "learn.predictors=[mlp, glnet]", "learn.seeds=1", "learn.epochs=2"]


@pytest.fixture(scope="module")
def trained(random_sd, tmp_path_factory):
    """(store folder, published folder): 8 finetuned, scored, published LoRAs and mlp + glnet trained on them
    (in two worker processes, so every predictor test also reads models that a `train --workers` process saved)."""
    folder = tmp_path_factory.mktemp("store")
    store = Store(str(folder))
    manifest = Manifest.from_yaml(SHAPES, overrides=overrides(random_sd))
    assert len(finetune_population(manifest, store, DiffusionTrainer).trained) == 8
    assert not score_population(manifest, store).failed
    publish_population(manifest, store, push=False)
    assert len(stages.train(manifest, store, workers=2)) >= 2
    return folder, folder / "published" / POPULATION


def adapter_dir(store: Path, job_id: str) -> Path:
    return store / "populations" / POPULATION / "jobs" / job_id / "adapter"


def one_error_line(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and len(err.strip().splitlines()) <= 2, err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"


def predict_json(run_cli, store: Path, predictor: str, *adapters) -> dict:
    code, out, err = run_cli("predict", predictor, *adapters, "--store", store, "--json")
    assert code == 0, err
    return json.loads(out)


# ---------------------------------------------------------------- predict


@pytest.mark.parametrize("name", ["mlp", "glnet"])
def test_predict_on_stored_loras_equals_the_predictor_on_their_published_rows(trained, run_cli, name):
    store, published = trained
    predictor = load_predictor(store / "learn" / POPULATION / "predictors" / f"{name}--attributes--seed0.json")
    assert predictor.facts["ranks"] == [2, 4] and predictor.facts["target_modules"] == ["to_q", "to_v"]
    worst = 0.0
    for split in ("train", "validation", "test"):
        rows = pull(published, split)
        expected = torch.sigmoid(predict(predictor.model, rows.weights).double())  # (N, T), the whole split at once
        report = predict_json(run_cli, store, name, *rows.job_ids)
        assert [a["job_id"] for a in report["adapters"]] == rows.job_ids
        got = torch.tensor([[a["predicted"][c] for c in predictor.columns] for a in report["adapters"]], dtype=torch.float64)
        worst = max(worst, float((got - expected).abs().max()))
        for a, k in zip(report["adapters"], range(len(rows))):
            assert a["scored"] == {c: float(rows.labels[c][k]) for c in predictor.columns}  # the stored labels beside
            assert a["predicted_labels"] == {c: int(a["predicted"][c] >= 0.5) for c in predictor.columns}
            took = a["label_seconds"]["attributes"]  # the score stage recorded how long the label took
            assert took["source"] == "score record" and took["seconds"] >= 0
            assert a["predict_seconds"] > 0
    print(f"{name}: largest |predict − published-row forward| = {worst:.2e}")
    assert worst <= PREDICT_ATOL


def test_predict_table_takes_folders_and_names_the_times(trained, run_cli, tmp_path):
    store, published = trained
    job_id = read_rows(published, "train", columns=["job_id"])[0]["job_id"]
    outside = tmp_path / "mine"
    shutil.copytree(adapter_dir(store, job_id), outside)  # a LoRA the store does not hold
    code, out, err = run_cli("predict", "glnet", adapter_dir(store, job_id), outside, "--store", store,
                             "--population", POPULATION)
    assert code == 0, err
    assert "attributes took: score record (1 LoRA); ≈ median of 8 stored LoRAs (1 LoRA)" in out
    assert "per LoRA: predicting" in out and "as long as predicting" in out

    report = predict_json(run_cli, store, "glnet", adapter_dir(store, job_id), outside)
    stored, mine = report["adapters"]
    assert stored["job_id"] == job_id and mine["job_id"] is None and mine["scored"] == {}
    assert mine["predicted"] == pytest.approx(stored["predicted"], abs=PREDICT_ATOL)
    assert mine["label_seconds"]["attributes"]["source"] == "median of 8 stored LoRAs"


def test_stored_adapters_name_their_base_so_predict_refuses_a_lora_of_another(trained, run_cli, random_sd, tmp_path):
    """peft leaves base_model_name_or_path empty for a diffusers UNet; the trainers name the manifest's base, so a
    LoRA of another base with the same shapes (a continued base) is refused, not accepted with a note."""
    store, published = trained
    job_id = read_rows(published, "train", columns=["job_id"])[0]["job_id"]
    config = json.loads((adapter_dir(store, job_id) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(random_sd)
    assert not any("name no base" in note for note in predict_json(run_cli, store, "mlp", job_id)["notes"])
    other = tmp_path / "of-a-continued-base"
    shutil.copytree(adapter_dir(store, job_id), other)
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "sd-continued")}))
    code, _, err = run_cli("predict", "mlp", other, "--store", store)
    one_error_line(code, err, "sd-continued", "base")


def _write_adapter(folder: Path, config: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def _stored(store: Path, job_id: str) -> tuple[dict, dict]:
    folder = adapter_dir(store, job_id)
    return json.loads((folder / "adapter_config.json").read_text()), load_file(str(folder / "adapter_model.safetensors"))


def _job_of_rank(published: Path, rank: int) -> str:
    return next(r["job_id"] for s in ("train", "validation", "test")
                for r in read_rows(published, s, columns=["job_id", "rank"]) if r["rank"] == rank)


def test_a_rank_above_the_trained_ones_only_where_the_predictor_reads_any_rank(trained, run_cli, tmp_path):
    store, published = trained
    job_id = _job_of_rank(published, 4)
    config, tensors = _stored(store, job_id)
    rng = np.random.default_rng(0)
    wider = {}  # rank 8 with the same ΔW: lora_A gains random rows, lora_B zero columns, alpha keeps alpha/r
    for key, value in tensors.items():
        if ".lora_A." in key:
            wider[key] = np.concatenate([value, rng.standard_normal(value.shape).astype(np.float32)], axis=0)
        else:
            wider[key] = np.concatenate([value, np.zeros_like(value)], axis=1)
    folder = _write_adapter(tmp_path / "rank8", {**config, "r": 8, "lora_alpha": config["lora_alpha"] * 2}, wider)

    code, _, err = run_cli("predict", "mlp", folder, "--store", store)
    one_error_line(code, err, "rank 8 is above 4", "glnet")
    report = predict_json(run_cli, store, "glnet", folder, job_id)
    assert report["adapters"][0]["rank"] == 8
    # glnet reads U Vᵀ only through invariants: the same ΔW at rank 8 gets the rank-4 LoRA's prediction
    # (measured: equal to the last bit, lora_B's zero columns cancel exactly; the bound allows other kernels)
    assert report["adapters"][0]["predicted"] == pytest.approx(report["adapters"][1]["predicted"], abs=1e-6)


def _mutations(config: dict, tensors: dict) -> dict[str, tuple[dict, dict, tuple[str, ...]]]:
    """name -> (config, tensors, what the error must say)."""
    first = sorted(k for k in tensors if ".lora_A." in k)[0]
    module = first.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    second_b = first.replace(".lora_A.", ".lora_B.")
    a = tensors[first]
    narrower = {**tensors, first: a[:, :-1].copy()}
    missing = {k: v for k, v in tensors.items() if module not in k}
    extra = {**tensors, "base_model.model.extra.to_q.lora_A.weight": a, "base_model.model.extra.to_q.lora_B.weight": tensors[second_b]}
    broken = {**tensors, first: np.full_like(a, np.nan)}
    return {
        "shape": (config, narrower, (module, f"×{a.shape[1] - 1} (out×in)", f"×{a.shape[1]} there")),
        "missing module": (config, missing, ("lacks 1 of its modules", module)),
        "extra module": (config, extra, ("has 1 it does not", "extra.to_q")),
        "target modules": ({**config, "target_modules": ["to_k", "to_v"]}, tensors, ("['to_k', 'to_v']", "['to_q', 'to_v']")),
        "base": ({**config, "base_model_name_or_path": "someone/other-model"}, tensors, ("'someone/other-model'", "base")),
        "dora": ({**config, "use_dora": True}, tensors, ("use_dora", "plain LoRAs")),
        "rank": ({**config, "r": config["r"] + 1}, tensors, (f"r = {config['r'] + 1}",)),
        "nan": (config, broken, ("NaN/Inf",)),
    }


def test_bad_adapters_and_predictors_are_one_line_errors_naming_what_would_be_valid(trained, run_cli, tmp_path):
    store, published = trained
    config, tensors = _stored(store, _job_of_rank(published, 4))
    for name, (bad_config, bad_tensors, expected) in _mutations(config, tensors).items():
        folder = _write_adapter(tmp_path / name.replace(" ", "-"), bad_config, bad_tensors)
        code, _, err = run_cli("predict", "glnet", folder, "--store", store)
        one_error_line(code, err, *expected)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    code, _, err = run_cli("predict", "glnet", tmp_path / "empty", "--store", store)
    one_error_line(code, err, "not a peft adapter folder", "notes.txt")
    code, _, err = run_cli("predict", "glnet", "0123456789abcdef", "--store", store)
    one_error_line(code, err, "neither an adapter folder nor a job id")
    job_id = _job_of_rank(published, 2)
    for args, expected in [(("transformer",), ("no trained predictor 'transformer'", "glnet, mlp")),
                           (("glnet", "--seed", "3"), ("no run of seed 3", "its seeds: 0")),
                           (("glnet", "--task", "clip_score"), ("not trained on ['clip_score']", "attributes")),
                           (("glnet", "--population", "tiny-arc"), ("no trained predictors",))]:
        code, _, err = run_cli("predict", *args, job_id, "--store", store)
        one_error_line(code, err, *expected)


# ---------------------------------------------------------------- export


def test_export_writes_the_stored_adapter_back_and_peft_and_diffusers_load_it(trained, run_cli, tmp_path, random_sd):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import PeftModel

    store, published = trained
    job_id = _job_of_rank(published, 2)  # cut back from the row's r_max = 4
    out = tmp_path / "exported"
    code, printed, err = run_cli("export", published, job_id, out)
    assert code == 0, err
    assert "PeftModel.from_pretrained" in printed and "load_lora_weights" in printed
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "pytorch_lora_weights.safetensors"]
    config, stored = _stored(store, job_id)
    exported = load_file(str(out / "adapter_model.safetensors"))
    assert json.loads((out / "adapter_config.json").read_text()) == config
    assert exported.keys() == stored.keys()
    assert all(exported[k].dtype == stored[k].dtype and np.array_equal(exported[k], stored[k]) for k in stored)

    def lora_state(folder: Path) -> dict[str, torch.Tensor]:
        unet = UNet2DConditionModel.from_pretrained(random_sd, subfolder="unet")
        model = PeftModel.from_pretrained(unet, str(folder))
        return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}

    from_export, from_store = lora_state(out), lora_state(adapter_dir(store, job_id))
    assert from_export.keys() == from_store.keys() and len(from_export) == len(stored)
    assert all(torch.equal(from_export[k], from_store[k]) for k in from_store)

    pipe = StableDiffusionPipeline.from_pretrained(random_sd, safety_checker=None)
    pipe.load_lora_weights(str(out), adapter_name="exported")
    scale = config["lora_alpha"] / config["r"]
    for key in (k for k in stored if ".lora_A." in k):
        module = pipe.unet.get_submodule(key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"))
        delta = module.lora_B["exported"].weight @ module.lora_A["exported"].weight * module.scaling["exported"]
        expected = torch.from_numpy(stored[key.replace(".lora_A.", ".lora_B.")] @ stored[key]) * scale
        torch.testing.assert_close(delta.detach(), expected, rtol=1e-6, atol=1e-7)


def test_export_refuses_what_it_cannot_do_in_one_line(trained, run_cli, tmp_path):
    store, published = trained
    job_id = _job_of_rank(published, 4)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    code, _, err = run_cli("export", published, job_id, taken)
    one_error_line(code, err, "is not empty", "keep.txt")
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]

    wrong = job_id[:-1] + ("0" if job_id[-1] != "0" else "1")
    code, _, err = run_cli("export", published, wrong, tmp_path / "new")
    one_error_line(code, err, f"no LoRA {wrong!r}", f"did you mean {job_id}", "load_dataset")
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.export-*"))
    code, _, err = run_cli("export", store, job_id, tmp_path / "new")
    one_error_line(code, err, "not a published LoRA dataset", "layout.json")
    code, _, err = run_cli("export", published.parent / "tiny-arc", job_id, tmp_path / "new")
    one_error_line(code, err, "no published dataset folder", POPULATION)
    code, _, err = run_cli("export", published, job_id, tmp_path / "no" / "such" / "out")
    one_error_line(code, err, "does not exist")

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli("export", published, job_id, empty, "--no-diffusers")
    assert code == 0, err
    assert not (empty / "pytorch_lora_weights.safetensors").exists() and (empty / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- the library, on a synthetic population


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    factors, rows = gl_population([2, 4], 12, seed=3)
    return write_published(tmp_path_factory.mktemp("published") / "gl", factors, rows, {**NORM, **BIG})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_saved_predictor_loads_back_to_the_same_outputs(synthetic, tmp_path, name):
    layout, labels = read_layout(synthetic)
    splits = {s: pull(synthetic, s) for s in ("train", "validation", "test")}
    for task, kind, columns in [("clip_score.clip_score", "regression", ["clip_score.clip_score"]),
                                ("attributes", "multilabel", ["attributes.big"])]:
        data = {s: LabeledLoras(d.weights, d.targets(columns)) for s, d in splits.items()}
        result = train_and_evaluate(name, data["train"], data["validation"], data["test"],
                                    config=TrainConfig(task=kind, epochs=1, batch_size=8))
        path = save_predictor(tmp_path, predictor=name, seed=0, task={"name": task, "kind": kind, "columns": columns},
                              model=result.model, model_config=None, labels=labels, published_layout=layout,
                              facts={"ranks": [2, 4]}, target_mean=result.target_mean, target_std=result.target_std)
        loaded = load_predictor(path)
        assert (loaded.predictor, loaded.task, loaded.kind, loaded.columns) == (name, task, kind, tuple(columns))
        assert loaded.rank_agnostic == result.model.rank_agnostic and loaded.max_rank == 4
        assert torch.equal(predict(loaded.model, splits["test"].weights), predict(result.model, splits["test"].weights))
        if kind == "regression":
            assert torch.equal(loaded.target_mean.float(), result.target_mean) and torch.equal(loaded.target_std.float(), result.target_std)


def test_an_adapter_is_featurised_exactly_as_its_published_row(synthetic):
    layout, _ = read_layout(synthetic)
    test = pull(synthetic, "test")
    rows = read_rows(synthetic, "test")
    assert [r["job_id"] for r in rows] == test.job_ids and {r["rank"] for r in rows} == {2, 4}

    class Stub:  # what featurise reads of a predictor
        published_layout = layout

    for k, row in enumerate(rows):
        adapter = Adapter(row["job_id"], {}, unflatten(row["weights"], layout, row["rank"]), row["rank"], row["alpha"])
        mine, theirs = featurise(adapter, Stub()), test.weights.index([k])
        assert Layout.from_published(layout).same_layers(mine.layout)
        assert all(torch.equal(a.u, b.u) and torch.equal(a.v, b.v) for a, b in zip(mine.groups, theirs.groups))


@pytest.mark.parametrize(("named", "revision", "refs", "ok"), [
    (None, None, ["tiny:shapes-sd"], True),
    ("tiny:shapes-sd", None, ["tiny:shapes-sd"], True),
    ("/store/bases/shapes-sd-smoke-4985904ac284", None, ["tiny:shapes-sd"], True),  # a tiny-world build of it
    ("/store/bases/qa-lm-full-4985904ac284", None, ["tiny:shapes-sd"], False),
    ("/hf/hub/models--CompVis--stable-diffusion-v1-4/snapshots/abc", None, ["CompVis/stable-diffusion-v1-4"], True),
    ("runwayml/stable-diffusion-v1-5", None, ["CompVis/stable-diffusion-v1-4"], False),
    ("Qwen/Qwen2-0.5B", "main", ["Qwen/Qwen2-0.5B"], True),  # the population's revision unknown
])
def test_the_base_an_adapter_names_must_be_the_populations(named, revision, refs, ok):
    facts = {"base_ref": refs, "base_revision": []}
    assert (base_problem({"base_model_name_or_path": named, "revision": revision}, facts) is None) == ok
    problem = base_problem({"base_model_name_or_path": "Qwen/Qwen2-0.5B", "revision": "v2"},
                           {"base_ref": ["Qwen/Qwen2-0.5B"], "base_revision": ["v1"]})
    assert problem is not None and "'v2'" in problem and "v1" in problem


def test_a_damaged_saved_predictor_is_a_one_line_error(trained, run_cli, tmp_path):
    store, published = trained
    saved = store / "learn" / POPULATION / "predictors"
    copy = tmp_path / "predictors"
    shutil.copytree(saved, copy)
    job_id = _job_of_rank(published, 2)
    weights = copy / "mlp--attributes--seed0.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    code, _, err = run_cli("predict", copy / "mlp--attributes--seed0.json", job_id, "--store", store)
    one_error_line(code, err, "not a trained predictor", "does not hash")
    (copy / "glnet--attributes--seed0.json").write_text("{not json")
    code, _, err = run_cli("predict", copy / "glnet--attributes--seed0.json", job_id, "--store", store)
    one_error_line(code, err, "not a trained predictor", "not JSON")
    code, _, err = run_cli("predict", copy / "mlp--attributes--seed9.json", job_id, "--store", store)
    one_error_line(code, err, "no trained predictor at", "mlp--attributes--seed0.json")

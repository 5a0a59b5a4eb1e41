"""The causal-LM LoRA trainer on the smoke-size tiny:qa-lm: real training, real peft files.

No mocks: every test trains the real smoke base (2 layers, hidden 32) on real bundled QA
questions, through the population runner where the behaviour is the runner's.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ROOT, check_finetune_cli_resumes
from peft import PeftModel
from safetensors.torch import load_file

from pipeline.bases.cache import ensure_base
from pipeline.data import get_source
from pipeline.data.base import DataSourceError
from pipeline.finetune.causal_lm import (
    IGNORE_INDEX,
    CausalLMTrainer,
    answer_loss,
    collate,
    encode_questions,
    forward_args,
    load_causal_lm,
    training_sequence,
)
from pipeline.finetune.runner import finetune_population
from pipeline.jobs import expand
from pipeline.manifest import Manifest
from storage import Store
from tinyworld.qa_lm import continuation_logliks

ARC = ROOT / "manifests" / "tiny-arc.yaml"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: one thread is far faster on shared cores


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """A store holding the smoke tiny:qa-lm (built once, seconds)."""
    store = Store(str(tmp_path_factory.mktemp("store")))
    ensure_base("qa-lm", store, size="smoke")
    return store


@pytest.fixture(scope="module")
def base(store):
    """(model, tokenizer) of the smoke base."""
    return load_causal_lm({"ref": "tiny:qa-lm", "size": "smoke"}, store)


def manifest(name: str, *extra: str) -> Manifest:
    return Manifest.from_yaml(ARC, overrides=[f"population.name={name}", "count=3", "base.size=smoke",
                                              "hyperparameters.epochs=1", "data.subsets.examples_per_source=16", *extra])


def test_loss_is_only_on_the_answer_tokens(base):
    _, tokenizer = base
    example = next(e for e in get_source("qa").examples("train") if e.source == "arc_easy")
    [question] = encode_questions(tokenizer, [example])
    ids, labels = training_sequence(question, max_length=10_000)
    answer = example.choices[example.answer]
    n = len(question.answer)
    assert labels[:-n] == [IGNORE_INDEX] * (len(ids) - n) and labels[-n:] == ids[-n:]
    assert tokenizer.decode(labels[-n:]) == " " + answer
    assert ids[0] == tokenizer.eos_token_id  # qa-lm's documents start after an eos
    assert tokenizer.decode(ids[1:]) == f"Question: {example.question}\nAnswer: {answer}"

    short = training_sequence(question, max_length=n + 3)  # cut from the left, as the scorers cut
    assert short[0] == ids[-(n + 3):] and short[1] == labels[-(n + 3):]

    batch = collate([(ids, labels), short], pad_id=tokenizer.pad_token_id)  # left-padded: answers end each row
    T, pad = len(ids), len(ids) - (n + 3)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, T)
    assert batch["attention_mask"][1].tolist() == [0] * pad + [1] * (n + 3)
    assert batch["position_ids"][1].tolist() == [0] * pad + list(range(n + 3)) and batch["position_ids"][0].tolist() == list(range(T))
    assert (batch["labels"][1, :pad] == IGNORE_INDEX).all() and batch["labels"][1, pad:].tolist() == short[1]


def test_the_training_loss_is_the_answer_tokens_mean_negative_log_likelihood(base):
    """`answer_loss` on a padded batch = what the scorers read, one unpadded question at a time."""
    model, tokenizer = base
    examples = [e for e in get_source("qa").examples("train") if e.source in ("arc_easy", "sciq")][:6]
    questions = encode_questions(tokenizer, examples)
    batch = collate([training_sequence(q, model.config.max_position_embeddings) for q in questions], tokenizer.pad_token_id)
    assert len({len(q.context) + len(q.answer) for q in questions}) > 1 and len({len(q.answer) for q in questions}) > 1
    logliks = continuation_logliks(model, [q.context for q in questions], [q.answer for q in questions],
                                   tokenizer.pad_token_id, batch_size=1)
    expected = -sum(logliks) / sum(len(q.answer) for q in questions)
    with torch.no_grad():
        sliced = answer_loss(model, batch, forward_args(model))  # logits of the answers only
        full = answer_loss(model, batch, frozenset({"position_ids"}))  # every position through the LM head
    assert "logits_to_keep" in forward_args(model)
    assert sliced.item() == pytest.approx(expected, rel=1e-5) and full.item() == pytest.approx(expected, rel=1e-5)


def test_trains_peft_adapters_that_load_and_change_the_model(store, base):
    model, _ = base
    m = manifest("lm-train")
    summary = finetune_population(m, store, CausalLMTrainer)
    assert len(summary.trained) == 3 and not summary.failed
    population = store.population("lm-train")
    for job in expand(m):
        record = population.record(job.job_id)
        metrics = record["metrics"]
        n = 16 * len(job.spec.data["sources"])
        assert metrics["num_examples"] == n and metrics["micro_steps"] == metrics["optimizer_steps"] == math.ceil(n / job.spec.hyperparameters["batch_size"])
        assert math.isfinite(metrics["final_loss"]) and {"torch", "transformers", "peft", "accelerate"} <= set(metrics["versions"])
    adapter_dir = store.local_path(population.job_rel(summary.trained[0], "adapter"))
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    a_keys = sorted(k for k in weights if k.endswith("lora_A.weight"))
    assert len(a_keys) == 2 * 2 and all(("q_proj" in k or "v_proj" in k) for k in weights)  # 2 layers × q, v
    assert all(weights[k].shape[0] == 4 for k in a_keys)  # rank 4: A is (r, in)
    assert all(weights[k.replace("lora_A", "lora_B")].abs().max() > 0 for k in a_keys)  # B moved off its zero init

    ids = torch.tensor([[0, 5, 17, 42, 9, 11]])
    with torch.no_grad():
        before = model(ids).logits
        adapted = PeftModel.from_pretrained(model, adapter_dir)
        after = adapted(ids).logits
        adapted.unload()
    assert not torch.allclose(before, after)


def test_each_job_starts_from_the_clean_base_and_training_is_deterministic(store, base, tmp_path):
    clean, _ = base
    m = manifest("lm-determinism")
    trainer = CausalLMTrainer()
    trainer.setup(m, store)
    first, second = list(expand(m))[:2]
    trainer.run(first, tmp_path / "a")
    trainer.run(second, tmp_path / "b")
    trainer.run(first, tmp_path / "c")
    assert type(trainer.model) is type(clean) and not any("lora" in n for n, _ in trainer.model.named_modules())
    reference = clean.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in trainer.model.state_dict().items())
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    c = load_file(str(tmp_path / "c" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_gradient_accumulation_and_a_step_budget(store, tmp_path):
    accumulated = manifest("lm-accumulate", "hyperparameters.gradient_accumulation=3", "hyperparameters.batch_size=4")
    trainer = CausalLMTrainer()
    trainer.setup(accumulated, store)
    job = next(expand(accumulated))
    n = 16 * len(job.spec.data["sources"])
    metrics = trainer.run(job, tmp_path / "acc")
    assert metrics["micro_steps"] == math.ceil(n / 4) and metrics["optimizer_steps"] == math.ceil(math.ceil(n / 4) / 3)

    stepped = manifest("lm-steps", "hyperparameters.epochs=null", "hyperparameters.steps=3")
    job = next(expand(stepped))
    metrics = trainer.run(job, tmp_path / "steps")
    assert metrics["optimizer_steps"] == metrics["micro_steps"] == 3


def test_non_finite_loss_fails_the_job_and_the_population_goes_on(store):
    m = manifest("lm-nan", "hyperparameters.learning_rate={choice: [1.0e+30, 1.0e-4]}", "count=4")
    summary = finetune_population(m, store, CausalLMTrainer)
    assert summary.trained and set(summary.failed.values()) == {"non-finite loss"}
    population = store.population("lm-nan")
    assert all(population.record(j) is None for j in summary.failed)


def test_a_base_that_is_not_a_causal_lm_is_refused(store, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = tmp_path / "clip-text"
    CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                 eos_token_id=1, pad_token_id=1)).save_pretrained(text_encoder)
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, reason in ((text_encoder, "Unrecognized configuration class .*CLIPTextConfig"), (empty, "")):
        with pytest.raises(ValueError, match=f"base '{folder}' cannot be loaded as a transformers causal LM .*: {reason}"):
            finetune_population(manifest("lm-not-lm", f"base.ref={folder}", "base.size=full"), store, CausalLMTrainer)
    assert store.population("lm-not-lm").job_ids() == []


def test_missing_target_module_fails_before_training_and_lists_candidates(store):
    with pytest.raises(ValueError, match=r"\['qq_proj'\] do not exist in the causal LM .*candidates: .*k_proj.*q_proj"):
        finetune_population(manifest("lm-targets", "lora.target_modules=[q_proj, qq_proj]"), store, CausalLMTrainer)
    assert store.population("lm-targets").job_ids() == []


def test_unknown_source_name_fails_before_training_and_lists_known(store):
    with pytest.raises(DataSourceError, match=r"unknown source\(s\) \['algebra'\]; known: arithmetic, category, compare"):
        finetune_population(manifest("lm-sources", "data.subsets.sources=[lookup, algebra]"), store, CausalLMTrainer)
    assert store.population("lm-sources").job_ids() == []


def test_lol_finetune_runs_resumes_and_summarises(store, run_cli):
    args = ("finetune", ARC, "population.name=lm-cli", "count=3", "base.size=smoke", "hyperparameters.epochs=1",
            "data.subsets.examples_per_source=8", "--store", store.url, "--limit", "2")
    check_finetune_cli_resumes(run_cli, args)

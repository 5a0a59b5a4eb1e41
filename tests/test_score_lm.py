"""`mc_accuracy` and `eval_loss` on real LoRAs of the smoke-size tiny:qa-lm.

A small population (3 LoRAs, one epoch on 16 questions per source) is finetuned and scored
end to end through `pipeline.stages`; the scorers' numbers are then recomputed independently
with plain transformers + peft, one unpadded forward per (question, choice).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import ROOT
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import stages
from pipeline.bases.loading import resolve_base
from pipeline.data import get_source
from pipeline.data.base import DataSourceError, QAExample
from pipeline.finetune.causal_lm import encode_questions
from pipeline.jobs import expand
from pipeline.manifest import Manifest
from pipeline.score import make_scorer, scorer_id
from pipeline.score.lm_scorers import (
    EvalLossScorer,
    McAccuracyScorer,
    batched_logliks,
    mc_metrics,
    shared_context_logliks,
)
from storage import Store

ARC = ROOT / "manifests" / "tiny-arc.yaml"
OVERRIDES = ["count=3", "base.size=smoke", "hyperparameters.epochs=1", "data.subsets.examples_per_source=16"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: one thread is far faster on shared cores


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    """(store, manifest, finetune summary, score summary) of a smoke LM population run through the stages."""
    store = Store(str(tmp_path_factory.mktemp("store")))
    manifest = Manifest.from_yaml(ARC, overrides=OVERRIDES)
    trained = stages.finetune(manifest, store)
    scored = stages.score(manifest, store)
    return store, manifest, trained, scored


def adapter_dir(store: Store, manifest: Manifest, index: int = 0):
    job = list(expand(manifest))[index]
    return store.local_path(store.population(manifest.population.name).job_rel(job.job_id, "adapter"))


def scorer(cls, population, **settings):
    store, manifest, _, _ = population
    spec = next(s for s in manifest.scorers if s.name == {McAccuracyScorer: "mc_accuracy", EvalLossScorer: "eval_loss"}[cls])
    instance = cls(spec.model_copy(update=settings))
    instance.setup(manifest, store)
    return instance


def plain_transformers(population, adapter=None):
    """(model, tokenizer) loaded as any user would: Auto classes, then PeftModel.from_pretrained."""
    store, manifest, _, _ = population
    path, _ = resolve_base(manifest.base.model_dump(), store)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    return model, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def check_loglik(model, tokenizer, question: str, continuation: str) -> tuple[float, int]:
    """(summed log p(continuation | eos + "Question: …\\nAnswer:"), its token count), one unpadded forward.

    Like the scorers (and lm-evaluation-harness), a text longer than the model's positions keeps its last tokens.
    """
    context = [tokenizer.eos_token_id] + tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]
    target = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([(context + target)[-model.config.max_position_embeddings:]])  # (1, T)
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
    start = ids.shape[1] - len(target)  # where the continuation begins
    return sum(float(logp[start + i - 1, t]) for i, t in enumerate(target)), len(target)


def test_smoke_population_end_to_end_with_resumption(population):
    store, manifest, trained, scored = population
    assert len(trained.trained) == 3 and not trained.failed
    assert not scored.failed and set(scored.scored.values()) == {3}
    questions = len(get_source("skills").examples("test"))  # the whole test split of the six skills
    ids = {s.name: scorer_id(s) for s in manifest.scorers}
    pop = store.population(manifest.population.name)
    for job in expand(manifest):
        mc = pop.read_score(job.job_id, ids["mc_accuracy"])
        assert set(mc["labels"]) == {"acc", "acc_norm"} and {"torch", "transformers", "peft"} <= set(mc["versions"])
        for value in mc["labels"].values():
            assert 0 <= value <= 1 and (value * questions) == pytest.approx(round(value * questions))
        loss = pop.read_score(job.job_id, ids["eval_loss"])["labels"]["eval_loss"]
        assert math.isfinite(loss) and 0 < loss < 2 * math.log(384)  # smoke vocabulary: 384 tokens
        sources = pop.read_score(job.job_id, ids["sources"])["labels"]
        assert {s for s, v in sources.items() if v} == set(job.spec.data["sources"]) and len(sources) == 6

    again_trained = stages.finetune(manifest, store)
    again_scored = stages.score(manifest, store)
    assert again_trained.trained == [] and again_trained.skipped == 3
    assert set(again_scored.scored.values()) == {0} and set(again_scored.skipped.values()) == {3}


def test_acc_and_acc_norm_by_hand():
    logliks = [[-4.0, -6.0, -5.0],  # acc picks 0; per character: -4/10, -6/30, -5/5 → acc_norm picks 1
               [-2.0, -2.0],  # a tie goes to the first choice (np.argmax), for both
               [-9.0, -3.0]]  # -9/3 = -3, -3/1 = -3: tie again in acc_norm → choice 0
    choices = [("ten chars!", "a choice thirty characters lon", "short"), ("a", "b"), ("abc", "d")]
    assert mc_metrics(logliks, choices, [1, 0, 1]) == {"acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(2 / 3)}
    assert mc_metrics(logliks, choices, [1, 0, 0]) == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(1.0)}
    assert len(choices[0][1]) == 30 and len(choices[0][0]) == 10


@pytest.mark.parametrize("adapter_index", [None, 0, 2])
def test_mc_accuracy_equals_an_independent_unbatched_computation(population, adapter_index):
    store, manifest, _, _ = population
    adapter = None if adapter_index is None else adapter_dir(store, manifest, adapter_index)
    mc = scorer(McAccuracyScorer, population, limit=12, batch_size=9)  # 2 questions (8 pairs) per batch, the last alone
    got = mc.choice_logliks(adapter)
    model, tokenizer = plain_transformers(population, adapter)
    examples = get_source("skills").examples("test")[:12]
    expected = [np.array([check_loglik(model, tokenizer, e.question, " " + c)[0] for c in e.choices]) for e in examples]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4)
    acc = np.mean([np.argmax(e) == ex.answer for e, ex in zip(expected, examples)])
    acc_norm = np.mean([np.argmax(e / np.array([len(c) for c in ex.choices])) == ex.answer for e, ex in zip(expected, examples)])
    assert mc.score(None, adapter) == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm)}


def test_eval_loss_equals_an_independent_computation(population):
    store, manifest, _, _ = population
    adapter = adapter_dir(store, manifest, 1)
    scorer_ = scorer(EvalLossScorer, population, limit=10)
    model, tokenizer = plain_transformers(population, adapter)
    examples = get_source("skills").examples("validation")[:10]
    pairs = [check_loglik(model, tokenizer, e.question, " " + e.choices[e.answer]) for e in examples]
    expected = -sum(ll for ll, _ in pairs) / sum(n for _, n in pairs)
    assert scorer_.score(None, adapter)["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_adapters_are_swapped_without_touching_the_base(population):
    store, manifest, _, _ = population
    mc = scorer(McAccuracyScorer, population)
    weights_before = {name: p.detach().clone() for name, p in mc.model.named_parameters()}
    base_before = np.concatenate(mc.choice_logliks(None))
    with_first = np.concatenate(mc.choice_logliks(adapter_dir(store, manifest, 0)))
    with_second = np.concatenate(mc.choice_logliks(adapter_dir(store, manifest, 1)))
    assert not np.allclose(base_before, with_first) and not np.allclose(with_first, with_second)
    assert all(torch.equal(p, weights_before[name]) for name, p in mc.model.named_parameters())  # the same weights
    # and the same log-likelihoods, up to float32 rounding: unload() puts back new module objects, whose
    # matmuls may round differently (measured: 9.5e-7 on sums of about -16, one float32 ulp there is 1.9e-6)
    np.testing.assert_allclose(np.concatenate(mc.choice_logliks(None)), base_before, rtol=0, atol=1e-5)
    assert not any("lora" in name for name, _ in mc.model.named_modules())
    assert set(mc.provenance()["versions"]) == {"torch", "transformers", "peft"} and mc.provenance()["dataset"]["split"]


def test_make_scorer_builds_the_lm_scorers():
    manifest = Manifest.from_yaml(ARC, overrides=OVERRIDES)
    kinds = [type(make_scorer(s)).__name__ for s in manifest.scorers]
    assert kinds == ["McAccuracyScorer", "EvalLossScorer", "SourcesScorer"]


@pytest.mark.parametrize(("choices", "answer", "message"), [
    ((), 0, "needs at least 2 choices"),
    (("yes", "no"), 2, "answer index 2 out of range for 2 choices"),
    (("yes", "  "), 0, "empty or non-string choice"),
])
def test_malformed_questions_are_named(population, choices, answer, message):
    _, tokenizer = plain_transformers(population)
    good = QAExample(id="ok-1", source="arc_easy", question="Is water wet?", choices=("yes", "no"), answer=0)
    bad = QAExample(id="broken-7", source="arc_easy", question="Is ice cold?", choices=choices, answer=answer)
    with pytest.raises(ValueError, match=rf"malformed question 'broken-7' \(source 'arc_easy'\): {message}"):
        encode_questions(tokenizer, [good, bad])


def test_unknown_benchmark_or_split_is_refused_before_the_base_loads(population, monkeypatch, tmp_path):
    store, manifest, _, _ = population
    spec = next(s for s in manifest.scorers if s.name == "mc_accuracy")
    with pytest.raises(DataSourceError, match=r"use skills:<set>\[\+<set>…\] or skills:all .*qa:<set>"):
        McAccuracyScorer(spec.model_copy(update={"benchmark": "arc"})).setup(manifest, store)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(DataSourceError, match="hf download allenai/ai2_arc --repo-type dataset"):
        McAccuracyScorer(spec.model_copy(update={"benchmark": "hf:allenai/ai2_arc"})).setup(manifest, store)
    with pytest.raises(DataSourceError, match="no split 'dev'; valid: pretrain, train, validation, test"):
        McAccuracyScorer(spec.model_copy(update={"split": "dev"})).setup(manifest, store)
    with pytest.raises(DataSourceError, match="unknown QA set"):
        McAccuracyScorer(spec.model_copy(update={"benchmark": "qa:arc_hard"})).setup(manifest, store)


@pytest.mark.parametrize("cls", [McAccuracyScorer, EvalLossScorer])
def test_cohort_scoring_equals_scoring_each_adapter_alone(population, cls):
    store, manifest, trained, _ = population
    instance = scorer(cls, population, batch_size=8)
    jobs = list(expand(manifest))
    dirs = [adapter_dir(store, manifest, k) for k in range(len(jobs))]
    base_keys = set(instance.model.state_dict())
    together = instance.cohort_logliks(dirs)  # (K, P)
    assert set(instance.model.state_dict()) == base_keys
    alone = np.stack([instance.logliks(d) for d in dirs])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-4)
    assert np.abs(together[0] - together[1]).max() > 1e-3  # each copy met its own adapter
    for got, d in zip(instance.score_cohort(jobs, dirs), dirs):
        assert got == pytest.approx(instance.score(None, d), abs=1e-6)


def test_shared_contexts_give_each_pairs_own_loglik_within_the_positions():
    """Each context run once for its choices (KV cache repeated per choice) equals each pair run alone,
    with continuations of different lengths, left-padded contexts of different lengths, copies, and
    contexts cut on the left to fit 16 positions (cut once per question, to fit its longest choice)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                         pad_token_id=1, eos_token_id=0)).eval()
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(2, 50, (n,), generator=g).tolist()

    questions = [(ids(n), [ids(k) for k in lengths])
                 for n, lengths in [(5, [1, 3, 2, 1]), (2, [2]), (9, [4, 1, 1]), (14, [1, 1]), (20, [3, 1, 5])]]
    got = shared_context_logliks(model, questions, pad_id=1, batch_size=5, copies=2)  # (2, 13)
    cut = [(context[-(16 - max(map(len, continuations))):], c) for context, continuations in questions for c in continuations]
    expected = batched_logliks(model, [c for c, _ in cut], [k for _, k in cut], pad_id=1, batch_size=13)
    assert got.shape == (2, 13)
    np.testing.assert_allclose(got, np.repeat(expected, 2, 0), rtol=1e-5, atol=1e-5)
    assert len(questions[3][0]) + 1 <= 16 and len(questions[4][0]) + 5 > 16  # one fits whole, one is cut
    with pytest.raises(ValueError, match="question 0: a context of 1 token"):
        shared_context_logliks(model, [([7], [[3]])], pad_id=1, batch_size=4)
    for too_long in (15, 16, 17):  # leaves 1, 0 or no positions for the context
        with pytest.raises(ValueError, match=rf"question 1: a context of [01] token\(s\) after fitting its longest choice \({too_long} tokens\)"):
            shared_context_logliks(model, [questions[0], (ids(5), [ids(2), ids(too_long)])], pad_id=1, batch_size=4)


def test_a_model_without_a_kv_cache_or_position_ids_is_scored_pair_by_pair():
    """`shared_context_logliks` falls back to `batched_logliks` where the forward cannot take a cache and positions."""
    from pipeline.score import lm_scorers

    class NoCache(torch.nn.Module):  # a causal LM whose forward names neither
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"max_position_embeddings": 32})()
            self.embed, self.head = torch.nn.Embedding(20, 8), torch.nn.Linear(8, 20)

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return type("Out", (), {"logits": self.head(self.embed(input_ids).cumsum(1))})()

    torch.manual_seed(0)
    model = NoCache()
    assert lm_scorers.cache_argument(model) is None
    questions = [([2, 3, 4], [[5], [6, 7]]), ([8, 9], [[10, 11, 12]])]
    got = shared_context_logliks(model, questions, pad_id=1, batch_size=4)
    expected = batched_logliks(model, [[2, 3, 4], [2, 3, 4], [8, 9]], [[5], [6, 7], [10, 11, 12]], pad_id=1, batch_size=4)
    np.testing.assert_array_equal(got, expected)

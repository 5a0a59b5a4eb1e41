"""`tiny:qa-lm`: real smoke builds (seconds each), saved, reloaded through transformers' Auto classes.

No mocks: every build trains the smoke recipe on the real bundled QA text. The full build
(about 7 minutes of one CPU core) is marked `full_build` (`make test-bases`).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from pipeline.data.qa import QASource, format_question  # noqa: E402
from pipeline.data.skills import SkillsSource, statement  # noqa: E402
from tinyworld import qa_lm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: one thread is far faster on shared cores

SAMPLE_TEXTS = [
    "Question: Which planet is closest to the Sun?\nAnswer: Mercury",
    "Question: What is 12 + 30?\nAnswer: 42",
    "naïve café — 🙂 ÅÅ\ttabs  and  spaces\n\n",
    "",
]


@pytest.fixture(scope="module")
def smoke_config() -> dict:
    return qa_lm.recipe_config("smoke")


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory, smoke_config):
    """One smoke build: (folder, metrics, progress calls)."""
    out = tmp_path_factory.mktemp("qa-lm-smoke")
    calls: list[tuple[int, int]] = []
    metrics = qa_lm.build(smoke_config, out, lambda step, total: calls.append((step, total)))
    return out, metrics, calls


@pytest.fixture(scope="module")
def tiny_model():
    """A randomly initialised 1-layer Qwen2 (vocab 50) for the measures' unit tests."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=1, eos_token_id=0)
    return Qwen2ForCausalLM(config).eval()


def check_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- recipe


def test_module_interface():
    assert (qa_lm.NAME, qa_lm.KIND, qa_lm.SIZES) == ("qa-lm", "causal_lm", ("smoke", "full"))
    fingerprint = qa_lm.data_fingerprint()
    assert fingerprint.startswith("skills-") and "-qa-" in fingerprint and fingerprint == qa_lm.data_fingerprint()


@pytest.mark.parametrize("size", ["smoke", "full"])
def test_recipe_config_is_json_and_valid(size):
    config = qa_lm.recipe_config(size)
    assert json.loads(json.dumps(config)) == config
    assert qa_lm.QALMRecipe.from_dict(config).to_dict() == config
    assert set(config) == {"seed", "tokenizer", "model", "data", "train"}


def test_full_recipe_fits_the_budget():
    recipe = qa_lm.QALMRecipe.from_dict(qa_lm.recipe_config("full"))
    model = transformers.Qwen2ForCausalLM(qa_lm.qwen2_config(recipe, 0, 1))
    params = sum(p.numel() for p in model.parameters())
    assert 512 <= recipe.tokenizer.vocab_size <= 8192  # the skills' text trains a BPE of ~740 tokens
    assert 128 <= recipe.model.hidden_size <= 256 and 2 <= recipe.model.num_hidden_layers <= 4
    assert params * 4 <= 6 * 1024**2, params  # fp32 safetensors ≤ 6 MB


def test_recipe_errors_name_the_problem():
    with pytest.raises(ValueError, match="sizes smoke, full"):
        qa_lm.recipe_config("medium")
    config = qa_lm.recipe_config("smoke")
    with pytest.raises(ValueError, match="stepz"):
        qa_lm.QALMRecipe.from_dict({**config, "train": {**config["train"], "stepz": 3}})
    with pytest.raises(ValueError, match="data.sets"):
        qa_lm.QALMRecipe.from_dict({**config, "data": {**config["data"], "sets": ["arc"]}})
    with pytest.raises(ValueError, match="num_attention_heads"):
        qa_lm.QALMRecipe.from_dict({**config, "model": {**config["model"], "num_attention_heads": 3}})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        qa_lm.QALMRecipe.from_dict({**config, "train": {**config["train"], "seq_len": 500}})
    with pytest.raises(ValueError, match=r"data.qa_share must be in \[0, 1\]"):
        qa_lm.QALMRecipe.from_dict({**config, "data": {**config["data"], "qa_share": 1.5}})
    with pytest.raises(ValueError, match=r"data.source must be one of \['skills', 'qa'\]"):
        qa_lm.QALMRecipe.from_dict({**config, "data": {**config["data"], "source": "wiki"}})
    real_qa = {**config["data"], "source": "qa", "sets": ["arc_easy"], "mc_sets": ["arc_easy"]}
    with pytest.raises(ValueError, match="1 unless data.source is skills"):
        qa_lm.QALMRecipe.from_dict({**config, "data": real_qa})
    assert qa_lm.QALMRecipe.from_dict({**config, "data": {**real_qa, "qa_share": 1.0}}).data.source == "qa"


def test_pretraining_reads_a_share_of_the_questions_and_the_rest_as_statements():
    recipe = qa_lm.QALMRecipe.from_dict(qa_lm.recipe_config("full"))
    texts = qa_lm.pretrain_texts(recipe)
    examples = SkillsSource().examples("pretrain")
    assert len(texts) == len(examples) > 9000
    asked = [t == qa_lm.document_text(e) for t, e in zip(texts, examples)]
    assert all(asked[i] or t == statement(e) for i, (t, e) in enumerate(zip(texts, examples)))
    assert abs(sum(asked) / len(asked) - recipe.data.qa_share) < 0.02
    assert not any("Question:" in t for t, a in zip(texts, asked) if not a)


# ----------------------------------------------------------------------------- build, save, load


def test_smoke_build_saves_safetensors_and_tokenizer(smoke_build, smoke_config):
    out, metrics, calls = smoke_build
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]  # no pickle
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["vocab_size"] == smoke_config["tokenizer"]["vocab_size"]
    state = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in state.values())
    assert metrics["parameters"] == sum(t.numel() for t in state.values())  # tied head stored once
    assert metrics["weights_bytes"] == (out / "model.safetensors").stat().st_size

    steps = smoke_config["train"]["steps"]
    assert calls == [(i, steps) for i in range(1, steps + 1)]
    assert json.loads(json.dumps(metrics)) == metrics
    assert metrics["eval_docs"] == smoke_config["data"]["max_eval_docs"]
    assert metrics["val_perplexity"] > 1 and metrics["unigram_perplexity"] > 1
    mc = metrics["mc"]["lookup"]
    assert mc["questions"] == smoke_config["data"]["max_mc_questions"] and 0 <= mc["acc"] <= 1


def test_loads_through_transformers_auto_classes(smoke_build):
    out, _, _ = smoke_build
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM" and type(tokenizer).__name__ == "Qwen2Tokenizer"
    check_same_state(model.state_dict(), qa_lm.load(out)[0].state_dict())
    half, _ = qa_lm.load(out, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16 and not half.training
    # LoRA targets exist with the names peft looks for
    attention = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    layers = model.config.num_hidden_layers
    assert attention == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in "qkvo"]
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    assert sum("lora_A" in n for n, _ in lora.named_parameters()) == 2 * layers


def test_load_reproduces_the_in_memory_model(tmp_path, smoke_config):
    result = qa_lm.train(smoke_config)
    qa_lm.save(result.model, result.tokenizer, tmp_path)
    model, tokenizer = qa_lm.load(tmp_path)
    check_same_state(result.model.state_dict(), model.state_dict())
    ids = torch.tensor([qa_lm.encode_documents(tokenizer, SAMPLE_TEXTS[:1])[0]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_same_seed_same_weights_other_seed_differs(tmp_path, smoke_build, smoke_config):
    out, metrics, _ = smoke_build
    again = qa_lm.build(smoke_config, tmp_path / "again")
    check_same_state(load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors")))
    assert again["weights_sha256"] == metrics["weights_sha256"]
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    def measured(m):  # everything but timings and memory
        return {k: v for k, v in m.items() if "seconds" not in k and k != "peak_rss_mb"}

    assert measured(again) == measured(metrics)

    other = qa_lm.build({**smoke_config, "seed": smoke_config["seed"] + 1}, tmp_path / "other")
    assert other["weights_sha256"] != metrics["weights_sha256"]


def test_build_leaves_the_global_rng_alone(smoke_config):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    qa_lm.train(smoke_config)
    assert torch.equal(torch.rand(3), expected)


def test_load_explains_a_folder_that_is_not_a_build(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="notes.txt"):
        qa_lm.load(tmp_path)
    with pytest.raises(ValueError, match="no such directory"):
        qa_lm.load(tmp_path / "missing")


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_and_matches_the_auto_loaded_one(smoke_build, smoke_config):
    out, _, _ = smoke_build
    recipe = qa_lm.QALMRecipe.from_dict(smoke_config)
    trained = qa_lm.train_tokenizer(qa_lm.pretrain_texts(recipe), recipe.tokenizer, 128)
    loaded = AutoTokenizer.from_pretrained(out)
    texts = SAMPLE_TEXTS + [qa_lm.document_text(e) for e in QASource(["arc_easy", "mmlu"], scheme="hashed").examples("test")[::10]]
    ids = qa_lm.encode_documents(loaded, texts)
    assert ids == qa_lm.encode_documents(trained, texts)  # AutoTokenizer rebuilds the trained pipeline
    assert [loaded.decode(i) for i in ids] == texts
    assert loaded(SAMPLE_TEXTS[0])["input_ids"] == ids[0]  # nothing added around the text
    assert (loaded.eos_token, loaded.eos_token_id, loaded.pad_token, loaded.pad_token_id) == ("<|endoftext|>", 0, "<|pad|>", 1)
    assert loaded.bos_token is None and len(loaded) <= recipe.tokenizer.vocab_size
    assert loaded("12")["input_ids"] == [loaded.convert_tokens_to_ids("1"), loaded.convert_tokens_to_ids("2")]


# ----------------------------------------------------------------------------- measures


def test_unigram_on_a_fixed_example():
    log_probs = qa_lm.unigram_log_probs(torch.tensor([0, 0, 1]), vocab_size=3)  # add-one: 3/6, 2/6, 1/6
    assert torch.allclose(log_probs.exp(), torch.tensor([0.5, 1 / 3, 1 / 6], dtype=torch.float64))
    nll, n = qa_lm.unigram_nll(log_probs, [[0], [1]])
    assert n == 2 and nll == pytest.approx(-math.log(0.5) - math.log(1 / 3))
    assert qa_lm.perplexity(nll, n) == pytest.approx(math.sqrt(6))
    nll, n = qa_lm.unigram_nll(qa_lm.unigram_log_probs(torch.tensor([0, 1]), 4, alpha=0.0), [[1, 1]])
    assert qa_lm.perplexity(nll, n) == pytest.approx(2.0)


def test_token_stream_and_targets():
    assert qa_lm.token_stream([[5, 6], [7]], eos_id=0).tolist() == [0, 5, 6, 0, 7, 0]
    assert qa_lm.eval_targets([[5, 6], [7, 8, 9, 10]], eos_id=0, max_len=3) == [[5, 6, 0], [7, 8, 9]]


def test_perplexity_of_a_uniform_model_is_the_vocabulary(tiny_model):
    uniform = type(tiny_model)(tiny_model.config).eval()
    with torch.no_grad():
        for p in uniform.parameters():
            p.zero_()  # zero norm weights → zero hidden state → zero logits → uniform
    targets = [[3, 4, 5, 0], [7, 0], [9, 9, 9, 9, 9, 0]]
    nll, n = qa_lm.sequence_nll(uniform, targets, bos_id=0, pad_id=1, batch_size=2)
    assert n == 12
    assert qa_lm.perplexity(nll, n) == pytest.approx(50.0, rel=1e-5)


def test_sequence_nll_matches_a_direct_computation(tiny_model):
    targets = [[3, 4, 5, 0], [7, 0], [9, 8, 7, 6, 5, 0]]
    expected = 0.0
    for seq in targets:  # one unpadded sequence at a time
        ids = torch.tensor([[0] + seq])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(input_ids=ids).logits[0, :-1], dim=-1)
        expected -= logp[torch.arange(len(seq)), torch.tensor(seq)].sum().item()
    for batch_size in (1, 2, 8):  # right padding must not change anything
        nll, n = qa_lm.sequence_nll(tiny_model, targets, bos_id=0, pad_id=1, batch_size=batch_size)
        assert n == 12 and nll == pytest.approx(expected, rel=1e-5)


def test_mc_accuracy_counts_the_likeliest_choice(smoke_build):
    out, metrics, _ = smoke_build
    model, tokenizer = qa_lm.load(out)
    examples = SkillsSource(["lookup"]).examples_of("lookup", "test")[:6]
    scores = [qa_lm.mc_scores(model, tokenizer, ex) for ex in examples]
    best = [max(range(len(ll)), key=ll.__getitem__) for ll, _ in scores]
    wrong = [(b + 1) % len(ex.choices) for b, ex in zip(best, examples)]
    def relabel(answers):
        return [dataclasses.replace(ex, answer=a) for ex, a in zip(examples, answers)]

    assert qa_lm.mc_accuracy(model, tokenizer, relabel(best))["acc"] == 1.0
    assert qa_lm.mc_accuracy(model, tokenizer, relabel(wrong))["acc"] == 0.0
    # a score is the summed log-probability of the continuation's tokens after eos + prompt
    ex = examples[0]
    prompt, continuations = format_question(ex)
    context = [tokenizer.eos_token_id] + tokenizer(prompt)["input_ids"]
    cont = tokenizer(continuations[1])["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([context + cont])).logits[0], dim=-1)
    direct = sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(cont))
    assert scores[0][0][1] == pytest.approx(direct, abs=1e-4)
    assert scores[0][1][1] == pytest.approx(direct / len(continuations[1]), abs=1e-4)
    with pytest.raises(ValueError, match="at least one"):
        qa_lm.mc_accuracy(model, tokenizer, [])
    # the build's reported figure is mc_accuracy on the first `max_mc_questions` test questions
    n = metrics["mc"]["lookup"]["questions"]
    again = qa_lm.mc_accuracy(model, tokenizer, SkillsSource(["lookup"]).examples_of("lookup", "test")[:n])
    assert round(again["acc"], 4) == metrics["mc"]["lookup"]["acc"]


# ----------------------------------------------------------------------------- the real model


@pytest.mark.full_build
def test_full_build_reaches_the_quality_bar(tmp_path):
    metrics = qa_lm.build(qa_lm.recipe_config("full"), tmp_path)
    assert metrics["val_perplexity"] < 0.5 * metrics["unigram_perplexity"], metrics
    assert (tmp_path / "model.safetensors").stat().st_size <= 6 * 1024**2


def test_bases_evaluate_lm_gives_each_skill_its_accuracy_with_a_wilson_interval(run_cli, tmp_path):
    from scipy.stats import binomtest

    out = tmp_path / "quality.json"
    code, stdout, err = run_cli("bases", "evaluate-lm", "--size", "smoke", "--split", "validation", "--output", out,
                                "--store", tmp_path / "store")
    assert code == 0, err
    result = json.loads(out.read_text())
    per_skill = result["per_skill"]
    assert list(per_skill) == list(SkillsSource().sets()) and result["chance"] == 0.25
    assert sum(r["questions"] for r in per_skill.values()) == result["acc"]["questions"] == len(SkillsSource().examples("validation"))
    assert result["acc"]["correct"] == sum(r["correct"] for r in per_skill.values())
    for r in [*per_skill.values(), result["acc"]]:
        ci = binomtest(r["correct"], r["questions"]).proportion_ci(method="wilson")
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high)) and r["ci_low"] <= r["value"] <= r["ci_high"]
    assert "all" in stdout and "95% interval" in stdout
    code, _, err = run_cli("bases", "evaluate-lm", "--size", "smoke", "--split", "train", "--store", tmp_path / "store")
    assert code == 2 and "not a held-out skills split; valid: validation, test" in err

"""`tiny:qa-lm`: a small Qwen2-architecture causal LM pretrained from scratch on the bundled QA sets.

The tiny world's analog of Qwen2 in the paper's ARC population. It is an ordinary transformers
`Qwen2ForCausalLM` with a byte-level BPE `PreTrainedTokenizerFast`, saved with `save_pretrained`,
so everything downstream loads it exactly like a real model by HF id:
`AutoModelForCausalLM.from_pretrained(folder)`, `AutoTokenizer.from_pretrained(folder)`.
Its attention has `q_proj`, `k_proj`, `v_proj`, `o_proj` (LoRA targets as in Qwen2).

Shape legend: B batch, T tokens per sequence, V vocabulary, C answer choices.

A built folder holds (transformers' own layout)

    config.json, generation_config.json      # Qwen2Config (model_type "qwen2")
    model.safetensors                        # the weights, fp32, embeddings tied to the LM head
    tokenizer.json, tokenizer_config.json    # Qwen2Tokenizer, byte-level BPE; eos "<|endoftext|>", pad "<|pad|>"

Data (`data.source`): by default the tiny world's learnable skills (`pipeline.data.skills`: six
templated kinds of question, four choices each, split by a hash of the question text). The model
pretrains on the "pretrain" split of the recipe's sets; each example is read either as the scorers
will present it, lm-evaluation-harness style,

    "Question: {question}\nAnswer: {correct choice}"

or, for the other examples, as the plain statement of the same fact ("23 plus 9 is 32.", "Of
lamp, pear, wolf and drum, pear is a fruit.", "Snow is white."): a share `data.qa_share` (10 %),
chosen by a hash of the id, is read as questions. So the base knows most of what it is asked but
has met the question form rarely, as a pretrained LM has met most of its knowledge as prose: it
answers above chance, and a LoRA on a few dozen questions of a skill teaches it to answer those
(the analog of finetuning Qwen2 on ARC). `data.source: qa` pretrains on the bundled real QA sets
instead (hashed splits; every example as a question): a model this size stays at chance on them.

Documents are shuffled (seeded), joined into one token stream with an eos token before each,
and cut into windows of `seq_len + 1` tokens that each epoch visits in a fresh seeded order.
The tokenizer is trained on the same pretrain texts (so no held-out text shapes it).

Measures, reported by `build`:
- held-out perplexity on the "validation" split texts (questions with their answers): each
  document is scored as eos + text + eos (targets: text tokens and the closing eos, at most
  `seq_len` of them), next to the perplexity of an add-one-smoothed unigram model of the
  pretrain token stream on exactly the same targets (`unigram_log_probs`);
- zero-shot multiple-choice accuracy on the "test" split of `data.mc_sets`: log-likelihood of
  " {choice}" after eos + "Question: …\nAnswer:", argmax (`acc`), and divided by the
  continuation's length in characters (`acc_norm`), as lm-evaluation-harness defines them;
  chance is the mean of 1 / (number of choices). `skills_quality` (`lol bases evaluate-lm`)
  gives the same per skill with 95 % intervals.

The "full" model: vocabulary 1024 (the skills' text trains ~740 BPE tokens), hidden 128, 4
layers, 4 heads (head dim 32), MLP 384, embeddings tied: 0.99 M parameters. 400 steps × 16
windows × 256 tokens (1.64 M tokens, ≈ 11 epochs of the ≈ 0.15 M-token pretrain stream).
Measured figures are in docs/tiny-world.md.

Deterministic given `config["seed"]` on one machine and thread count; the caller's global torch
RNG state is left as it was. Run it with one torch thread where cores are shared: two threads on
two busy cores made the same training five times slower here.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.data import skills
from pipeline.data.base import QAExample, hash_bucket
from pipeline.data.qa import SETS, QASource, encode_documents, format_question
from pipeline.data.qa import data_fingerprint as qa_data_fingerprint

NAME = "qa-lm"
KIND = "causal_lm"
SIZES = ("smoke", "full")

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
SCHEME = "hashed"  # the QASource split scheme the recipe's splits refer to
PRETRAIN_SPLIT, EVAL_SPLIT, MC_SPLIT = "pretrain", "validation", "test"

Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class TokenizerSettings:
    vocab_size: int = 1024  # byte-level BPE vocabulary, special tokens included (the skills' text needs ~740)
    min_frequency: int = 2  # a merge needs a pair seen at least this often
    eos_token: str = "<|endoftext|>"  # document separator and end of text (no bos, as Qwen2)
    pad_token: str = "<|pad|>"


@dataclass(frozen=True)
class ModelSettings:
    """Qwen2Config fields (vocab_size comes from the tokenizer settings)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True


DATA_SOURCES = ("skills", "qa")  # the learnable templated skills, or the bundled real QA sets


@dataclass(frozen=True)
class DataSettings:
    source: str = "skills"  # "skills" (pipeline.data.skills) or "qa" (bundled real QA sets, hashed splits)
    sets: tuple[str, ...] = skills.SETS  # sets whose "pretrain" split the model reads
    max_pretrain_docs: int | None = None  # use only the first N pretrain documents (None: all)
    max_eval_docs: int | None = None  # perplexity on the first N validation documents (None: all)
    mc_sets: tuple[str, ...] = skills.SETS  # zero-shot MC report, per set
    max_mc_questions: int | None = None  # per MC set, the first N test questions (None: all)
    # skills only: the share of pretrain examples the model reads as a question with its answer; the
    # rest it reads as the plain statement of the same fact (`skills.statement`), chosen by id hash
    qa_share: float = 0.1

    def known_sets(self) -> tuple[str, ...]:
        return skills.SETS if self.source == "skills" else tuple(SETS)

    def questions(self, sets: Sequence[str]):
        """The source of `sets`: `examples(split)`, `examples_of(set, split)` with splits pretrain … test."""
        return skills.SkillsSource(sets) if self.source == "skills" else QASource(list(sets), scheme=SCHEME)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 400  # optimiser steps (≈ 1.2 epochs of the pretrain split)
    batch_size: int = 16  # windows per step
    seq_len: int = 256  # tokens per window (and the perplexity cap per document)
    lr: float = 3e-3  # AdamW peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr × this
    warmup_steps: int = 20  # linear warm-up
    weight_decay: float = 0.1  # on matrices only (not norms, biases, embeddings)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm (0: off)


@dataclass(frozen=True)
class QALMRecipe:
    """Everything that determines a `tiny:qa-lm` build (the JSON of `recipe_config`)."""

    seed: int = 0
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["data"]["sets"] = list(self.data.sets)
        out["data"]["mc_sets"] = list(self.data.mc_sets)
        out["train"]["betas"] = list(self.train.betas)
        return out

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> QALMRecipe:
        """Validate a `recipe_config` dict; ValueError names the bad key or value."""
        if not isinstance(config, dict):
            raise ValueError(f"qa-lm config must be a dict, got {type(config).__name__}")
        _check_keys("config", config, {f.name for f in fields(cls)})
        sections: dict[str, Any] = {}
        kinds = (("tokenizer", TokenizerSettings), ("model", ModelSettings), ("data", DataSettings),
                 ("train", TrainSettings))
        for name, kind in kinds:
            raw = config.get(name, {})
            _check_keys(f"config.{name}", raw, {f.name for f in fields(kind)})
            raw = dict(raw)
            for key in ("sets", "mc_sets", "betas"):
                if key in raw and isinstance(raw[key], list):
                    raw[key] = tuple(raw[key])
            sections[name] = kind(**raw)
        recipe = cls(seed=config.get("seed", 0), **sections)
        recipe.check()
        return recipe

    def check(self) -> None:
        problems = []
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            problems.append(f"seed must be an int, got {self.seed!r}")
        tok, m, d, t = self.tokenizer, self.model, self.data, self.train
        if tok.vocab_size < 256 + 2:
            problems.append(f"tokenizer.vocab_size must be ≥ 258 (256 bytes + eos + pad), got {tok.vocab_size}")
        if tok.eos_token == tok.pad_token or not tok.eos_token or not tok.pad_token:
            problems.append(f"tokenizer.eos_token and pad_token must be distinct and non-empty, got {tok.eos_token!r}, {tok.pad_token!r}")
        if m.hidden_size % m.num_attention_heads or m.num_attention_heads % m.num_key_value_heads:
            problems.append(f"model.hidden_size ({m.hidden_size}) must divide by num_attention_heads ({m.num_attention_heads}), "
                            f"which must divide by num_key_value_heads ({m.num_key_value_heads})")
        if min(m.hidden_size, m.num_hidden_layers, m.intermediate_size, m.num_key_value_heads) < 1:
            problems.append("model sizes must be ≥ 1")
        if not 0 <= d.qa_share <= 1 or (d.source != "skills" and d.qa_share != 1):
            problems.append(f"data.qa_share must be in [0, 1] (and 1 unless data.source is skills), got {d.qa_share}")
        if d.source not in DATA_SOURCES:
            problems.append(f"data.source must be one of {list(DATA_SOURCES)}, got {d.source!r}")
        for key in ("sets", "mc_sets"):
            unknown = [s for s in getattr(d, key) if s not in d.known_sets()]
            if unknown or not getattr(d, key) or len(set(getattr(d, key))) != len(getattr(d, key)):
                problems.append(f"data.{key} must be distinct {d.source} set names from {list(d.known_sets())}, "
                                f"got {list(getattr(d, key))}")
        for key in ("max_pretrain_docs", "max_eval_docs", "max_mc_questions"):
            value = getattr(d, key)
            if value is not None and value < 1:
                problems.append(f"data.{key} must be ≥ 1 or null, got {value}")
        if t.steps < 1 or t.batch_size < 1 or t.seq_len < 2:
            problems.append(f"train.steps ≥ 1, batch_size ≥ 1, seq_len ≥ 2 required, got {t.steps}, {t.batch_size}, {t.seq_len}")
        if t.seq_len + 1 > m.max_position_embeddings:
            problems.append(f"train.seq_len + 1 ({t.seq_len + 1}) exceeds model.max_position_embeddings ({m.max_position_embeddings})")
        if not 0 < t.lr or not 0 <= t.min_lr_ratio <= 1 or t.warmup_steps < 0:
            problems.append(f"train.lr > 0, 0 ≤ min_lr_ratio ≤ 1, warmup_steps ≥ 0 required, got {t.lr}, {t.min_lr_ratio}, {t.warmup_steps}")
        if problems:
            raise ValueError("invalid qa-lm config: " + "; ".join(problems))


def _check_keys(where: str, raw: Any, allowed: set[str]) -> None:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping, got {raw!r}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {sorted(allowed)}")


def recipe_config(size: str) -> dict[str, Any]:
    """The JSON recipe of `size`: "smoke" builds in seconds (tests), "full" is the real model."""
    if size == "full":
        recipe = QALMRecipe()
    elif size == "smoke":
        recipe = QALMRecipe(
            tokenizer=TokenizerSettings(vocab_size=384),
            model=ModelSettings(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                intermediate_size=64, max_position_embeddings=128),
            data=DataSettings(sets=("arithmetic", "lookup"), max_pretrain_docs=200, max_eval_docs=24,
                              mc_sets=("lookup",), max_mc_questions=8, qa_share=0.5),
            train=TrainSettings(steps=4, batch_size=4, seq_len=64, warmup_steps=1),
        )
    else:
        raise ValueError(f"tiny:{NAME} has sizes {', '.join(SIZES)}, not {size!r}")
    return recipe.to_dict()


def data_fingerprint() -> str:
    """The QA data the model can train on: the skills' and every bundled set's examples and split tables."""
    return f"skills-{skills.data_fingerprint()}-qa-{qa_data_fingerprint()}"


# ----------------------------------------------------------------------------- text and tokenizer


def document_text(example: QAExample) -> str:
    """ "Question: {question}\\nAnswer: {correct choice}" — the prompt and gold continuation the
    multiple-choice scorers use (`format_question`), joined."""
    prompt, continuations = format_question(example)
    return prompt + continuations[example.answer]


def train_tokenizer(texts: Sequence[str], settings: TokenizerSettings, model_max_length: int):
    """A byte-level BPE trained on `texts`, as a transformers `Qwen2Tokenizer`.

    It is trained with Qwen2's own text pipeline (NFC normalisation, Qwen2's pre-tokenisation
    regex: digits one by one, then GPT-2 byte-level), because `AutoTokenizer` rebuilds exactly
    that pipeline around the saved vocabulary and merges for every `model_type: qwen2` folder.
    Every byte is in the alphabet, so NFC text round-trips (`decode(encode(t)) == t`). The eos
    and pad tokens take ids 0 and 1; there is no bos or unk, and nothing is added around text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size,
        min_frequency=settings.min_frequency,
        special_tokens=[settings.eos_token, settings.pad_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in json.loads(backend.to_str())["model"]["merges"]]
    return Qwen2Tokenizer(
        vocab=backend.get_vocab(),
        merges=merges,
        unk_token=None,
        eos_token=settings.eos_token,
        pad_token=settings.pad_token,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def token_stream(documents: Sequence[Sequence[int]], eos_id: int) -> torch.Tensor:
    """(N,) int64: eos before every document, and one closing eos."""
    ids: list[int] = []
    for doc in documents:
        ids.append(eos_id)
        ids.extend(doc)
    ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def eval_targets(documents: Sequence[Sequence[int]], eos_id: int, max_len: int) -> list[list[int]]:
    """Each document's targets for perplexity: its tokens and a closing eos, at most `max_len`."""
    return [(list(doc) + [eos_id])[:max_len] for doc in documents]


# ----------------------------------------------------------------------------- measures


def unigram_log_probs(stream: torch.Tensor, vocab_size: int, alpha: float = 1.0) -> torch.Tensor:
    """(V,) log p(token) of an add-`alpha` smoothed unigram model fit to the ids in `stream`."""
    counts = torch.bincount(stream.flatten(), minlength=vocab_size).double()  # (V,)
    assert counts.numel() == vocab_size, f"stream holds ids ≥ vocab_size {vocab_size}"
    return torch.log((counts + alpha) / (counts.sum() + alpha * vocab_size))


def unigram_nll(log_probs: torch.Tensor, targets: Sequence[Sequence[int]]) -> tuple[float, int]:
    """(summed negative log-likelihood, number of tokens) of `targets` under a unigram model."""
    flat = torch.tensor([t for seq in targets for t in seq], dtype=torch.long)
    return float(-log_probs[flat].sum()), int(flat.numel())


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _right_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids right-padded with `pad_id`, and (B, T) 0/1 attention mask."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.no_grad()
def continuation_logliks(model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                         pad_id: int, batch_size: int = 32) -> list[float]:
    """Summed log p(continuation | context) per pair; contexts must be non-empty.

    Pairs longer than the model's `max_position_embeddings` lose context tokens from the left.
    """
    limit = model.config.max_position_embeddings
    device = _device_of(model)
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for start in range(0, len(contexts), batch_size):
            seqs, spans = [], []
            for ctx, cont in zip(contexts[start : start + batch_size], continuations[start : start + batch_size]):
                assert ctx and cont, "context and continuation must be non-empty"
                seq = (list(ctx) + list(cont))[-limit:]
                seqs.append(seq)
                spans.append((len(seq) - len(cont), len(seq)))  # positions of the continuation
            ids, mask = _right_padded(seqs, pad_id)  # (B, T)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
            logp = F.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V): position t predicts token t+1
            token_logp = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            for row, (a, b) in enumerate(spans):
                out.append(float(token_logp[row, a - 1 : b - 1].sum()))
    finally:
        model.train(was_training)
    return out


def sequence_nll(model, targets: Sequence[Sequence[int]], bos_id: int, pad_id: int,
                 batch_size: int = 32) -> tuple[float, int]:
    """(summed NLL, number of tokens) of each target sequence given `bos_id` before it."""
    logliks = continuation_logliks(model, [[bos_id]] * len(targets), targets, pad_id, batch_size)
    return -sum(logliks), sum(len(t) for t in targets)


def perplexity(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens)


def mc_scores(model, tokenizer, example: QAExample) -> tuple[list[float], list[float]]:
    """Per choice: (log-likelihood of " {choice}" after eos + "Question: …\\nAnswer:",
    that log-likelihood divided by the continuation's length in characters)."""
    prompt, continuations = format_question(example)
    context = [tokenizer.eos_token_id] + encode_documents(tokenizer, [prompt])[0]
    conts = encode_documents(tokenizer, list(continuations))
    ll = continuation_logliks(model, [context] * len(conts), conts, tokenizer.pad_token_id)
    return ll, [v / len(c) for v, c in zip(ll, continuations)]


def mc_accuracy(model, tokenizer, examples: Sequence[QAExample]) -> dict[str, float]:
    """lm-evaluation-harness `acc` and `acc_norm` over `examples`, with the chance level."""
    if not examples:
        raise ValueError("mc_accuracy needs at least one example")
    acc = acc_norm = 0
    for ex in examples:
        ll, ll_norm = mc_scores(model, tokenizer, ex)
        acc += max(range(len(ll)), key=ll.__getitem__) == ex.answer
        acc_norm += max(range(len(ll_norm)), key=ll_norm.__getitem__) == ex.answer
    n = len(examples)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "chance": sum(1 / len(e.choices) for e in examples) / n,
            "questions": n}


# ----------------------------------------------------------------------------- model and training


def qwen2_config(recipe: QALMRecipe, eos_id: int, pad_id: int):
    """The transformers Qwen2Config of the recipe."""
    from transformers import Qwen2Config

    m = recipe.model
    return Qwen2Config(
        vocab_size=recipe.tokenizer.vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        rms_norm_eps=m.rms_norm_eps,
        initializer_range=m.initializer_range,
        tie_word_embeddings=m.tie_word_embeddings,
        use_sliding_window=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, t: TrainSettings) -> float:
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    model: torch.nn.Module
    tokenizer: Any
    stream: torch.Tensor  # (N,) the pretrain token stream
    pretrain_docs: int
    steps: int
    tokens_seen: int
    epochs: float
    train_seconds: float
    tokenizer_seconds: float
    final_loss: float


def reads_as_question(example: QAExample, qa_share: float) -> bool:
    """Whether pretraining shows `example` as a question with its answer (else as its statement)."""
    return hash_bucket("pretrain-form:", example.id) < round(qa_share * 1000)


def pretrain_texts(recipe: QALMRecipe) -> list[str]:
    d = recipe.data
    examples = d.questions(d.sets).examples(PRETRAIN_SPLIT)[: d.max_pretrain_docs]
    if d.source != "skills":
        return [document_text(ex) for ex in examples]
    return [document_text(ex) if reads_as_question(ex, d.qa_share) else skills.statement(ex) for ex in examples]


def train(config: dict[str, Any], progress: Progress | None = None) -> TrainResult:
    """Train the tokenizer, then the model from scratch, on the recipe's pretrain texts."""
    from transformers import Qwen2ForCausalLM

    recipe = QALMRecipe.from_dict(config)
    t = recipe.train
    texts = pretrain_texts(recipe)
    started = time.perf_counter()
    tokenizer = train_tokenizer(texts, recipe.tokenizer, recipe.model.max_position_embeddings)
    tokenizer_seconds = time.perf_counter() - started
    assert len(tokenizer) <= recipe.tokenizer.vocab_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        generator = torch.Generator().manual_seed(recipe.seed)
        order = torch.randperm(len(texts), generator=generator).tolist()
        documents = encode_documents(tokenizer, [texts[i] for i in order])
        stream = token_stream(documents, tokenizer.eos_token_id)  # (N,)
        n_windows = (stream.numel() - 1) // t.seq_len
        if n_windows < 1:
            raise ValueError(f"the pretrain text has {stream.numel()} tokens, fewer than seq_len + 1 = {t.seq_len + 1}")
        windows = stream[: n_windows * t.seq_len + 1]

        model = Qwen2ForCausalLM(qwen2_config(recipe, tokenizer.eos_token_id, tokenizer.pad_token_id))
        optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, eps=t.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, t))
        model.train()
        batch = min(t.batch_size, n_windows)
        perm, cursor = torch.randperm(n_windows, generator=generator), 0
        offsets = torch.arange(t.seq_len + 1)  # (T+1,)
        losses: list[float] = []
        started = time.perf_counter()
        for step in range(t.steps):
            if cursor + batch > n_windows:  # next epoch: a fresh order, the remainder dropped
                perm, cursor = torch.randperm(n_windows, generator=generator), 0
            starts = perm[cursor : cursor + batch] * t.seq_len  # (B,)
            cursor += batch
            chunk = windows[starts[:, None] + offsets]  # (B, T+1)
            logits = model(input_ids=chunk[:, :-1]).logits  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach().item())
            if progress is not None:
                progress(step + 1, t.steps)
        seconds = time.perf_counter() - started
    model.eval()
    tail = losses[-max(1, min(20, len(losses) // 5)) :]
    seen = t.steps * batch * t.seq_len
    return TrainResult(model, tokenizer, stream, len(texts), t.steps, seen, seen / (n_windows * t.seq_len),
                       seconds, tokenizer_seconds, sum(tail) / len(tail))


def save(model, tokenizer, out_dir: Path) -> Path:
    """`save_pretrained` the model (safetensors) and tokenizer into `out_dir`; the weights' path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # transformers 5 writes safetensors only
    tokenizer.save_pretrained(out_dir)
    weights = out_dir / WEIGHTS_FILE
    assert weights.is_file(), f"save_pretrained wrote no {WEIGHTS_FILE}: {sorted(p.name for p in out_dir.iterdir())}"
    return weights


def load(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a built folder, through transformers' Auto classes (as an HF id would load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a built tiny:{NAME} folder (no such directory)")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE) if not (path / f).is_file()]
    if missing:
        raise ValueError(f"{path} lacks {missing} (it holds {sorted(p.name for p in path.iterdir())})")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def evaluate(model, tokenizer, recipe: QALMRecipe, stream: torch.Tensor) -> dict[str, Any]:
    """Held-out perplexity vs the unigram model of `stream`, and zero-shot MC accuracy."""
    d = recipe.data
    source = d.questions(d.sets)
    eval_texts = [document_text(ex) for ex in source.examples(EVAL_SPLIT)][: d.max_eval_docs]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    targets = eval_targets(encode_documents(tokenizer, eval_texts), eos, recipe.train.seq_len)
    nll, n = sequence_nll(model, targets, eos, pad)
    uni_nll, uni_n = unigram_nll(unigram_log_probs(stream, recipe.tokenizer.vocab_size), targets)
    assert uni_n == n
    mc_source = d.questions(d.mc_sets)
    mc = {s: mc_accuracy(model, tokenizer, mc_source.examples_of(s, MC_SPLIT)[: d.max_mc_questions])
          for s in d.mc_sets}
    return {
        "eval_split": EVAL_SPLIT,
        "eval_docs": len(eval_texts),
        "eval_tokens": n,
        "val_loss": round(nll / n, 4),
        "val_perplexity": round(perplexity(nll, n), 3),
        "unigram_perplexity": round(perplexity(uni_nll, n), 3),
        "mc_split": MC_SPLIT,
        "mc": {s: {k: round(v, 4) for k, v in r.items()} for s, r in mc.items()},
    }


def build(config: dict[str, Any], out_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Train from scratch, save model + tokenizer into `out_dir`, return metrics (JSON-able)."""
    started = time.perf_counter()
    recipe = QALMRecipe.from_dict(config)
    result = train(config, progress)
    weights = save(result.model, result.tokenizer, Path(out_dir))
    metrics = evaluate(result.model, result.tokenizer, recipe, result.stream)
    return {
        **metrics,
        "pretrain_docs": result.pretrain_docs,
        "pretrain_tokens": int(result.stream.numel()),
        "tokenizer_vocab": len(result.tokenizer),
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "epochs": round(result.epochs, 3),
        "final_loss": round(result.final_loss, 4),
        "tokenizer_seconds": round(result.tokenizer_seconds, 2),
        "train_seconds": round(result.train_seconds, 2),
        "build_seconds": round(time.perf_counter() - started, 2),
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "weights_bytes": weights.stat().st_size,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads(),
    }


def proportion_with_ci(correct: int, total: int) -> dict[str, float]:
    """A share of questions right with its 95% Wilson interval (scipy), and the count it came from."""
    from scipy.stats import binomtest

    ci = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    return {"value": correct / total, "ci_low": float(ci.low), "ci_high": float(ci.high), "correct": correct, "questions": total}


def skills_quality(model, tokenizer, split: str = MC_SPLIT) -> dict[str, Any]:
    """Zero-shot `acc` of the model on every question of the skills' `split`, per skill and over all of them,
    each with its 95% Wilson interval; chance is 0.25 (four choices each). This is the base's own value of
    tiny-arc's `mc_accuracy` label (the same questions, `format_question`, eos first)."""
    per_skill: dict[str, Any] = {}
    correct_all = total_all = 0
    for name in skills.SETS:
        examples = skills.SkillsSource([name]).examples(split)
        correct = round(mc_accuracy(model, tokenizer, examples)["acc"] * len(examples))
        per_skill[name] = proportion_with_ci(correct, len(examples))
        correct_all, total_all = correct_all + correct, total_all + len(examples)
    overall = proportion_with_ci(correct_all, total_all)
    return {"split": split, "chance": 0.25, "acc": overall, "margin_over_chance": overall["value"] - 0.25,
            "per_skill": per_skill}


__all__ = [
    "KIND", "NAME", "SIZES", "QALMRecipe", "build", "continuation_logliks", "data_fingerprint", "document_text",
    "evaluate", "load", "mc_accuracy", "proportion_with_ci", "skills_quality", "mc_scores", "perplexity", "recipe_config", "save", "sequence_nll",
    "token_stream", "train", "train_tokenizer", "unigram_log_probs", "unigram_nll",
]

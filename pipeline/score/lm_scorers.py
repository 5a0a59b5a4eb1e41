"""`mc_accuracy` and `eval_loss`: what a causal-LM LoRA does on held-out questions.

Both read log-likelihoods of continuations given contexts, with each question rendered as the
trainer renders it (`pipeline.finetune.causal_lm.encode_questions`: start token +
"Question: {question}\\nAnswer:", then " {choice}"), in batches of `batch_size` sequences
(`batched_logliks`: left-padded as the trainer pads, one forward per batch, longest first, the LM
head only on the continuation positions; `mc_accuracy` runs each question's context once for all its
choices from a KV cache, `shared_context_logliks`).

- `mc_accuracy`: per question the summed log-likelihood ll_i of each choice's continuation;
  `acc` = mean over questions of [argmax_i ll_i == answer], `acc_norm` = the same with
  ll_i / len(choice_i), the choice text's length in characters. That is lm-evaluation-harness'
  `multiple_choice` definition (`completion_len` over `doc_to_choice`, without the " " the
  request puts before it); ties go to the first choice (`np.argmax`).
- `eval_loss`: the mean negative log-likelihood per answer token of the correct continuation,
  over every question of the held-out set: the training loss, on data the LoRA never saw.

Questions come from `skills:<sets>` (the tiny world's learnable skills: `skills:all`, `skills:compare+lookup`),
`qa:<set>` (the tiny world's `qa` source, hashed splits) or from an `hf:` /
`folder:` QA dataset (`pipeline.data.hub`: ARC as on the hub, its splits as the hub names them), and
are checked up front (an empty choice list or an answer index out of range names the question). The base is
loaded once in `setup`; each adapter is put on it with `PeftModel.from_pretrained` and taken off
again with `unload()`, so the base is never reloaded. `score_cohort` scores K adapters in the same
forwards: each batch repeated K times, copy k routed to adapter k (`pipeline.cohort.layers`).

Shapes: Q questions, C choices of one question, P (context, continuation) pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import runtime
from pipeline.data import dataset_options, get_source
from pipeline.data.base import DataSourceError, QAExample
from pipeline.finetune.causal_lm import (
    IGNORE_INDEX,
    EncodedQuestion,
    answer_length,
    collate,
    encode_questions,
    forward_args,
    last_logits,
    load_causal_lm,
    pad_token,
)
from pipeline.jobs import Job
from pipeline.manifest import Manifest
from storage import Store

ADAPTER_FILE = "adapter_model.safetensors"


def benchmark_examples(name: str, split: str, limit: int | None = None, spec: Any = None) -> list[QAExample]:
    """The first `limit` questions of `split` of a benchmark: `qa:<set>` (the tiny world's bundled
    sets), or an `hf:<dataset id>` / `folder:<path>` QA dataset with the scorer's config, revision and
    columns (`spec`; ARC by default pools ARC-Challenge then ARC-Easy, in stored order)."""
    if name.startswith("qa:"):
        examples = list(get_source("qa", sets=[name.removeprefix("qa:")]).examples(split))[:limit]
    elif name.startswith("skills:"):
        from pipeline.data.skills import parse_sets

        examples = list(get_source("skills", sets=parse_sets(name.removeprefix("skills:"))).examples(split))[:limit]
    elif name.startswith(("hf:", "folder:")):
        loaded = get_source(name, **dataset_options(spec))
        pool = loaded.examples(split)
        if pool and not isinstance(pool[0], QAExample):
            raise DataSourceError(f"benchmark {name!r} holds images, not questions; map its question/choices/answer "
                                  "columns (columns: {question: …, choices: …, answer: …}) or name a QA dataset")
        examples = list(pool)[:limit]
    else:
        raise DataSourceError(f"benchmark {name!r}: use skills:<set>[+<set>…] or skills:all (the tiny world's learnable "
                              f"skills), qa:<set> (a bundled QA set, e.g. qa:arc_challenge), "
                              f"hf:<dataset id> (e.g. hf:allenai/ai2_arc) or folder:<path>")
    if not examples:
        raise DataSourceError(f"benchmark {name!r} has no questions in split {split!r}")
    return examples


def mc_metrics(logliks: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], answers: Sequence[int]) -> dict[str, float]:
    """lm-evaluation-harness `acc` and `acc_norm` from per-question choice log-likelihoods.

    logliks[q][i]: summed log p(" " + choices[q][i] | context of q); answers[q]: the gold index.
    """
    assert len(logliks) == len(choices) == len(answers) > 0
    acc = acc_norm = 0.0
    for ll, texts, gold in zip(logliks, choices, answers):
        ll = np.asarray(ll, dtype=np.float64)  # (C,)
        lengths = np.array([float(len(t)) for t in texts])  # (C,) characters
        acc += float(np.argmax(ll) == gold)
        acc_norm += float(np.argmax(ll / lengths) == gold)
    return {"acc": acc / len(answers), "acc_norm": acc_norm / len(answers)}


@torch.no_grad()
def batched_logliks(model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_id: int,
                    batch_size: int, copies: int = 1, route: Callable[[int], None] | None = None) -> np.ndarray:
    """(copies, P) summed log p(continuation | context) of every pair, for each copy of the model's rows.

    Each batch of B pairs is left-padded (`collate`) and repeated `copies` times (copy c in rows
    c·B … (c+1)·B − 1); `route(B)` is called before each forward (a cohort routes copy c to adapter c).
    Pairs longer than `max_position_embeddings` lose context tokens from the left.
    """
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 2**31)
    accepted = forward_args(model)
    device = next(model.parameters()).device
    out = np.empty((copies, len(contexts)))
    for start in range(0, len(contexts), batch_size):
        rows = []
        for context, continuation in zip(contexts[start:start + batch_size], continuations[start:start + batch_size]):
            ids = [*context, *continuation][-limit:]
            n = min(len(continuation), len(ids) - 1)
            rows.append((ids, [IGNORE_INDEX] * (len(ids) - n) + ids[len(ids) - n:]))
        batch = {k: v.repeat(copies, 1).to(device) for k, v in collate(rows, pad_id).items()}  # (copies·B, T)
        if route is not None:
            route(len(rows))
        K = answer_length(batch["labels"])
        logits = last_logits(model, batch, accepted, K + 1)[:, -(K + 1):-1].float()  # (copies·B, K, V)
        labels = batch["labels"][:, -K:]  # (copies·B, K)
        token_logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        summed = (token_logp * (labels != IGNORE_INDEX)).sum(-1)  # (copies·B,)
        out[:, start:start + len(rows)] = summed.view(copies, len(rows)).double().cpu().numpy()
    return out


def _unwrapped(model):
    """The transformers model under a peft wrapper (`model` itself if it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_argument(model) -> str | None:
    """The name under which `model`'s forward takes and returns a KV cache (`cache` in transformers ≥ 5.2x,
    `past_key_values` before), looked up on the model under a peft wrapper; None if it takes neither."""
    accepted = forward_args(_unwrapped(model))
    return next((name for name in ("cache", "past_key_values") if name in accepted), None)


@torch.no_grad()
def shared_context_logliks(model, questions: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int,
                           batch_size: int, copies: int = 1,
                           route: Callable[[int], None] | None = None) -> np.ndarray:
    """(copies, P) summed log p(continuation | context) of every (question, choice) pair, P = Σ_q C_q, in
    question-major order; the same numbers as `batched_logliks` over the pairs, with each context run once.

    `questions[q]` is (context ids, the C_q continuations' ids). Questions are taken in batches of about
    `batch_size` pairs; per batch, one forward over the B contexts less their last token (left-padded,
    `collate`, repeated `copies` times) fills a KV cache, which is repeated per choice, and one forward
    over the N = Σ C_q rows [last context token, *continuation] (right-padded) reads the continuations'
    log-likelihoods: ≈ (T_context + C · T_continuation) tokens per question instead of C · (T_context +
    T_continuation), 3× fewer on the tiny world's four-choice questions. `route(rows)` is called before
    each forward with the rows of one copy (B, then N). A question whose context and longest continuation
    exceed `max_position_embeddings` loses context tokens from the left, the same number for all its choices
    (so its shorter choices keep less context than `batched_logliks` would leave them; within the positions
    the numbers are the same). Contexts need ≥ 2 tokens (`encode_questions` gives "Question: …\nAnswer:");
    a model whose forward takes no KV cache or no position ids gets `batched_logliks`.
    """
    cache_name = cache_argument(model)
    if cache_name is None or "position_ids" not in forward_args(_unwrapped(model)):
        contexts = [context for context, continuations in questions for _ in continuations]
        continuations = [c for _, continuations in questions for c in continuations]
        return batched_logliks(model, contexts, continuations, pad_id, batch_size, copies, route)
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 2**31)
    device = next(model.parameters()).device
    batches, current, pairs = [], [], 0
    for q, (_, continuations) in enumerate(questions):
        if current and pairs + len(continuations) > batch_size:
            batches.append(current)
            current, pairs = [], 0
        current.append(q)
        pairs += len(continuations)
    batches.append(current)
    out = []
    for batch in batches:
        prefixes, tails, choices = [], [], []
        for q in batch:
            context, continuations = questions[q]
            keep = limit - max(len(c) for c in continuations)
            context = list(context)[-keep:] if keep > 0 else []
            if len(context) < 2:
                raise ValueError(f"question {q}: a context of {len(context)} token(s) after fitting its longest choice "
                                 f"({max(len(c) for c in continuations)} tokens) into {limit} positions; contexts need at least 2")
            prefixes.append((context[:-1], context[:-1]))
            tails += [[context[-1], *c] for c in continuations]
            choices.append(len(continuations))
        ctx = collate(prefixes, pad_id)  # (B, T)
        B, T = ctx["input_ids"].shape
        rows = torch.repeat_interleave(torch.arange(copies * B), torch.tensor(choices).repeat(copies))  # (copies·N,)
        if route is not None:
            route(B)
        cache = getattr(model(input_ids=ctx["input_ids"].repeat(copies, 1).to(device),
                              attention_mask=ctx["attention_mask"].repeat(copies, 1).to(device),
                              position_ids=ctx["position_ids"].repeat(copies, 1).to(device), use_cache=True), cache_name)
        cache.batch_select_indices(rows.to(device))
        L, N = max(map(len, tails)), len(tails)
        ids = torch.full((N, L), pad_id, dtype=torch.long)  # (N, L), right-padded
        mask = torch.zeros((N, L), dtype=torch.long)
        for i, tail in enumerate(tails):
            ids[i, :len(tail)], mask[i, :len(tail)] = torch.tensor(tail), 1
        starts = ctx["attention_mask"].sum(-1).repeat_interleave(torch.tensor(choices))  # (N,) real context tokens
        ids, mask, positions = ids.repeat(copies, 1), mask.repeat(copies, 1), (starts[:, None] + torch.arange(L)).repeat(copies, 1)
        if route is not None:
            route(N)
        logits = model(input_ids=ids.to(device), attention_mask=torch.cat([ctx["attention_mask"].repeat(copies, 1)[rows], mask], 1).to(device),
                       position_ids=positions.to(device), use_cache=True, **{cache_name: cache}).logits[:, :-1].float()  # (copies·N, L − 1, V)
        targets = ids[:, 1:].to(device)  # (copies·N, L − 1)
        token_logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        out.append((token_logp * mask[:, 1:].to(device)).sum(-1).view(copies, N).double().cpu())
    return torch.cat(out, 1).numpy()


@contextmanager
def adapter_on(model, adapter_dir: Path | None) -> Iterator[Any]:
    """`model` with the peft adapter of `adapter_dir` loaded (or as is for None); removed after."""
    if adapter_dir is None:
        yield model
        return
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_FILE).is_file():
        there = sorted(p.name for p in adapter_dir.iterdir()) if adapter_dir.is_dir() else "no such folder"
        raise ValueError(f"{adapter_dir} holds no {ADAPTER_FILE} (it holds: {there})")
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    try:
        yield peft_model.eval()
    finally:
        peft_model.unload()  # the base's own modules again


class _LogLikelihoodScorer:
    """Shared by both scorers: the base loaded once, questions encoded once, adapters swapped."""

    def __init__(self, spec: Any, device: str | torch.device | None = None):
        self.spec = spec
        self.device = runtime.compute_device(device)

    def examples(self) -> list[QAExample]:
        raise NotImplementedError

    def pairs(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        raise NotImplementedError

    def setup(self, manifest: Manifest, store: Store) -> None:
        questions = self.examples()  # bad data fails before the base loads
        self.model, self.tokenizer = load_causal_lm(manifest.base.model_dump(), store, self.device)
        self.questions: list[EncodedQuestion] = encode_questions(self.tokenizer, questions)
        self.plan_batches()

    def plan_batches(self) -> None:
        """Sort the pairs longest first, the order `copies_logliks` runs them in."""
        pairs = self.pairs()
        self.order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        self.contexts = [pairs[i][0] for i in self.order]
        self.continuations = [pairs[i][1] for i in self.order]

    @torch.no_grad()
    def logliks(self, adapter_dir: Path | None = None) -> np.ndarray:
        """(P,) summed log p(continuation | context) of every pair, in `pairs()` order."""
        with adapter_on(self.model, adapter_dir) as model:
            return self.copies_logliks(model)[0]

    @torch.no_grad()
    def cohort_logliks(self, adapter_dirs: Sequence[Path]) -> np.ndarray:
        """(K, P) `logliks` of K adapters, computed in the same forwards."""
        from pipeline.cohort.peft_io import stored_adapters_on

        K = len(adapter_dirs)
        with stored_adapters_on(self.model, adapter_dirs, self.device) as routing:
            return self.copies_logliks(self.model.eval(), K, lambda rows: routing.set_blocks(range(K), [rows] * K))

    def copies_logliks(self, model, copies: int = 1, route: Callable[[int], None] | None = None) -> np.ndarray:
        """(copies, P) log-likelihoods of every pair, in `pairs()` order: one forward per batch of pairs, longest first."""
        sorted_ll = batched_logliks(model, self.contexts, self.continuations, pad_token(self.tokenizer),
                                    self.spec.batch_size, copies, route)
        out = np.empty((copies, len(self.order)))
        out[:, self.order] = sorted_ll
        return out

    def score_cohort(self, jobs: Sequence[Job], adapter_dirs: Sequence[Path]) -> list[dict[str, float]]:
        """`score` of each adapter, the adapters scored in the same forwards."""
        return [self.labels(row) for row in self.cohort_logliks(adapter_dirs)]

    def score(self, job: Job | None, adapter_dir: Path | None) -> dict[str, float]:
        return self.labels(self.logliks(adapter_dir))

    def labels(self, logliks: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def dataset_name(self) -> str:
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        """Library versions and, for an `hf:` / `folder:` dataset, what was read: source, config(s), revision,
        split, and per config the dataset fingerprint and row count."""
        out: dict[str, Any] = {"versions": runtime.versions("torch", "transformers", "peft")}
        name = self.dataset_name()
        if name.startswith(("hf:", "folder:")):
            source = get_source(name, **dataset_options(self.spec))
            out["dataset"] = source.provenance(self.spec.split)
        else:
            out["dataset"] = {"source": name, "split": self.spec.split}
        out["dataset"]["limit"] = self.spec.limit
        return out


class McAccuracyScorer(_LogLikelihoodScorer):
    """`acc` and `acc_norm` on the first `limit` questions of `benchmark`'s `split`."""

    def dataset_name(self) -> str:
        return self.spec.benchmark

    def examples(self) -> list[QAExample]:
        return benchmark_examples(self.spec.benchmark, self.spec.split, self.spec.limit, self.spec)

    def pairs(self):
        return [(q.context, cont) for q in self.questions for cont in q.continuations]

    def plan_batches(self) -> None:
        """Sort the questions longest context first, and map their pairs back to `pairs()` order."""
        order = sorted(range(len(self.questions)), key=lambda q: -len(self.questions[q].context))
        self.sorted_questions = [(self.questions[q].context, self.questions[q].continuations) for q in order]
        bounds = np.cumsum([0] + [len(q.continuations) for q in self.questions])
        self.columns = np.concatenate([np.arange(bounds[q], bounds[q + 1]) for q in order])  # sorted pair → pairs() index

    def copies_logliks(self, model, copies: int = 1, route: Callable[[int], None] | None = None) -> np.ndarray:
        """(copies, P) in `pairs()` order, each question's context run once for all its choices
        (`shared_context_logliks`), questions longest context first."""
        sorted_ll = shared_context_logliks(model, self.sorted_questions, pad_token(self.tokenizer),
                                           self.spec.batch_size, copies, route)
        out = np.empty_like(sorted_ll)
        out[:, self.columns] = sorted_ll
        return out

    def choice_logliks(self, adapter_dir: Path | None = None) -> list[np.ndarray]:
        """Per question, (C,) summed log-likelihoods of its choices."""
        return self.per_question(self.logliks(adapter_dir))

    def per_question(self, flat: np.ndarray) -> list[np.ndarray]:
        bounds = np.cumsum([0] + [len(q.continuations) for q in self.questions])
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def labels(self, logliks: np.ndarray) -> dict[str, float]:
        return mc_metrics(self.per_question(logliks), [q.example.choices for q in self.questions],
                          [q.example.answer for q in self.questions])


class EvalLossScorer(_LogLikelihoodScorer):
    """Mean loss per answer token on the first `limit` questions of `dataset`'s `split`."""

    def dataset_name(self) -> str:
        return self.spec.dataset

    def examples(self) -> list[QAExample]:
        return benchmark_examples(self.spec.dataset, self.spec.split, self.spec.limit, self.spec)

    def pairs(self):
        return [(q.context, q.answer) for q in self.questions]

    def labels(self, logliks: np.ndarray) -> dict[str, float]:
        tokens = sum(len(q.answer) for q in self.questions)
        return {"eval_loss": float(-logliks.sum() / tokens)}

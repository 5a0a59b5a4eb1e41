"""`mc_accuracy` and `eval_loss`: what a causal-LM LoRA does on held-out questions.

Both read log-likelihoods of continuations given contexts, with each question rendered as the
trainer renders it (`pipeline.finetune.causal_lm.encode_questions`: start token +
"Question: {question}\\nAnswer:", then " {choice}"), in batches of `batch_size` sequences
(`qa_lm.continuation_logliks`: right-padded, one forward per batch, longest first).

- `mc_accuracy`: per question the summed log-likelihood ll_i of each choice's continuation;
  `acc` = mean over questions of [argmax_i ll_i == answer], `acc_norm` = the same with
  ll_i / len(choice_i), the choice text's length in characters. That is lm-evaluation-harness'
  `multiple_choice` definition (`completion_len` over `doc_to_choice`, without the " " the
  request puts before it); ties go to the first choice (`np.argmax`).
- `eval_loss`: the mean negative log-likelihood per answer token of the correct continuation,
  over every question of the held-out set: the training loss, on data the LoRA never saw.

Questions come from `qa:<set>` (the tiny world's `qa` source, hashed splits) and are checked up
front (an empty choice list or an answer index out of range names the question). The base is
loaded once in `setup`; each adapter is put on it with `PeftModel.from_pretrained` and taken off
again with `unload()`, so the base is never reloaded.

Shapes: Q questions, C choices of one question, P (context, continuation) pairs.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bases.qa_lm import continuation_logliks
from pipeline.data import get_source
from pipeline.data.base import DataSourceError, QAExample
from pipeline.finetune.causal_lm import EncodedQuestion, encode_questions, load_causal_lm, pad_token
from pipeline.jobs import Job
from pipeline.manifest import Manifest
from storage import Store

ADAPTER_FILE = "adapter_model.safetensors"


def benchmark_examples(name: str, split: str, limit: int | None = None) -> list[QAExample]:
    """The first `limit` questions of `split` of a benchmark named `qa:<set>`."""
    if not name.startswith("qa:"):
        raise DataSourceError(f"benchmark {name!r} is not available in this build; use qa:<set> "
                              f"(a bundled QA set of the `qa` source, e.g. qa:arc_challenge)")
    examples = list(get_source("qa", sets=[name.removeprefix("qa:")]).examples(split))[:limit]
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
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def examples(self) -> list[QAExample]:
        raise NotImplementedError

    def pairs(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        raise NotImplementedError

    def setup(self, manifest: Manifest, store: Store) -> None:
        questions = self.examples()  # bad data fails before the base loads
        self.model, self.tokenizer = load_causal_lm(manifest.base.model_dump(), store, self.device)
        self.questions: list[EncodedQuestion] = encode_questions(self.tokenizer, questions)
        pairs = self.pairs()
        self.order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))  # longest first
        self.contexts = [pairs[i][0] for i in self.order]
        self.continuations = [pairs[i][1] for i in self.order]

    @torch.no_grad()
    def logliks(self, adapter_dir: Path | None = None) -> np.ndarray:
        """(P,) summed log p(continuation | context) of every pair, in `pairs()` order."""
        with adapter_on(self.model, adapter_dir) as model:
            sorted_ll = continuation_logliks(model, self.contexts, self.continuations, pad_token(self.tokenizer),
                                             batch_size=self.spec.batch_size)
        out = np.empty(len(self.order))
        out[self.order] = sorted_ll
        return out

    def provenance(self) -> dict[str, str]:
        return {p: importlib.metadata.version(p) for p in ("torch", "transformers", "peft")}


class McAccuracyScorer(_LogLikelihoodScorer):
    """`acc` and `acc_norm` on the first `limit` questions of `benchmark`'s `split`."""

    def examples(self) -> list[QAExample]:
        return benchmark_examples(self.spec.benchmark, self.spec.split, self.spec.limit)

    def pairs(self):
        return [(q.context, cont) for q in self.questions for cont in q.continuations]

    def choice_logliks(self, adapter_dir: Path | None = None) -> list[np.ndarray]:
        """Per question, (C,) summed log-likelihoods of its choices."""
        flat = self.logliks(adapter_dir)
        bounds = np.cumsum([0] + [len(q.continuations) for q in self.questions])
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def score(self, job: Job | None, adapter_dir: Path | None) -> dict[str, float]:
        return mc_metrics(self.choice_logliks(adapter_dir), [q.example.choices for q in self.questions],
                          [q.example.answer for q in self.questions])


class EvalLossScorer(_LogLikelihoodScorer):
    """Mean loss per answer token on the first `limit` questions of `dataset`'s `split`."""

    def examples(self) -> list[QAExample]:
        return benchmark_examples(self.spec.dataset, self.spec.split, self.spec.limit)

    def pairs(self):
        return [(q.context, q.answer) for q in self.questions]

    def score(self, job: Job | None, adapter_dir: Path | None) -> dict[str, float]:
        tokens = sum(len(q.answer) for q in self.questions)
        return {"eval_loss": float(-self.logliks(adapter_dir).sum() / tokens)}

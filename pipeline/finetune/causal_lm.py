"""LoRA finetuning of any transformers causal LM on multiple-choice questions.

The base is whatever `AutoModelForCausalLM.from_pretrained` loads from `resolve_base`: the
built-in `tiny:qa-lm` folder or a Qwen2 / Llama HF id, through the same code. A job trains on
its QA examples formatted exactly as the scorers present them (`encode_questions`): the context
is a start token and "Question: {question}\\nAnswer:", the continuation " {correct choice}",
tokenized separately and joined, so the loss is on exactly the tokens whose log-likelihood
`mc_accuracy` and `eval_loss` read. Labels are -100 everywhere but the answer tokens.

peft adds the LoRA layers (`LoraConfig`: target modules, rank, alpha, the job's dropout);
accelerate handles the device, bf16 on GPU and gradient accumulation. The base is loaded once
per worker in `setup`; each job wraps it with `get_peft_model`, trains, saves the adapter and
`unload()`s the LoRA layers, so the next job starts from the clean base.

Training follows transformers' `Trainer` defaults where the manifest is silent: AdamW, linear
decay of the learning rate to 0 without warm-up, weight decay 0, batch size 8, the last partial
batch kept. The examples are shuffled (the job's seed) and grouped by length as the `Trainer`'s
`group_by_length` does (`LengthGroupedSampler`: questions range from 10 to 200 tokens, and
padding every batch to its longest question made batches of 32 four times slower). Batches are
left-padded (with position ids counted from each sequence's first token), so the answers end
every row and the LM head runs on the answer positions only (`answer_loss`).

Shapes: N training examples, B batch, T tokens per (left-padded) sequence, K answer tokens, V vocabulary.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.bases import BaseModelError
from pipeline.bases.loading import resolve_base
from pipeline.cohort.peft_io import save_naming_base
from pipeline.data.base import DataSourceError, QAExample
from pipeline.data.qa import encode_documents, format_question, validate_example
from pipeline.data.subsets import source_subset
from pipeline.finetune.base import LoraTrainer
from pipeline.finetune.cohort import CohortTask, Member
from pipeline.finetune.runner import NonFiniteLoss
from pipeline.finetune.targets import check_target_modules
from pipeline.manifest import Manifest, SourceSubsets
from storage import Store

IGNORE_INDEX = -100  # label of tokens without loss (transformers' and torch's convention)
DEFAULT_BATCH_SIZE = 8  # transformers' Trainer default per-device batch size


# ----------------------------------------------------------------------------- loading


def load_causal_lm(base: dict[str, Any], store: Store, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32):
    """(model in eval mode on `device`, tokenizer) of a manifest base, tiny or by HF id.

    Weights are read from safetensors only. A base that transformers cannot load as a causal LM
    (another kind of model, a missing folder, an HF id not in the cache while offline) is a
    ValueError naming it and quoting transformers' reason.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, revision = resolve_base(base, store)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if path != base["ref"] and not base["ref"].startswith("tiny:") and not Path(base["ref"]).expanduser().exists():
            from pipeline.artefacts import partly_cached  # an HF id, read from the hub cache

            raise partly_cached(base["ref"], base.get("revision"), "causal_lm", exc) from None
        raise BaseModelError(f"base {base['ref']!r} cannot be loaded as a transformers causal LM "
                         f"(AutoModelForCausalLM / AutoTokenizer on {path!r}): {first}") from None
    if start_token(tokenizer) is None:
        raise BaseModelError(f"base {base['ref']!r}: its tokenizer has neither a bos nor an eos token to start a text with")
    return model.to(device).eval(), tokenizer


def start_token(tokenizer) -> int | None:
    """The token every context starts with: bos where the tokenizer has one (Llama), else eos
    (Qwen2 and tiny:qa-lm, which separate documents with eos)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def pad_token(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start_token(tokenizer)


# ----------------------------------------------------------------------------- text


@dataclass(frozen=True)
class EncodedQuestion:
    """One question as token ids: the context and one continuation per choice."""

    example: QAExample
    context: tuple[int, ...]  # start token + "Question: {question}\nAnswer:"
    continuations: tuple[tuple[int, ...], ...]  # " {choice}" for each choice

    @property
    def answer(self) -> tuple[int, ...]:
        return self.continuations[self.example.answer]


def check_example(example: QAExample) -> None:
    """ValueError naming the example when it is not a usable multiple-choice question."""
    if not isinstance(example, QAExample):
        raise ValueError(f"expected multiple-choice questions (QAExample), got a {type(example).__name__}")
    try:
        validate_example(example)
    except ValueError as exc:
        raise DataSourceError(f"malformed question {example.id!r} (source {example.source!r}): {exc}") from None


def encode_questions(tokenizer, examples: Sequence[QAExample]) -> list[EncodedQuestion]:
    """Token ids of each question as `pipeline.data.qa.format_question` renders it.

    Context and continuations are tokenized separately (no special tokens) and the start token
    is put before the context, as `tiny:qa-lm` is evaluated (`qa_lm.mc_scores`).
    """
    for example in examples:
        check_example(example)
    rendered = [format_question(e) for e in examples]
    prompts = encode_documents(tokenizer, [prompt for prompt, _ in rendered])
    choices = encode_documents(tokenizer, [c for _, conts in rendered for c in conts])
    start = start_token(tokenizer)
    out, cursor = [], 0
    for example, prompt in zip(examples, prompts):
        n = len(example.choices)
        out.append(EncodedQuestion(example, (start, *prompt), tuple(tuple(c) for c in choices[cursor:cursor + n])))
        cursor += n
    empty = [q.example.id for q in out if not all(q.continuations)]
    if empty:
        raise DataSourceError(f"question(s) {empty[:5]} have a choice that encodes to no tokens")
    return out


def training_sequence(question: EncodedQuestion, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of context + answer, cut to the last `max_length` tokens (as the
    scorers cut); labels are the answer's ids and IGNORE_INDEX on the context."""
    ids = [*question.context, *question.answer][-max_length:]
    n_answer = min(len(question.answer), len(ids) - 1)  # the first token is never predicted
    return ids, [IGNORE_INDEX] * (len(ids) - n_answer) + ids[len(ids) - n_answer:]


def collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a list of (ids, labels), so every answer ends at the last position.

    Returns input_ids, attention_mask, position_ids (0 at each sequence's first real token, as
    unpadded) and labels, each (B, T).
    """
    from torch.nn.utils.rnn import pad_sequence

    def pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
        return pad_sequence(rows, batch_first=True, padding_value=value, padding_side="left")

    ids = [torch.tensor(i, dtype=torch.long) for i, _ in batch]
    mask = pad([torch.ones_like(i) for i in ids], 0)  # (B, T)
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "labels": pad([torch.tensor(labels, dtype=torch.long) for _, labels in batch], IGNORE_INDEX),
    }


def forward_args(model) -> frozenset[str]:
    """The argument names of `model.forward` (does it take position_ids, logits_to_keep?)."""
    return frozenset(inspect.signature(model.forward).parameters)


def answer_loss(model, batch: dict[str, torch.Tensor], accepted: frozenset[str] = frozenset()) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a `collate`d batch (transformers' causal-LM loss).

    Answers end every row, so only the last K + 1 positions (K: the longest answer) need logits;
    a model whose forward takes `logits_to_keep` (named in `accepted`) computes no others, which
    spares the LM head most of its work (a third of the training time of tiny:qa-lm).
    `position_ids` go in where `accepted` names them.
    """
    K = answer_length(batch["labels"])
    return answer_cross_entropy(last_logits(model, batch, accepted, K + 1), batch["labels"], K)


def answer_length(labels: torch.Tensor) -> int:
    """K: the most answer tokens in a row of (B, T) labels."""
    return int((labels != IGNORE_INDEX).sum(-1).max())


def last_logits(model, batch: dict[str, torch.Tensor], accepted: frozenset[str], keep: int) -> torch.Tensor:
    """(B, ≥ keep, V) logits of at least the last `keep` positions of a left-padded batch."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in accepted:
        inputs["position_ids"] = batch["position_ids"]
    if "logits_to_keep" in accepted:
        inputs["logits_to_keep"] = keep
    return model(**inputs, use_cache=False).logits


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, K: int) -> torch.Tensor:
    """Mean cross-entropy of the last K labels (B, T) from the logits (B, ≥ K + 1, V) that predict them."""
    predicting = logits[:, -(K + 1):-1]  # (B, K, V): position t predicts token t + 1
    return torch.nn.functional.cross_entropy(at_least_float32(predicting.flatten(0, 1)), labels[:, -K:].flatten(),
                                             ignore_index=IGNORE_INDEX)


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 logits upcast for the loss; float32 and float64 as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def block_answer_losses(logits: torch.Tensor, labels: torch.Tensor, K: int, rows: Sequence[int]) -> list[torch.Tensor]:
    """Each block's mean answer cross-entropy from one joined batch: logits (N, ≥ K + 1, V) and labels
    (N, T) of consecutive blocks of `rows[j]` rows → one scalar per block.

    One cross-entropy over all N rows, then per-block sums of a (N,) vector: slicing the logits
    per block instead would make autograd zero-fill a full (N, K + 1, V) gradient for every block.
    A block whose loss is not finite (left out of the backward by `train_members`) cannot spoil the
    others: rows never mix in the model and only each block's own LoRA factors are trainable.
    """
    predicting = logits[:, -(K + 1):-1]  # (N, K, V)
    targets = labels[:, -K:]  # (N, K)
    token_loss = torch.nn.functional.cross_entropy(at_least_float32(predicting.flatten(0, 1)), targets.flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    row_loss, row_tokens = token_loss.sum(-1), (targets != IGNORE_INDEX).sum(-1)  # (N,), (N,)
    return [loss.sum() / tokens.sum() for loss, tokens in zip(row_loss.split(list(rows)), row_tokens.split(list(rows)))]


def join_batches(batches: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """One left-padded batch of the rows of several `collate`d batches, in order (each (B_k, T_k) → (ΣB, max T))."""
    length = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "attention_mask": 0, "position_ids": 0, "labels": IGNORE_INDEX}
    return {key: torch.cat([torch.nn.functional.pad(b[key], (length - b[key].shape[1], 0), value=value) for b in batches])
            for key, value in fill.items()}


# How much longer than the shortest a batch joined into a cohort forward may be. On a CPU compute
# grows with the padded tokens and per-forward overhead is small, so only batches of equal length
# are joined; on a GPU fewer, fuller forwards are worth some padding. Measured: docs/cohorts.md
# (bench/tuning/lm_join_slack.py).
JOIN_SLACK = {"cpu": 1.0, "cuda": 1.25}


def length_groups(lengths: Sequence[int], slack: float = 1.25) -> list[list[int]]:
    """Indices of batches grouped so that, within a group, the longest is at most `slack` × the shortest.

    A cohort step joins its members' batches into one left-padded batch; batches of very different
    lengths would pad the short ones to the longest, so each group gets its own forward instead.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] <= slack * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class QAStream:
    """One job's batches over epochs, in the order its `DataLoader` gives them alone.

    `draw()` -> (batch, whether it is the last batch of a pass over the data).
    """

    def __init__(self, loader: torch.utils.data.DataLoader, num_examples: int):
        self.loader, self.num_examples = loader, num_examples
        self.epoch: list[dict[str, torch.Tensor]] = []
        self.drawn = self.answer_tokens = 0

    def draw(self) -> tuple[dict[str, torch.Tensor], bool]:
        if not self.epoch:
            self.epoch = list(self.loader)[::-1]  # the sampler draws each pass's order when iterated
        batch = self.epoch.pop()
        self.drawn += 1
        self.answer_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
        return batch, not self.epoch


# ----------------------------------------------------------------------------- trainer


class CausalLMTrainer(LoraTrainer):
    """Trains one LoRA per job (or a cohort of them) on a causal LM loaded once."""

    versions_of = ("torch", "transformers", "peft", "accelerate")

    def setup(self, manifest: Manifest, store: Store) -> None:
        examples = self.load_examples(manifest)
        self.base = (manifest.base.ref, manifest.base.revision)
        if not isinstance(examples[0], QAExample):
            raise DataSourceError(f"data source {manifest.data.source!r} holds {type(examples[0]).__name__}s; "
                                  "a causal LM finetunes on multiple-choice questions (e.g. source: qa)")
        if isinstance(manifest.data.subsets, SourceSubsets):  # unknown source names fail here, before any job
            source_subset(examples, manifest.data.subsets.sources, 1, manifest.seed)
        self.examples = examples  # checked before the base loads (a hub model can take minutes)
        model, tokenizer = load_causal_lm(manifest.base.model_dump(), store, self.device)
        self.use_model(model, tokenizer, manifest.lora.target_modules)

    @property
    def trained_model(self) -> torch.nn.Module:
        return self.model

    @trained_model.setter
    def trained_model(self, model: torch.nn.Module) -> None:
        self.model = model

    def lora_init(self) -> dict[str, Any]:
        from peft import TaskType

        return {"task_type": TaskType.CAUSAL_LM}

    def precision(self, hp: dict[str, Any]) -> str:
        return mixed_precision(self.device, hp.get("mixed_precision"))

    def use_model(self, model, tokenizer, target_modules: Sequence[str]) -> None:
        """Train on an already loaded causal LM (frozen here, moved to the device)."""
        check_target_modules(model, list(target_modules), where=f"the causal LM ({type(model).__name__})")
        self.model = model.requires_grad_(False).to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 2**31)
        self.forward_args = forward_args(model)

    def sequences(self, examples: Sequence[QAExample], hp: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
        """(ids, labels) per example, as the job trains on them."""
        max_length = min(int(hp.get("max_length") or self.max_positions), self.max_positions)
        return [training_sequence(q, max_length) for q in encode_questions(self.tokenizer, examples)]

    def loader(self, examples: Sequence[QAExample], hp: dict[str, Any], seed: int) -> tuple[torch.utils.data.DataLoader, int, int]:
        """(the job's DataLoader, its optimizer steps, its gradient accumulation)."""
        from transformers.trainer_pt_utils import LengthGroupedSampler

        if not examples:
            raise DataSourceError("a LoRA needs at least one training question; the job's data subset is empty")
        data = self.sequences(examples, hp)
        batch_size, accumulation = int(hp.get("batch_size", DEFAULT_BATCH_SIZE)), int(hp.get("gradient_accumulation", 1))
        sampler = LengthGroupedSampler(batch_size, lengths=[len(ids) for ids, _ in data],
                                       generator=torch.Generator().manual_seed(seed))  # a fresh order each epoch
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler,
                                             collate_fn=lambda b: collate(b, pad_token(self.tokenizer)))
        per_epoch = math.ceil(len(loader) / accumulation)  # optimizer steps in one pass over the data
        total = int(hp["steps"]) if hp.get("steps") is not None else int(hp["epochs"]) * per_epoch
        return loader, total, accumulation

    def train(self, examples: Sequence[QAExample], config, hp: dict[str, Any], seed: int, out_dir: Path) -> dict[str, Any]:
        """Train one LoRA (`config`, a peft `LoraConfig`) on `examples`; save it to `out_dir/adapter`."""
        from accelerate import Accelerator
        from peft import get_peft_model
        from transformers import get_scheduler

        loader, total, accumulation = self.loader(examples, hp, seed)
        torch.manual_seed(seed)  # LoRA init and dropout
        peft_model = get_peft_model(self.model, config)
        try:
            accelerator = Accelerator(gradient_accumulation_steps=accumulation, mixed_precision=self.precision(hp),
                                      cpu=self.device.type == "cpu")
            optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                          lr=float(hp["learning_rate"]), weight_decay=float(hp.get("weight_decay", 0.0)))
            scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=total)
            model, optimizer, loader, scheduler = accelerator.prepare(peft_model, optimizer, loader, scheduler)
            model.train()
            losses, tokens, steps, started = [], 0, 0, time.perf_counter()
            while steps < total:  # epochs; accelerate steps the optimizer at each epoch's end too
                for batch in loader:
                    with accelerator.accumulate(model):
                        loss = answer_loss(model, batch, self.forward_args)  # mean over the batch's answer tokens
                        if not math.isfinite(loss.item()):
                            raise NonFiniteLoss(f"loss {loss.item()} at micro-step {len(losses)}")
                        accelerator.backward(loss)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad()
                    losses.append(loss.item())
                    tokens += int((batch["labels"] != IGNORE_INDEX).sum())
                    steps += accelerator.sync_gradients
                    if steps >= total:
                        break
            seconds = time.perf_counter() - started
            save_naming_base(accelerator.unwrap_model(model), out_dir / "adapter", self.base)
            accelerator.free_memory()
        finally:
            self.model = peft_model.unload().eval()  # the frozen base again, without LoRA layers
        return self._metrics(losses, steps, len(loader), len(examples), tokens, seconds)

    def new_member(self, task: CohortTask, slot: int) -> Member:
        hp = task.hyperparameters
        loader, total, accumulation = self.loader(task.examples, hp, task.seed)
        return Member(task.key, slot, task.config, QAStream(loader, len(task.examples)), accumulation, total,
                      float(hp["learning_rate"]), float(hp.get("weight_decay", 0.0)), task.out_dir, schedule="linear")

    def cohort_losses(self, active: Sequence[Member], routing) -> tuple[list[torch.Tensor], list[bool]]:
        """One batch of every active member, joined into left-padded batches of similar length
        (`length_groups`, one forward each); each member's loss is its own mean over its answer tokens.
        LoRA dropout draws its masks from the global generator in the cohort's order, so with
        dropout > 0 an adapter matches its solo training in distribution, not bit for bit."""
        draws = [m.data.draw() for m in active]
        batches = [{k: v.to(self.device) for k, v in batch.items()} for batch, _ in draws]
        losses: list[torch.Tensor | None] = [None] * len(active)
        slack = JOIN_SLACK.get(self.device.type, JOIN_SLACK["cuda"])
        pad_id = pad_token(self.tokenizer)
        for group in length_groups([b["input_ids"].shape[1] for b in batches], slack):  # one forward per group
            rows = [len(batches[i]["input_ids"]) for i in group]
            routing.set_blocks([active[i].slot for i in group], rows)
            joined = join_batches([batches[i] for i in group], pad_id)
            K = answer_length(joined["labels"])
            logits = last_logits(self.model, joined, self.forward_args, K + 1)
            for i, loss in zip(group, block_answer_losses(logits, joined["labels"], K, rows)):
                losses[i] = loss
        return losses, [ended for _, ended in draws]

    def member_metrics(self, member: Member, seconds: float) -> dict[str, Any]:
        data = member.data
        return self._metrics(member.losses, member.steps, len(data.loader), data.num_examples, data.answer_tokens, seconds)

    def _metrics(self, losses: list[float], steps: int, batches_per_epoch: int, num_examples: int, tokens: int,
                 seconds: float) -> dict[str, Any]:
        return {**self.common_metrics(losses, steps, seconds), "epochs": round(len(losses) / batches_per_epoch, 3),
                "num_examples": num_examples, "answer_tokens": tokens}


def mixed_precision(device: torch.device, requested: str | None) -> str:
    """accelerate's `mixed_precision` for a job: "no" on CPU; on a GPU the manifest's value, else
    bf16 where the GPU has it."""
    if device.type != "cuda":
        return "no"
    if requested is not None:
        return str(requested)
    return "bf16" if torch.cuda.is_bf16_supported() else "no"


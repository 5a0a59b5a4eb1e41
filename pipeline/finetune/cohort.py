"""The training loop shared by diffusion and causal-LM cohorts: K adapters, one frozen base, one pass.

Each `Member` is one job: its adapter slot in the `CohortLoraLinear` layers, its own AdamW
(its learning rate and weight decay), learning-rate schedule, gradient accumulation and number
of optimizer steps. A micro-step runs one forward over the rows of every active member (the
model kind's `forward_losses` builds the batch and returns one loss per member), one backward of
Σ loss_k / accumulation_k — adapter k's parameters touch only its own rows, so each gets exactly
the gradient it would get alone — then steps the optimizers of the members whose accumulation
window closes, with accelerate's rule (every `accumulation` micro-steps, and at the end of each
pass over the member's data). A member that has taken its steps leaves the batch; one whose
loss is not finite is dropped and reported failed while the others go on.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.cohort import CohortError
from pipeline.cohort.layers import CohortLoraLinear, LoraFactors
from pipeline.cohort.sizing import saved_tensor_bytes
from pipeline.finetune.runner import NonFiniteLoss


@dataclass(frozen=True)
class CohortTask:
    """What a trainer needs to train one job in a cohort."""

    key: str  # the job id
    config: Any  # peft LoraConfig
    examples: Sequence[Any]
    hyperparameters: dict[str, Any]
    seed: int
    out_dir: Path


def common_targets(tasks: Sequence[CohortTask]) -> list[str]:
    """The target modules every task shares; adapters on different modules cannot share a cohort."""
    targets = {tuple(sorted(t.config.target_modules)) for t in tasks}
    if len(targets) != 1:
        raise CohortError(f"a cohort's adapters must target the same modules; these ask for {sorted(targets)}; "
                         "train them in separate cohorts")
    return list(next(iter(targets)))


def cohort_autocast(precisions: set[str]) -> Callable[[], Any] | None:
    """The autocast of a cohort whose jobs resolved to `precisions` (accelerate's names): None for "no",
    bf16 on CUDA for "bf16"; fp16 would need one grad scaler per adapter, so cohorts refuse it."""
    if precisions - {"no", "bf16"} or len(precisions) > 1:
        raise CohortError(f"a cohort trains in one precision, no or bf16; its jobs ask for {sorted(precisions)} "
                         "(set execution.cohort_size: 1 for fp16 jobs)")
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if precisions == {"bf16"} else None


@dataclass
class Member:
    """One job of a cohort and its training state."""

    key: str  # the job id (or any name) the outcome is reported under
    slot: int
    config: Any  # the peft LoraConfig it is exported with
    data: Any  # the model kind's per-job data stream
    accumulation: int
    total_steps: int
    learning_rate: float
    weight_decay: float
    out_dir: Path
    schedule: str = "constant"  # or "linear": decay to 0 over total_steps, no warm-up (transformers' default)
    steps: int = 0  # optimizer steps taken
    losses: list[float] = field(default_factory=list)
    failure: Exception | None = None
    _window: int = 0  # micro-steps since the last optimizer step (accelerate's `Accelerator.step`)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None

    @property
    def active(self) -> bool:
        return self.failure is None and self.steps < self.total_steps

    def start(self, parameters: list[torch.nn.Parameter]) -> None:
        from transformers import get_scheduler

        self.optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)
        if self.schedule == "linear":
            self.scheduler = get_scheduler("linear", self.optimizer, num_warmup_steps=0, num_training_steps=self.total_steps)

    def closes_window(self, end_of_data: bool) -> bool:
        """accelerate's gradient-accumulation rule for the micro-step just taken."""
        if end_of_data:
            self._window = 0
            return True
        self._window += 1
        return self._window % self.accumulation == 0

    def optimizer_step(self) -> None:
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad()
        self.steps += 1


ForwardLosses = Callable[[Sequence[Member]], tuple[list[torch.Tensor], list[bool]]]


def train_members(model: torch.nn.Module, members: Sequence[Member], layers: dict[str, CohortLoraLinear],
                  forward_losses: ForwardLosses, autocast: Callable[[], Any] | None = None) -> tuple[float, float]:
    """Train every member to its step count (or failure): (wall seconds, activation bytes per member).

    `forward_losses(active)` -> (one scalar loss per active member, whether that micro-step ended
    a pass over the member's data). Factors stay in `layers` under each member's slot. The
    activation bytes are what autograd saved for backward in the first micro-step, per member
    (what `pipeline.cohort.sizing` sizes the next cohort by).
    """
    for member in members:
        try:
            member.start([p for layer in layers.values() for p in layer.slot_parameters(member.slot)])
        except ValueError as exc:  # e.g. an invalid learning rate: this member fails, the others train
            member.failure = exc
    for layer in layers.values():
        layer.train()
    started = time.perf_counter()
    active = [m for m in members if m.active]
    bytes_per_member = 0.0
    while active:
        measuring = not bytes_per_member
        with autocast() if autocast else contextlib.nullcontext(), \
                (saved_tensor_bytes(model) if measuring else contextlib.nullcontext()) as saved:
            losses, end_of_data = forward_losses(active)
        if measuring:
            bytes_per_member = saved.total / len(active)
        total = None
        for member, loss in zip(active, losses):
            value = loss.item()
            if not math.isfinite(value):
                member.failure = NonFiniteLoss(f"loss {value} at micro-step {len(member.losses)}")
                continue
            member.losses.append(value)
            term = loss / member.accumulation
            total = term if total is None else total + term
        if total is not None:
            total.backward()
        for member, ended in zip(active, end_of_data):
            if member.failure is None and member.closes_window(ended):
                member.optimizer_step()
        active = [m for m in active if m.active]
    return time.perf_counter() - started, bytes_per_member


def member_factors(member: Member, layers: dict[str, CohortLoraLinear]) -> dict[str, LoraFactors]:
    return {name: layer.factors(member.slot) for name, layer in layers.items()}


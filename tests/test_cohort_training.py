"""Cohort training equals training alone: same seeds and data, float64 on CPU, max relative difference ≤ 1e-5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.finetune.cohort import CohortTask

TOLERANCE = 1e-5


def max_relative_difference(a_dir: Path, b_dir: Path) -> float:
    """max over tensors of ‖a − b‖∞ / ‖b‖∞ between two saved peft adapters (same keys required)."""
    a, b = load_file(str(a_dir / "adapter_model.safetensors")), load_file(str(b_dir / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)) for k in a)


def same_config(a_dir: Path, b_dir: Path) -> None:
    a, b = (json.loads((d / "adapter_config.json").read_text()) for d in (a_dir, b_dir))
    assert a == b


@pytest.fixture(scope="module")
def diffusion_trainer(random_sd, tmp_path_factory):
    from pipeline.bases.loading import load_diffusion_pipeline
    from pipeline.finetune.diffusion import DiffusionTrainer
    from storage import Store

    pipe = load_diffusion_pipeline({"ref": str(random_sd), "kind": "diffusion", "revision": None},
                                   Store(str(tmp_path_factory.mktemp("store"))), dtype=torch.float64)
    trainer = DiffusionTrainer("cpu")
    trainer.use_pipeline(pipe, ["to_q", "to_v"])
    return trainer


def diffusion_tasks(tmp_path: Path, prefix: str) -> list[CohortTask]:
    """Four jobs that differ in seed, data, lr, weight decay, steps, accumulation and rank."""
    from peft import LoraConfig

    from pipeline.data import get_source

    images = get_source("shapes").examples("train")[:24]
    grid = [  # (rank, lr, weight decay, steps, accumulation)
        (4, 1e-3, 1e-2, 3, 1), (2, 3e-3, 0.0, 2, 2), (8, 1e-4, 1e-1, 4, 1), (4, 2e-3, 1e-2, 1, 3)]
    tasks = []
    for k, (rank, lr, wd, steps, accumulation) in enumerate(grid):
        config = LoraConfig(r=rank, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")
        hp = {"learning_rate": lr, "weight_decay": wd, "steps": steps, "gradient_accumulation": accumulation,
              "batch_size": 2, "instance_prompt": ["a shape", "skd"][k % 2]}
        tasks.append(CohortTask(f"job{k}", config, images[k * 6:(k + 1) * 6], hp, 100 + k, tmp_path / f"{prefix}{k}"))
    return tasks


def test_diffusion_cohort_equals_each_adapter_trained_alone(diffusion_trainer, tmp_path):
    tasks = diffusion_tasks(tmp_path, "alone")
    for task in tasks:
        diffusion_trainer.train(task.examples, task.config, task.hyperparameters, task.seed, task.out_dir)
    cohort = diffusion_tasks(tmp_path, "cohort")
    outcomes = diffusion_trainer.train_cohort(cohort)
    differences = []
    for alone, together in zip(tasks, cohort):
        metrics = outcomes[together.key]
        assert isinstance(metrics, dict), metrics
        assert metrics["optimizer_steps"] == together.hyperparameters["steps"]
        assert metrics["micro_steps"] == together.hyperparameters["steps"] * together.hyperparameters["gradient_accumulation"]
        same_config(alone.out_dir / "adapter", together.out_dir / "adapter")
        differences.append(max_relative_difference(together.out_dir / "adapter", alone.out_dir / "adapter"))
    print("max relative differences", differences)
    assert max(differences) <= TOLERANCE, differences
    # and training changed every adapter (B starts at zero)
    for task in cohort:
        weights = load_file(str(task.out_dir / "adapter" / "adapter_model.safetensors"))
        assert all(weights[k].abs().max() > 0 for k in weights if "lora_B" in k)


@pytest.fixture(scope="module")
def lm_trainer(tmp_path_factory):
    from pipeline.bases.cache import ensure_base
    from pipeline.finetune.causal_lm import CausalLMTrainer, load_causal_lm
    from storage import Store

    store = Store(str(tmp_path_factory.mktemp("lm-store")))
    ensure_base("qa-lm", store, size="smoke")
    model, tokenizer = load_causal_lm({"ref": "tiny:qa-lm", "size": "smoke"}, store, dtype=torch.float64)
    trainer = CausalLMTrainer("cpu")
    trainer.use_model(model, tokenizer, ["q_proj", "v_proj"])
    return trainer


def lm_tasks(tmp_path: Path, prefix: str, batch_sizes=(4, 4, 4, 4)) -> list[CohortTask]:
    """Four jobs that differ in seed, data, lr, weight decay, epochs / steps, accumulation and rank."""
    from peft import LoraConfig, TaskType

    from pipeline.data import get_source

    questions = get_source("qa").examples("train")[:64]
    grid = [  # (rank, lr, weight decay, budget, accumulation)
        (4, 3e-3, 0.0, {"epochs": 2}, 1), (2, 1e-2, 1e-2, {"steps": 5}, 2),
        (8, 1e-3, 1e-3, {"epochs": 1}, 3), (4, 5e-3, 0.0, {"steps": 2}, 1)]
    tasks = []
    for k, (rank, lr, wd, budget, accumulation) in enumerate(grid):
        config = LoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type=TaskType.CAUSAL_LM)
        hp = {"learning_rate": lr, "weight_decay": wd, "gradient_accumulation": accumulation,
              "batch_size": batch_sizes[k], **budget}
        tasks.append(CohortTask(f"job{k}", config, questions[k * 13:k * 13 + 10 + 3 * k], hp, 7 + k, tmp_path / f"{prefix}{k}"))
    return tasks


@pytest.mark.parametrize("batch_sizes,slack", [((4, 4, 4, 4), None), ((3, 4, 2, 5), None), ((3, 4, 2, 5), 3.0)],
                         ids=["equal-batches", "unequal-batches", "joined-left-padded"])
def test_causal_lm_cohort_equals_each_adapter_trained_alone(lm_trainer, tmp_path, monkeypatch, batch_sizes, slack):
    """slack None: the CPU default (batches of equal length joined); 3.0: members' batches of
    different lengths joined into one left-padded forward, as on a GPU."""
    import pipeline.finetune.causal_lm as causal_lm

    if slack is not None:
        monkeypatch.setitem(causal_lm.JOIN_SLACK, "cpu", slack)
        joins = []
        real = causal_lm.join_batches
        monkeypatch.setattr(causal_lm, "join_batches", lambda batches, pad: joins.append(len(batches)) or real(batches, pad))
    tasks = lm_tasks(tmp_path, "alone", batch_sizes)
    alone_metrics = [lm_trainer.train(t.examples, t.config, t.hyperparameters, t.seed, t.out_dir) for t in tasks]
    cohort = lm_tasks(tmp_path, "cohort", batch_sizes)
    outcomes = lm_trainer.train_cohort(cohort)
    differences = []
    for alone, metrics_alone, together in zip(tasks, alone_metrics, cohort):
        metrics = outcomes[together.key]
        assert isinstance(metrics, dict), metrics
        for key in ("optimizer_steps", "micro_steps", "epochs", "answer_tokens"):
            assert metrics[key] == metrics_alone[key], key
        assert metrics["final_loss"] == pytest.approx(metrics_alone["final_loss"], rel=1e-9)
        same_config(alone.out_dir / "adapter", together.out_dir / "adapter")
        differences.append(max_relative_difference(together.out_dir / "adapter", alone.out_dir / "adapter"))
    print("max relative differences", differences)
    assert max(differences) <= TOLERANCE, differences
    if slack is not None:
        assert max(joins) == 4  # every member's batch in one forward


def test_block_losses_of_a_joined_batch_equal_each_batch_alone():
    from pipeline.finetune.causal_lm import (
        IGNORE_INDEX,
        answer_cross_entropy,
        block_answer_losses,
        join_batches,
    )

    gen = torch.Generator().manual_seed(0)
    batches = []
    for rows, length, answer in [(2, 5, 2), (3, 7, 1), (1, 4, 3)]:
        ids = torch.randint(2, 50, (rows, length), generator=gen)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, -answer:] = ids[:, -answer:]
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(length).expand(rows, -1),
                        "labels": labels})
    joined = join_batches(batches, pad_id=0)
    logits = torch.randn(6, 7, 50, generator=gen, dtype=torch.float64)  # (N, T, V) for the joined rows
    K = 3
    got = block_answer_losses(logits, joined["labels"], K, [2, 3, 1])
    row = 0
    for batch, loss in zip(batches, got):
        rows, length = batch["labels"].shape
        own_k = int((batch["labels"] != IGNORE_INDEX).sum(-1).max())
        expected = answer_cross_entropy(logits[row:row + rows, -length:], batch["labels"], own_k)
        torch.testing.assert_close(loss, expected)
        row += rows


def test_a_diverging_adapter_is_dropped_and_the_others_match_training_alone(diffusion_trainer, tmp_path):
    from pipeline.finetune.runner import NonFiniteLoss

    tasks = diffusion_tasks(tmp_path, "alone")[:2]
    diffusion_trainer.train(tasks[0].examples, tasks[0].config, tasks[0].hyperparameters, tasks[0].seed, tasks[0].out_dir)
    cohort = diffusion_tasks(tmp_path, "cohort")[:3]
    cohort[1] = CohortTask(cohort[1].key, cohort[1].config, cohort[1].examples,
                           {**cohort[1].hyperparameters, "learning_rate": float("inf")}, cohort[1].seed, cohort[1].out_dir)
    outcomes = diffusion_trainer.train_cohort(cohort)
    assert isinstance(outcomes["job1"], NonFiniteLoss)
    assert not (cohort[1].out_dir / "adapter").exists()
    assert isinstance(outcomes["job0"], dict) and isinstance(outcomes["job2"], dict)
    assert max_relative_difference(cohort[0].out_dir / "adapter", tasks[0].out_dir / "adapter") <= TOLERANCE


def test_adapters_on_different_modules_are_refused_before_training(diffusion_trainer, tmp_path):
    from peft import LoraConfig

    tasks = diffusion_tasks(tmp_path, "mixed")[:2]
    other = LoraConfig(r=4, lora_alpha=4, target_modules=["to_k"], init_lora_weights="gaussian")
    tasks[1] = CohortTask(tasks[1].key, other, tasks[1].examples, tasks[1].hyperparameters, tasks[1].seed, tasks[1].out_dir)
    with pytest.raises(ValueError, match="must target the same modules"):
        diffusion_trainer.train_cohort(tasks)
    assert not any(t.out_dir.exists() for t in tasks)

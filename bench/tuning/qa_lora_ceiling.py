"""How far one LoRA on all six skills moves tiny:qa-lm, per examples per skill (issue #22).

tiny-arc's `acc` label can only rise as far as one LoRA's finetuning moves the base. This trains one
LoRA per setting on the first PER training questions of every skill, with the trainer's own encoding
and loss (`encode_questions`, `training_sequence`, `collate`, `answer_loss`: the answer tokens only)
and its schedule (AdamW, linear decay to 0, no warm-up), and scores it as `lol bases evaluate-lm`
scores the base (`qa_lm.skills_quality`: the 563 test questions, per skill, Wilson CIs).

Prints and appends one JSON line per setting to OUT (default bench/results/qa-lora-ceiling.jsonl).

Usage: python bench/tuning/qa_lora_ceiling.py [PER,…] [TARGETS] [OUT.jsonl]
  PER: examples per skill (default 40,150,250); TARGETS: comma-separated modules (default q_proj,v_proj).
  Fixed: rank 4, alpha 8, lr 4e-3, 3 epochs, batch 16, seed 0 — a useful setting inside tiny-arc's ranges.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from pipeline.bases.cache import SHIPPED_DIR
from pipeline.data import skills
from pipeline.finetune.causal_lm import (
    answer_loss,
    collate,
    encode_questions,
    forward_args,
    training_sequence,
)
from tinyworld import qa_lm

ROOT = Path(__file__).resolve().parents[2]
LR, EPOCHS, BATCH, RANK, SEED = 4e-3, 3, 16, 4, 0


def shipped_base() -> Path:
    found = sorted(SHIPPED_DIR.glob("qa-lm-full-*"))
    if not found:
        raise SystemExit(f"no shipped tiny:qa-lm build under {SHIPPED_DIR}")
    return found[-1]


def one_lora(per: int, targets: list[str]) -> dict:
    torch.manual_seed(SEED)
    model, tokenizer = qa_lm.load(shipped_base())
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets))
    examples = [e for name in skills.SETS for e in skills.SkillsSource([name]).examples("train")[:per]]
    rows = [training_sequence(q, 256) for q in encode_questions(tokenizer, examples)]
    steps = EPOCHS * -(-len(rows) // BATCH)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    accepted, rng, started = forward_args(model.get_base_model()), random.Random(SEED), time.perf_counter()
    model.train()
    for _ in range(EPOCHS):
        rng.shuffle(rows)
        for i in range(0, len(rows), BATCH):
            answer_loss(model, collate(rows[i:i + BATCH], tokenizer.pad_token_id), accepted).backward()
            optimizer.step(), schedule.step(), optimizer.zero_grad()
    seconds = time.perf_counter() - started
    quality = qa_lm.skills_quality(model.eval(), tokenizer)
    return {"examples_per_skill": per, "examples": len(rows), "target_modules": targets, "rank": RANK, "lr": LR,
            "epochs": EPOCHS, "batch_size": BATCH, "steps": steps, "train_seconds": round(seconds, 1),
            "acc": quality["acc"], "per_skill": {k: round(v["value"], 3) for k, v in quality["per_skill"].items()}}


def main(argv: list[str]) -> None:
    pers = [int(p) for p in (argv[0] if argv else "40,150,250").split(",")]
    targets = (argv[1] if len(argv) > 1 else "q_proj,v_proj").split(",")
    out = Path(argv[2]) if len(argv) > 2 else ROOT / "bench" / "results" / "qa-lora-ceiling.jsonl"
    torch.set_num_threads(1)
    for per in pers:
        line = json.dumps(one_lora(per, targets))
        print(line, flush=True)
        with out.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Validation-only probe: which part of the authors' GL head lifts the attribute ROC-AUC on tiny-shapes?

GL-net's protocol run on the 1,000-LoRA tiny-shapes chose a config at validation ROC-AUC 0.815, the
authors' configuration (glnet_paper) 0.839 (bench/results/learn-tiny-shapes-results.json). This trains
GL-net variants between the two — one equivariant layer, the authors' LayerNorm head, per-layer input
normalisation, the quadratic readout, the spectral moments — with the protocol's training settings and
epoch rule, on the train split, scored on the validation split only (no test row is read).

    python bench/selection/glnet_attributes_heads.py PUBLISHED OUT.jsonl [SEEDS]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

import torch

from lol_models.protocol import SELECTION_SEED, train_config
from lol_models.search import Candidate
from lol_models.tasks import LearnSettings, labeled_for, load_splits, tasks_of
from lol_models.train import fit

PAPER_LIKE = {"hidden": (32,), "head": (128,), "head_norm": True, "normalize_input": True, "spectral_moments": 0,
              "quadratic_readout": False}
VARIANTS = {
    "paper-like": PAPER_LIKE,
    "+quadratic": {**PAPER_LIKE, "quadratic_readout": True},
    "+moments": {**PAPER_LIKE, "spectral_moments": 2},
    "no head_norm": {**PAPER_LIKE, "head_norm": False},
    "no normalize_input": {**PAPER_LIKE, "normalize_input": False},
    "two layers": {**PAPER_LIKE, "hidden": (32, 32)},
}


def main(published: str, out: str, seeds: int = 2) -> None:
    torch.set_num_threads(1)
    settings = LearnSettings()
    splits = load_splits(published, "protocol")
    task = next(t for t in tasks_of(splits["train"]) if t.name == "attributes")
    train, validation = labeled_for(splits["train"], task), labeled_for(splits["validation"], task)
    config = train_config(settings, task.kind, Candidate(train={"lr": 1e-3, "weight_decay": 1e-2}))
    with open(out, "a") as sink:
        for name, model in VARIANTS.items():
            started, scores, epochs = time.perf_counter(), [], []
            for k in range(seeds):
                run = fit("glnet", train, validation, model_config=model, config=replace(config, seed=SELECTION_SEED + k))
                scores.append(run.val["roc_auc"])
                epochs.append(run.best_epoch)
            row = {"variant": name, "model": {k: list(v) if isinstance(v, tuple) else v for k, v in model.items()},
                   "train": {"lr": config.lr, "weight_decay": config.weight_decay}, "val_roc_auc": scores,
                   "mean": sum(scores) / len(scores), "best_epoch": epochs, "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(row), flush=True)
            sink.write(json.dumps(row) + "\n")
            sink.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))

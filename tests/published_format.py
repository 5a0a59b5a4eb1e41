"""Small populations written in the published format (what `lol publish` writes), for lol_models tests.

The rows go through the published format's own `make_layout` and `flatten` (`lol_models.published`) and
the writer's `in_memory_dataset`, so the folder is what `lol_models.data.pull` meets in a real run.

Shape legend: N LoRAs, n/m rows of U/V (out/in features), r rank.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from lol_models.published import flatten, make_layout
from lol_models.symmetry import gl_act, random_gl_like
from lol_models.weights import LoraWeights
from pipeline.publish import in_memory_dataset

SHAPES: dict[str, tuple[int, int]] = {"block.0.to_q": (6, 8), "block.0.to_v": (6, 8), "block.1.to_q": (7, 5)}  # name: (n, m)
NORM = {"clip_score.clip_score": {"scorer": "clip_score", "scorer_id": "clip_score-x", "label": "clip_score"}}
BIG = {"attributes.big": {"scorer": "attributes", "scorer_id": "attributes-x", "label": "big"}}


def write_published(folder: Path, factors: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]],
                    rows: Sequence[dict], label_info: dict[str, dict[str, str]]) -> Path:
    """Write a published folder: `factors[k]` = {module: (lora_A (r, in), lora_B (out, r))} of row k.

    rows[k] holds job_id, group, rank, alpha, split and the label columns named in `label_info`.
    """
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    max_rank = max(a.shape[0] for f in factors for a, _ in f.values())
    layout = make_layout(factors[0], max_rank)
    weights = np.stack([flatten(f, layout) for f in factors])
    splits = {}
    for name in ("train", "validation", "test"):
        index = [i for i, r in enumerate(rows) if r["split"] == name]
        if index:
            splits[name] = in_memory_dataset([rows[i] for i in index], weights[index])
    datasets.DatasetDict(splits).save_to_disk(str(folder / "arrow"))
    (folder / "layout.json").write_text(json.dumps(layout))
    (folder / "labels.json").write_text(json.dumps(label_info))
    return folder


def gl_population(ranks: Sequence[int], n_per_rank: int, seed: int, shapes: Mapping[str, tuple[int, int]] = SHAPES,
                  split_every: int = 5) -> tuple[list[dict], list[dict]]:
    """(factors, rows): `n_per_rank` LoRAs per rank with a GL-invariant, rank-agnostic label.

    U ~ N(0, 1/r)·s (s log-uniform in [1/3, 3] per LoRA), V ~ N(0, 1), so E‖U Vᵀ‖² does not depend
    on r; then each layer gets a random g ∈ GL(r) (raw factors carry the label only through
    U Vᵀ). Label clip_score = ‖ΔW‖_F of the first module; attributes.big = label above 7.
    Every `split_every`-th LoRA (offset by rank) goes to validation, the next to test; group = row.
    """
    gen = torch.Generator().manual_seed(seed)
    factors, rows = [], []
    for rank in ranks:
        scale = torch.exp((torch.rand(n_per_rank, 1, 1, generator=gen, dtype=torch.float64) * 2 - 1) * np.log(3.0))
        us = [torch.randn(n_per_rank, n, rank, generator=gen, dtype=torch.float64) * scale / rank**0.5
              for n, _ in shapes.values()]
        vs = [torch.randn(n_per_rank, m, rank, generator=gen, dtype=torch.float64) for _, m in shapes.values()]
        w = LoraWeights.from_layers(list(shapes), us, vs)
        first = next(iter(shapes))
        u, v = w.layer(first)
        norm = (u @ v.transpose(-1, -2)).flatten(1).norm(dim=1)  # (N,)
        w = gl_act(w, random_gl_like(w, max_cond=10.0, scale_range=2.0, generator=gen))
        for k in range(n_per_rank):
            # alpha = rank, so lora_B = U and lora_A = Vᵀ
            factors.append({name: (w.layer(name)[1][k].T.float().numpy(), w.layer(name)[0][k].float().numpy())
                            for name in shapes})
            slot = (k + rank) % split_every
            split = "validation" if slot == 0 else "test" if slot == 1 else "train"
            rows.append({"job_id": f"r{rank}-{k:03d}", "group": f"group:r{rank}-{k}", "rank": rank, "alpha": float(rank),
                         "clip_score.clip_score": float(norm[k]), "attributes.big": int(norm[k] > 7.0), "split": split})
    return factors, rows

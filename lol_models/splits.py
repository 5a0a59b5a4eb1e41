"""The protocol's splits: a finetuning group's split is a function of the group's name alone.

`group_split(group)` hashes the group key (sha256 of a fixed salt and the key) to a number u in
[0, 1) and cuts at fixed fractions: train 0.70, validation 0.15, test 0.15. No seed, no per-population
fraction: every population that shares group names (tiny-shapes, tiny-shapes-ranks,
tiny-shapes-continued: the same `group:17` is the same data group) puts each group in the same split,
so a group used to choose settings in one population is never a test group of a derived one.

`protocol_splits` re-splits a published population this way: the rows of all its published splits
are pooled and each goes to `group_split(row's group)`. The learn stage and the experiments train on
these splits whatever fractions and seed the population was published with.

Shape legend: N LoRAs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lol_models.data import LoraDataset, PulledDataError
from lol_models.split_rule import PROTOCOL_FRACTIONS, SPLIT_SALT, SPLITS, group_split
from lol_models.weights import collate

__all__ = ["PROTOCOL_FRACTIONS", "SPLIT_SALT", "group_split", "protocol_splits", "subset"]


def subset(dataset: LoraDataset, rows: torch.Tensor) -> LoraDataset:
    """The rows `rows` (index Tensor (n,)) of a split, labels and metadata alike."""
    keep = rows.tolist()
    return LoraDataset(
        weights=dataset.weights.index(rows), labels={k: v[rows] for k, v in dataset.labels.items()},
        job_ids=[dataset.job_ids[i] for i in keep], groups=[dataset.groups[i] for i in keep],
        ranks=dataset.ranks[rows], label_info=dataset.label_info,
    )


def _concat(parts: list[LoraDataset]) -> LoraDataset:
    if len(parts) == 1:
        return parts[0]
    return LoraDataset(
        weights=collate([p.weights for p in parts]),
        labels={k: torch.cat([p.labels[k] for p in parts]) for k in parts[0].labels},
        job_ids=[j for p in parts for j in p.job_ids], groups=[g for p in parts for g in p.groups],
        ranks=torch.cat([p.ranks for p in parts]), label_info=parts[0].label_info,
    )


def protocol_splits(published: Mapping[str, LoraDataset], needed: Sequence[str] = SPLITS) -> dict[str, LoraDataset]:
    """Pool the published splits and re-split by `group_split`: {"train", "validation", "test"}, or
    only the `needed` ones (a population built for testing alone holds no training groups).

    A published split whose rows all belong to one protocol split is used as it is (no copy).
    Raises PulledDataError when a needed protocol split ends up empty (too few groups).
    """
    parts: dict[str, list[LoraDataset]] = {name: [] for name in SPLITS}
    for dataset in published.values():
        target = [group_split(g) for g in dataset.groups]
        for name in SPLITS:
            rows = torch.tensor([i for i, t in enumerate(target) if t == name], dtype=torch.long)
            if len(rows) == len(dataset):
                parts[name].append(dataset)
            elif len(rows):
                parts[name].append(subset(dataset, rows))
    empty = [name for name in needed if not parts[name]]
    if empty:
        groups = len({g for d in published.values() for g in d.groups})
        raise PulledDataError(f"the protocol's group split leaves {empty} empty: {groups} group(s) are too few "
                              f"for fractions {PROTOCOL_FRACTIONS}; publish more groups")
    return {name: _concat(parts[name]) for name in SPLITS if name in needed}

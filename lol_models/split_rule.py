"""The protocol's split rule, without torch: a finetuning group's split is a function of its name.

`group_unit(group)` is u ∈ [0, 1), the first 8 bytes of sha256(SPLIT_SALT NUL group) as a fraction
of 2⁶⁴; `split_at(u, fractions)` cuts it at the fractions in the order train, validation, test.
`group_split` cuts at the protocol's fixed fractions (train 0.70, validation 0.15, test 0.15).

`pipeline.publish` draws the published split with the same `group_unit`, so a population published
with the protocol's fractions carries exactly the splits `lol train` uses (`lol_models.splits`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

__all__ = ["PROTOCOL_FRACTIONS", "SPLITS", "SPLIT_SALT", "group_split", "group_unit", "split_at"]

SPLITS = ("train", "validation", "test")
PROTOCOL_FRACTIONS = {"train": 0.70, "validation": 0.15, "test": 0.15}
SPLIT_SALT = "lol-protocol-split-v1"  # changing it moves every group: a new protocol version


def group_unit(group: str) -> float:
    """u ∈ [0, 1): the first 8 bytes of sha256(SPLIT_SALT NUL group), as a fraction of 2⁶⁴."""
    digest = hashlib.sha256(f"{SPLIT_SALT}\0{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_at(u: float, fractions: Mapping[str, float]) -> str:
    """The split whose interval holds u when [0, 1) is cut at `fractions` in the order of SPLITS;
    u within rounding of 1 goes to train (or the first split with a share, if train has none)."""
    edge = 0.0
    for name in SPLITS:
        edge += fractions.get(name, 0.0)
        if u < edge:
            return name
    return "train" if fractions.get("train") else next(n for n in SPLITS if fractions.get(n))


def group_split(group: str) -> str:
    """"train", "validation" or "test" for a group key (e.g. `group:17`, `sources:compare|lookup`)."""
    return split_at(group_unit(group), PROTOCOL_FRACTIONS)

"""Scorers: label every LoRA of a population (DESIGN §5).

Each scorer is chosen by the manifest's `scorers[].name`, set up once per population
(bases, prompt embeddings, data), then asked for the labels of one job at a time. A score
is stored under `scores/{scorer_id}.json`, where `scorer_id` hashes the scorer's settings:
new settings score into a new file and old scores stay.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pipeline.jobs import Job
from pipeline.manifest import Manifest
from storage import DomainError, Store

SCORER_RECIPE_VERSION = 1  # bump when a scorer's computation changes for the same settings


class ScorerError(DomainError):
    """A scorer that cannot run as the manifest or the command asks: an unknown CLIP model or
    checkpoint, a prompt preset, an attribute test, data subsets it cannot read, a scorer name."""


class Scorer(Protocol):
    """Set up once per population, then label one LoRA at a time."""

    def setup(self, manifest: Manifest, store: Store) -> None: ...

    def score(self, job: Job, adapter_dir: Path) -> dict[str, float | int]:
        """Labels of one LoRA: {label name: value}."""
        ...


@runtime_checkable
class CohortScorer(Scorer, Protocol):
    """A scorer that can also label several LoRAs in the same forwards; `score_jobs` forms
    cohorts only for these."""

    def score_cohort(self, jobs: list[Job], adapter_dirs: list[Path]) -> list[dict[str, float | int]]:
        """The labels of each adapter, in order."""
        ...


# Settings added after scorer ids were first stored: left out of the id while unset, so the ids of
# scorers that do not use them stay what earlier releases wrote.
UNSET_SETTINGS_LEFT_OUT = ("resolution",)


def scorer_settings(spec: Any) -> dict[str, Any]:
    settings = spec.model_dump(mode="json")
    return {k: v for k, v in settings.items() if not (k in UNSET_SETTINGS_LEFT_OUT and v is None)}


def scorer_id(spec: Any) -> str:
    """`{name}-{hash of settings}`: a stable name for one scorer configuration."""
    text = json.dumps({"settings": scorer_settings(spec), "version": SCORER_RECIPE_VERSION}, sort_keys=True, separators=(",", ":"))
    return f"{spec.name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def make_scorer(spec: Any) -> Scorer:
    """The scorer implementation for a manifest scorer entry."""
    if spec.name in ("attributes", "membership", "sources"):
        from pipeline.score.data_labels import AttributesScorer, MembershipScorer, SourcesScorer

        return {"attributes": AttributesScorer, "membership": MembershipScorer, "sources": SourcesScorer}[spec.name](spec)
    if spec.name == "clip_score":
        from pipeline.score.clip_score import ClipScoreScorer

        return ClipScoreScorer(spec)
    if spec.name in ("mc_accuracy", "eval_loss"):
        from pipeline.score.lm_scorers import EvalLossScorer, McAccuracyScorer

        return {"mc_accuracy": McAccuracyScorer, "eval_loss": EvalLossScorer}[spec.name](spec)
    raise ValueError(f"unknown scorer {spec.name!r}; scorers: attributes, membership, sources, clip_score, mc_accuracy, eval_loss")

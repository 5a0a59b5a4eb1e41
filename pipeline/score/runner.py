"""Score every completed LoRA of a population with every scorer of its manifest (resumable)."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import runtime
from pipeline.cohort.sizing import CohortSizer, is_out_of_memory
from pipeline.finetune.staging import scratch_dir, sweep
from pipeline.jobs import Job, expand, shard
from pipeline.manifest import Manifest
from pipeline.score import (
    CohortScorer,
    Scorer,
    ScorerError,
    make_scorer,
    scorer_id,
    scorer_settings,
)
from storage import PopulationStore, Store, StoreError

log = logging.getLogger(__name__)


@dataclass
class ScoreSummary:
    scored: dict[str, int] = field(default_factory=dict)  # scorer_id -> LoRAs scored now
    skipped: dict[str, int] = field(default_factory=dict)  # already scored
    unfinished: int = 0  # planned jobs without a completed LoRA (nothing to score)
    failed: dict[tuple[str, str], str] = field(default_factory=dict)  # (job_id, scorer_id) -> reason
    notes: list[str] = field(default_factory=list)  # e.g. cohorts reduced to fit memory
    labels: dict[str, list[float]] = field(default_factory=dict)  # label -> values over all scored LoRAs
    seconds: float = 0.0

    def label_stats(self) -> dict[str, tuple[float, float, int]]:
        """label -> (mean, std, count)."""
        return {k: (statistics.fmean(v), statistics.pstdev(v), len(v)) for k, v in sorted(self.labels.items()) if v}


def _versions() -> dict[str, str]:
    return runtime.versions("torch", "diffusers", "transformers", "open_clip_torch", "peft")


def score_population(
    manifest: Manifest,
    store: Store,
    only: list[str] | None = None,
    limit: int | None = None,
    shard_spec: str | None = None,
    on_job: Callable[[Job, str, str], None] | None = None,
    cohort_size: int | None = None,
    scorer_factory: Callable[[Any], Scorer] = make_scorer,
) -> ScoreSummary:
    """Label every completed LoRA that lacks a score from each scorer (or the scorers named in `only`),
    K LoRAs per pass for scorers that score cohorts (the manifest's `execution`, or `cohort_size`).

    A LoRA whose scoring fails (the scorer raises, or the store refuses the score) is listed in
    `summary.failed` with the reason, and the others go on; a rerun scores what is missing.
    `scorer_factory(spec)` builds each scorer (`make_scorer`; tests inject faulty ones)."""
    started = time.perf_counter()
    for folder in sweep():
        log.info("removed %s, left by a process that died", folder)
    sizer = CohortSizer(cohort_size or manifest.execution.requested_cohort_size, manifest.execution.memory_fraction)
    population = store.population(manifest.population.name)
    jobs = shard(list(expand(manifest, limit=limit)), shard_spec)
    done = [job for job in jobs if population.is_done(job.job_id)]  # verified: never score a damaged or foreign adapter
    summary = ScoreSummary(unfinished=len(jobs) - len(done))
    specs = [s for s in manifest.scorers if only is None or s.name in only]
    unknown = sorted(set(only or []) - {s.name for s in manifest.scorers})
    if unknown:
        raise ScorerError(f"scorer(s) {unknown} are not in the manifest; its scorers: {', '.join(s.name for s in manifest.scorers) or 'none'}")
    for spec in specs:
        sid = scorer_id(spec)
        todo = [job for job in done if not population.has_score(job.job_id, sid)]
        summary.skipped[sid] = len(done) - len(todo)
        summary.scored[sid] = 0
        for job in done:
            if job not in todo:
                _collect(summary, population.read_score(job.job_id, sid))
        if not todo:
            continue
        scorer = scorer_factory(spec)
        scorer.setup(manifest, store)
        for job, outcome, payload in score_jobs(population, todo, spec, sid, scorer, sizer):
            if payload is None:
                summary.failed[(job.job_id, sid)] = outcome
            else:
                summary.scored[sid] += 1
                _collect(summary, payload)
            _report(on_job, job, sid, "scored" if payload else "failed")
    summary.notes = sizer.notes
    summary.seconds = time.perf_counter() - started
    return summary


def score_jobs(population: PopulationStore, jobs: list[Job], spec, sid: str, scorer,
               sizer: CohortSizer) -> Iterator[tuple[Job, str, dict | None]]:
    """Score `jobs` with one set-up scorer: K adapters at a time where it scores cohorts
    (`score_cohort`), else one by one. Yields (job, outcome, stored payload or None)."""
    queue = list(jobs)
    while queue:
        k = sizer.size(None, getattr(scorer, "device", torch.device("cpu")))
        if k == 1 or len(queue) == 1 or not isinstance(scorer, CohortScorer):
            job = queue.pop(0)
            yield (job, *score_job(population, job, spec, sid, scorer))
            continue
        cohort, queue = queue[:k], queue[k:]
        try:
            with contextlib.ExitStack() as stack:
                dirs = [stack.enter_context(_adapter_dir(population, job.job_id)) for job in cohort]
                started = time.perf_counter()
                labels = scorer.score_cohort(cohort, dirs)
                share = (time.perf_counter() - started) / len(cohort)
        except Exception as exc:
            if is_out_of_memory(exc):
                sizer.out_of_memory(len(cohort))
                queue = cohort + queue
                continue
            log.warning("scoring a cohort of %d with %s failed (%s); scoring its LoRAs one at a time", len(cohort), sid, exc)
            for job in cohort:
                yield (job, *score_job(population, job, spec, sid, scorer))
            continue
        for job, values in zip(cohort, labels):
            yield (job, *_store(population, job, spec, sid, values, scorer, {"seconds": share, "cohort_size": len(cohort)}))


def score_job(population: PopulationStore, job: Job, spec, sid: str, scorer) -> tuple[str, dict | None]:
    """Score one LoRA with one (set-up) scorer and store it: ('scored', payload) or (reason, None)."""
    try:
        with _adapter_dir(population, job.job_id) as adapter_dir:
            started = time.perf_counter()
            labels = scorer.score(job, adapter_dir)
            seconds = time.perf_counter() - started
    except Exception as exc:  # one LoRA's failure must not stop the population
        return f"{type(exc).__name__}: {exc}"[:300], None
    return _store(population, job, spec, sid, labels, scorer, {"seconds": seconds})


def scorer_provenance(scorer) -> dict[str, Any] | None:
    """What a set-up scorer read beyond its settings (benchmark fingerprints, CLIP checkpoint), computed once."""
    if not hasattr(scorer, "_lol_provenance"):
        method = getattr(scorer, "provenance", None)
        try:
            scorer._lol_provenance = method() if method is not None else None
        except Exception as exc:  # provenance is a record, never a reason to lose a label
            scorer._lol_provenance = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return scorer._lol_provenance


def _store(population: PopulationStore, job: Job, spec, sid: str, labels: dict, scorer=None,
           timing: dict[str, float | int] | None = None) -> tuple[str, dict | None]:
    """Write one score: ('scored', payload), or (reason, None) when the store refuses the write.

    timing: `seconds`, the wall time of the scorer's call for this LoRA (its setup excluded), or with
    `cohort_size` K, its share (1/K) of a pass that scored K LoRAs together (`lol predict` reports it)."""
    payload = {"job_id": job.job_id, "scorer": spec.name, "scorer_id": sid, "settings": scorer_settings(spec),
               "labels": labels, "versions": _versions(), "scored_at": time.time()}
    if timing is not None:
        payload.update({key: round(value, 6) if isinstance(value, float) else value for key, value in timing.items()})
    provenance = scorer_provenance(scorer) if scorer is not None else None
    if provenance:
        payload["provenance"] = provenance
    try:
        population.write_score(job.job_id, sid, payload)
    except OSError as exc:  # a full disk, an I/O error: this label is missing, a rerun adds it
        return f"store error while writing the score: {type(exc).__name__}: {exc}"[:300], None
    return "scored", payload


def _collect(summary: ScoreSummary, payload: dict | None) -> None:
    for name, value in (payload or {}).get("labels", {}).items():
        summary.labels.setdefault(name, []).append(float(value))


class _adapter_dir:
    """The job's adapter folder on local disk (the store itself, or a temporary copy)."""

    def __init__(self, population: PopulationStore, job_id: str):
        self.population, self.job_id, self._tmp = population, job_id, None

    def __enter__(self) -> Path:
        rel = self.population.job_rel(self.job_id, "adapter")
        if self.population.store.is_local:
            links = self.population.store.links_under(rel)
            if links:  # the scorers open files directly: never through a link
                raise StoreError(f"job {self.job_id}: {rel}/{links[0] or ''} is a symbolic link; `lol finetune` repairs the job")
            return self.population.store.local_path(rel)
        self._tmp = scratch_dir(f"lol-adapter-{self.job_id}-")
        return self.population.store.download_dir(rel, self._tmp.__enter__())

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.__exit__(*exc)


def _report(on_job, job: Job, sid: str, outcome: str) -> None:
    if on_job is not None:
        on_job(job, sid, outcome)

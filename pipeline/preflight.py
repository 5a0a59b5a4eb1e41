"""What `lol finetune` and `lol run` check of a manifest's data before any job trains.

Each check raises a `DataSourceError` (a DomainError: exit 2, one line) naming what is wrong and
what would be valid, and touches nothing in the store:

- `check_training_images`: every image the pending jobs will train on decodes (an `hf:` /
  `folder:` image dataset; the tiny world draws its images itself);
- `check_scorer_data`: the scorers' benchmarks and datasets load and map to questions, so a bad
  benchmark is found before hours of finetuning, not after;
- `check_data_unchanged`: the data still has the fingerprints the population's finished LoRAs
  were trained on (job ids hash the manifest, not the data: a changed folder under a half-finished
  population would otherwise mix LoRAs of two datasets).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from pipeline.data import manifest_source, select_job_examples, source_examples, source_provenance
from pipeline.data.base import DataSourceError

PROGRESS_FROM = 200  # images; fewer are checked without a progress bar


def check_training_images(manifest: Any, jobs: Sequence[Any]) -> int:
    """Decode every image `jobs` (expanded `pipeline.jobs.Job`s) train on, each once; return how
    many were decoded (0 where the source makes its own images)."""
    examples = source_examples(manifest)  # also checks subsets against the data (classes, identities)
    if getattr(examples, "job_examples", None) is None or not jobs:
        return 0
    seen: dict[str, Any] = {}
    for job in jobs:
        for example in select_job_examples(examples, job.spec.data, job.spec.seed):
            seen.setdefault(example.id, example)
    _decode_all(list(seen.values()), f"checking {len(seen)} training images")
    return len(seen)


def _decode_all(images: Sequence[Any], what: str) -> None:
    if len(images) < PROGRESS_FROM:
        for example in images:
            example.load_image()
        return
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)
    for example in track(images, description=what, console=console, transient=True, disable=not console.is_terminal):
        example.load_image()


def check_scorer_data(manifest: Any, store: Any = None) -> None:
    """Load the questions of every scorer that reads a benchmark or dataset (`mc_accuracy`,
    `eval_loss`: unknown sets, missing columns, answer keys that fit no choice), and set up the scorers
    that read only the training data (`attributes`, `membership`, `sources`: attribute names and values)."""
    from pipeline.score import make_scorer

    for spec in manifest.scorers:
        scorer = make_scorer(spec)
        questions = getattr(scorer, "examples", None)
        if questions is not None:
            questions()
        if getattr(scorer, "reads_data_only", False):
            scorer.setup(manifest, store)


def check_data_unchanged(manifest: Any, records: Iterable[dict]) -> None:
    """Raise if the manifest's `hf:` / `folder:` data no longer has the content (`pipeline.data.content`)
    recorded by the first of `records` (the population's finished LoRAs) that names it. Configs or
    content the record does not name (older records, a hub cache without a commit) are not compared."""
    trained_on = next((r["metrics"]["data"] for r in records if (r.get("metrics") or {}).get("data")), None)
    if not trained_on or not trained_on.get("content"):
        return
    now = source_provenance(manifest)
    if now is None:
        return
    was, is_now = trained_on["content"], now.get("content") or {}
    changed = {c: (was[c], is_now.get(c)) for c in was if was[c] and is_now.get(c) and was[c] != is_now[c]}
    if not changed:
        return
    what = "; ".join(f"config {c}: {a[:20]}… → {b[:20]}…" for c, (a, b) in sorted(changed.items()))
    raise DataSourceError(
        f"the data of population {manifest.population.name!r} has changed since its LoRAs were trained on it "
        f"({now.get('source')}, {what}); restore the files it was trained on, or give the new data a population "
        "of its own (population.version=N or a new population.name)")


def finished_records(population: Any, look_at: int = 50) -> Iterator[dict]:
    """Records of the population's finished LoRAs, from one listing; at most `look_at` job folders are
    opened (a population of unfinished folders is not read whole)."""
    for job_id in population.job_ids()[:look_at]:
        record = population.record(job_id)
        if record is not None:
            yield record


def check_before_training(manifest: Any, population: Any, jobs: Sequence[Any], scorers: bool = True) -> int:
    """Every check above, cheapest first; the number of training images decoded."""
    manifest_source(manifest)  # an unknown source or a missing folder, before anything is read
    check_data_unchanged(manifest, finished_records(population))
    if scorers:
        check_scorer_data(manifest, population.store)
    return check_training_images(manifest, jobs)


__all__ = ["check_before_training", "check_data_unchanged", "check_scorer_data", "check_training_images",
           "finished_records"]

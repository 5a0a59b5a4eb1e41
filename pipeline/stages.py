"""The stages of a population run as library calls: finetune, score, publish, train, evaluate, report.

Each is idempotent: storage decides what is done. The CLI and the Prefect flows call these.
"""

from __future__ import annotations

import contextlib
from enum import Enum
from pathlib import Path

from pipeline.manifest import MAX_BATCH, Manifest
from storage import PopulationStore, StatusReport, Store, StoreError


class RunStage(str, Enum):
    """The stages of `lol run`, in order (learn = train, evaluate, report)."""

    finetune = "finetune"
    score = "score"
    publish = "publish"
    learn = "learn"


RUN_STAGES = tuple(stage.value for stage in RunStage)
SCALING_RESULTS = Path("bench/results")  # where `lol bench scaling` writes, relative to the working directory


def prepare(manifest: Manifest, store: Store, manifest_text: str) -> PopulationStore:
    """Record the manifest as run under the population's folder; return that folder."""
    population = store.population(manifest.population.name)
    population.write_manifest(manifest_text)
    return population


def planned_ids(manifest: Manifest, limit: int | None = None) -> list[str]:
    from pipeline.jobs import planned_job_ids

    return planned_job_ids(manifest, limit)


def population_status(manifest: Manifest, store: Store) -> StatusReport:
    return store.population(manifest.population.name).status(planned_ids(manifest))


_trainer_overrides: dict[str, object] = {}


@contextlib.contextmanager
def override_trainer(kind: str, factory):
    """Within this block (in this process), `trainer_factory(kind)` returns `factory`.

    For benchmark fixtures such as `bench/orchestration.py`'s fixed-time trainer: code chooses it,
    a manifest never can (its base kind picks one of the real trainers)."""
    before = _trainer_overrides.get(kind)
    _trainer_overrides[kind] = factory
    try:
        yield
    finally:
        if before is None:
            _trainer_overrides.pop(kind, None)
        else:
            _trainer_overrides[kind] = before


def trainer_factory(kind: str):
    """The Trainer class for a base kind (or what `override_trainer` put in its place)."""
    if kind in _trainer_overrides:
        return _trainer_overrides[kind]
    if kind == "diffusion":
        from pipeline.finetune.diffusion import DiffusionTrainer

        return DiffusionTrainer
    if kind == "causal_lm":
        from pipeline.finetune.causal_lm import CausalLMTrainer

        return CausalLMTrainer
    raise ValueError(f"no trainer for base kind {kind!r}; kinds: diffusion, causal_lm")


def finetune(manifest: Manifest, store: Store, limit: int | None = None, shard_spec: str | None = None,
             on_job=None):
    """Train every planned LoRA the store lacks; returns a FinetuneSummary. The data of the jobs to train
    and the scorers' benchmarks are checked first (`pipeline.preflight`)."""
    from pipeline.finetune.runner import finetune_population
    from pipeline.preflight import check_before_training

    return finetune_population(manifest, store, trainer_factory(manifest.base.kind), limit=limit,
                               shard_spec=shard_spec, on_job=on_job,
                               check_pending=lambda population, jobs: check_before_training(manifest, population, jobs))


def score(manifest: Manifest, store: Store, only: list[str] | None = None, limit: int | None = None,
          shard_spec: str | None = None, on_job=None):
    """Label every completed LoRA lacking a score; returns a ScoreSummary. Refused when the training data
    changed under the population (its labels would describe other data; `pipeline.preflight`)."""
    from pipeline.preflight import check_data_unchanged, finished_records
    from pipeline.score.runner import score_population

    check_data_unchanged(manifest, finished_records(store.population(manifest.population.name)))
    return score_population(manifest, store, only=only, limit=limit, shard_spec=shard_spec, on_job=on_job)


def publish(manifest: Manifest, store: Store, push: bool | None = None, trust_remote_pickle: bool = False):
    """Write the population as a Hugging Face dataset folder (and push it when a token is set)."""
    from pipeline.publish import publish_population

    return publish_population(manifest, store, push=push, trust_remote_pickle=trust_remote_pickle)


def learn_target(manifest: Manifest, store: Store):
    """(published folder, output folder, LearnSettings) of a population's learn stage."""
    from lol_models.common import SettingsError
    from lol_models.protocol import tuning_pool
    from lol_models.registry import check_search
    from lol_models.tasks import LearnSettings

    if not store.is_local:
        raise StoreError(f"the learn stages read the published folder from a local store; {store.url} is remote — "
                         "`lol pull` it or pass the published folder path instead of the manifest")
    learn = manifest.learn
    settings = LearnSettings(predictors=tuple(learn.predictors), targets=tuple(learn.targets), seeds=learn.seeds,
                             epochs=learn.epochs, batch_size=learn.batch_size, learning_rate=learn.learning_rate,
                             tuning_budget=learn.tuning_budget, selection_seeds=learn.selection_seeds,
                             min_epochs=learn.min_epochs, smooth_epochs=learn.smooth_epochs, split=learn.split,
                             search={p: {k: tuple(v) for k, v in fields.items()} for p, fields in learn.search.items()})
    check_search(settings.search, settings.tuning_budget, lambda p, kind: tuning_pool(p, kind, settings))  # before training
    for predictor, fields in settings.search.items():
        if any(b > MAX_BATCH for b in fields.get("batch_size", ()) if isinstance(b, int)):
            raise SettingsError(f"learn.search.{predictor}.batch_size: at most {MAX_BATCH:,} LoRAs per batch, "
                                f"got {list(fields['batch_size'])}")
    name = manifest.population.name
    return store.local_path(f"published/{name}"), store.local_write_dir(f"learn/{name}"), settings


def train(manifest: Manifest, store: Store, on_run=None, workers: int = 1, resume: bool = True):
    """Train the learn section's predictors on every target; `workers` (predictor, target) units at once;
    `resume`: keep the units already trained with the same settings on the same published rows."""
    from lol_models.experiments import train_all

    published, out, settings = learn_target(manifest, store)
    return train_all(published, settings, out, on_run=on_run, workers=workers, resume=resume)


def evaluate(manifest: Manifest, store: Store):
    from lol_models.experiments import evaluate as collect

    published, out, _ = learn_target(manifest, store)
    return collect(out, published)


def report(manifest: Manifest, store: Store):
    from lol_models.report import report as write_report

    scaling = sorted(SCALING_RESULTS.glob("scaling-*.png"))  # `lol bench scaling` output, newest last (timestamped names)
    return write_report(learn_target(manifest, store)[1], title=f"Learning on LoRAs: {manifest.population.name}",
                        scaling_figure=scaling[-1] if scaling else None)

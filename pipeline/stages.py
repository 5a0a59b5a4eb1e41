"""The stages of a population run, and which of them this build provides.

`lol run` walks `STAGES` in order. A stage whose `run` is None is not built yet: the run
says so plainly and goes on to report the stages that are, never producing fake output.
Each stage's `run(manifest, store, **options)` is idempotent: storage decides what is done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.jobs import expand
from pipeline.manifest import Manifest
from storage import PopulationStore, StatusReport, Store


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    run: Callable[..., Any] | None  # None: not built yet
    built_by: str  # the capability that provides it, for the "not built yet" message


def prepare(manifest: Manifest, store: Store, manifest_text: str) -> PopulationStore:
    """Record the manifest as run under the population's folder; return that folder."""
    population = store.population(manifest.population.name)
    population.write_manifest(manifest_text)
    return population


def planned_ids(manifest: Manifest, limit: int | None = None) -> list[str]:
    return [job.job_id for job in expand(manifest, limit=limit)]


def population_status(manifest: Manifest, store: Store) -> StatusReport:
    return store.population(manifest.population.name).status(planned_ids(manifest))


class StageNotBuilt(RuntimeError):
    """The stage exists for some model kinds, not for this manifest's."""


def trainer_factory(kind: str):
    """The Trainer class for a base kind."""
    if kind == "diffusion":
        from pipeline.finetune.diffusion import DiffusionTrainer

        return DiffusionTrainer
    if kind == "causal_lm":
        from pipeline.finetune.causal_lm import CausalLMTrainer

        return CausalLMTrainer
    raise StageNotBuilt(f"finetuning {kind} bases is not built yet (comes with the language-model population issue)")


def finetune(manifest: Manifest, store: Store, limit: int | None = None, shard_spec: str | None = None,
             on_job=None):
    """Train every planned LoRA the store lacks; returns a FinetuneSummary."""
    from pipeline.finetune.runner import finetune_population

    return finetune_population(manifest, store, trainer_factory(manifest.base.kind), limit=limit,
                               shard_spec=shard_spec, on_job=on_job)


def score(manifest: Manifest, store: Store, only: list[str] | None = None, limit: int | None = None,
          shard_spec: str | None = None, on_job=None):
    """Label every completed LoRA lacking a score; returns a ScoreSummary."""
    from pipeline.score.runner import score_population

    return score_population(manifest, store, only=only, limit=limit, shard_spec=shard_spec, on_job=on_job)


def publish(manifest: Manifest, store: Store, push: bool | None = None):
    """Write the population as a Hugging Face dataset folder (and push it when a token is set)."""
    from pipeline.publish import publish_population

    return publish_population(manifest, store, push=push)


def learn_target(manifest: Manifest, store: Store):
    """(published folder, output folder, LearnSettings) of a population's learn stage."""
    from lol_models.experiments import LearnSettings

    if not store.is_local:
        raise ValueError(f"the learn stages read the published folder from a local store; {store.url} is remote — "
                         "`lol pull` it or pass the published folder path instead of the manifest")
    learn = manifest.learn
    settings = LearnSettings(predictors=tuple(learn.predictors), targets=tuple(learn.targets), seeds=learn.seeds,
                             epochs=learn.epochs, batch_size=learn.batch_size, learning_rate=learn.learning_rate)
    name = manifest.population.name
    return store.local_path(f"published/{name}"), store.local_path(f"learn/{name}"), settings


def train(manifest: Manifest, store: Store, on_run=None):
    from lol_models.experiments import train_all

    published, out, settings = learn_target(manifest, store)
    return train_all(published, settings, out, on_run=on_run)


def evaluate(manifest: Manifest, store: Store):
    from lol_models.experiments import evaluate as collect

    return collect(learn_target(manifest, store)[1])


def report(manifest: Manifest, store: Store):
    from lol_models.experiments import report as write_report

    return write_report(learn_target(manifest, store)[1], title=f"Learning on LoRAs: {manifest.population.name}")


STAGES: tuple[Stage, ...] = (
    Stage("finetune", "train one LoRA per job", finetune, "the diffusion and language-model population issues"),
    Stage("score", "label every LoRA (CLIP score, accuracy, attributes…)", score, "the diffusion and language-model population issues"),
    Stage("publish", "write the population as a Hugging Face dataset", publish, "the publish issue"),
    Stage("train", "train the LoL predictors on the published dataset", train, "the Learning-on-LoRAs issue"),
    Stage("evaluate", "evaluate the predictors, write results.json", evaluate, "the Learning-on-LoRAs issue"),
    Stage("report", "write report.md with tables and figures", report, "the Learning-on-LoRAs issue"),
)


def stage(name: str) -> Stage:
    for candidate in STAGES:
        if candidate.name == name:
            return candidate
    raise ValueError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")

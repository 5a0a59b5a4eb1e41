"""The speed experiment on a population: predicting the CLIP score versus computing it.

Wires the population's `clip_score` scorer (`pipeline.score.clip_score.ClipScoreScorer`) and its
published dataset into `lol_models.speed.compare_speed` (which never imports the pipeline):

- the predictor: `trained` (a `lol_models.train.RunResult`), or one trained here on the published
  train split (epoch picked on validation) with the manifest's learn settings (`lol predict` uses
  the models `lol train` keeps, `lol_models/predictors.py`);
- predicting: one batched pass over every published LoRA (all splits), timed;
- computing: `ClipScoreScorer.score(job, adapter)` for the first `loras_scored` LoRAs of the test
  split (LoRAs the predictor never trained on), read from the store that published them; the
  scorer's setup (base, CLIP, prompt embeddings) is timed apart and not counted per LoRA.

Writes `{out_dir}/speed.json` (default out_dir: `{store}/learn/{population}/speed`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lol_models.speed import SpeedResult, compare_speed
from pipeline.jobs import expand
from pipeline.manifest import Manifest
from storage import DomainError, Store

__all__ = ["clip_score_speed"]

RESULTS_FILE = "speed.json"


class SpeedError(DomainError):
    """The speed experiment cannot run as asked: no clip_score scorer or label, more LoRAs than the
    test split holds, or the published LoRAs absent from the store."""


def clip_score_speed(manifest: Manifest, store: Store, out_dir: str | Path | None = None, *, predictor: str = "glnet",
                     loras_scored: int = 8, trained=None, repeats: int = 5, batch_size: int = 1024,
                     device: str | None = None) -> SpeedResult:
    """Per-LoRA seconds of predicting the CLIP score with `predictor` versus computing it; see the module doc.

    trained: a RunResult of a regression predictor on the clip_score column (its model, target mean
    and std); when given, `predictor` is its model name. device: where both run (default: the
    scorer's choice, CUDA when available).
    """
    import torch

    from lol_models.tasks import load_splits
    from lol_models.train import LabeledLoras, TrainConfig, train_and_evaluate
    from lol_models.weights import collate
    from pipeline.publish import label_column
    from pipeline.score import make_scorer, scorer_id
    from pipeline.stages import learn_target

    spec = next((s for s in manifest.scorers if s.name == "clip_score"), None)
    if spec is None:
        names = [s.name for s in manifest.scorers] or "none"
        raise SpeedError(f"the speed experiment times the clip_score scorer; {manifest.population.name}'s scorers are {names}")
    if loras_scored < 1:
        raise SpeedError(f"loras_scored must be ≥ 1, got {loras_scored}")
    published, learn_out, settings = learn_target(manifest, store)
    splits = load_splits(published, "published")  # timing only: any split of the population will do
    column = label_column("clip_score", "clip_score")
    if column not in splits["train"].labels:
        raise SpeedError(f"{published} has no {column!r} label (labels: {splits['train'].label_names}); "
                         "score and publish the population first")
    test = splits["test"]
    if len(test) < loras_scored:
        raise SpeedError(f"the test split holds {len(test)} LoRAs; ask for at most that many (loras_scored={loras_scored})")

    if trained is None:
        data = {name: LabeledLoras(s.weights, s.targets([column])) for name, s in splits.items()}
        config = TrainConfig(task="regression", epochs=settings.epochs, batch_size=settings.batch_size,
                             lr=settings.learning_rate)
        trained = train_and_evaluate(predictor, data["train"], data["validation"], data["test"], config=config)
    predictor = trained.model_name

    scorer = make_scorer(spec)
    if device is not None:
        scorer.device = torch.device(device)
    started = time.perf_counter()
    scorer.setup(manifest, store)
    setup_seconds = time.perf_counter() - started

    population = store.population(manifest.population.name)
    jobs = {job.job_id: job for job in expand(manifest)}
    chosen = test.job_ids[:loras_scored]
    adapters = [store.local_path(population.job_rel(job_id, "adapter")) for job_id in chosen]
    missing = [job_id for job_id, path in zip(chosen, adapters) if not (path / "adapter_model.safetensors").is_file()
               or job_id not in jobs]
    if missing:
        raise SpeedError(f"LoRA(s) {missing} of the published test split are not in {store.url} under "
                         f"{manifest.population.name}; run the speed experiment on the store that published them")

    # every published LoRA in one tensor: the test split first, so its first rows are the scored ones
    names = ["test"] + [n for n in splits if n != "test"]
    weights = collate([splits[n].weights for n in names])

    def score_one(k: int) -> float:
        return scorer.score(jobs[chosen[k]], adapters[k])["clip_score"]

    images = len(scorer.prompts) * spec.images_per_prompt
    result = compare_speed(
        trained.model, weights, list(range(len(chosen))), score_one, predictor=predictor, label=column,
        images_per_lora=images, target_mean=trained.target_mean, target_std=trained.target_std,
        batch_size=batch_size, repeats=repeats, device=scorer.device,
        extra={"population": manifest.population.name, "published": str(published), "job_ids": chosen,
               "scorer_id": scorer_id(spec), "scorer_setup_seconds": round(setup_seconds, 3),
               "denoising_steps": spec.steps, "guidance_scale": spec.guidance_scale,
               "predictor_test_r2": trained.test.get("r2")},
    )
    out = Path(out_dir) if out_dir is not None else Path(learn_out) / "speed"
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(json.dumps(result.as_json(), indent=1) + "\n")
    return result

"""`lol predict`: apply a predictor that `lol train` kept to peft LoRA folders of the population's base.

Wires the store into `lol_models.predict` (which never imports the pipeline):

- which predictor: a name (`glnet`), looked up in `{store}/learn/{population}/predictors/` (every
  task it was trained on, or those asked for, of one seed), or the path of a saved predictor's JSON;
- which LoRAs: peft adapter folders, read with `safe_weights` (safetensors; pickles only when
  trusted), or job ids of the population's stored LoRAs;
- the base: the adapter's `base_model_name_or_path` (when it names one) must be the population's
  base — its reference, a tiny-world build of it (`bases/{name}-{size}-{hash}`), its hub cache
  snapshot (`models--{org}--{name}`) or the same local folder — and its revision the same;
  modules, shapes and rank are checked by `lol_models.predict.check_adapter`;
- the time computing each label took: the LoRA's score record (`seconds`, written by the score
  stage), else `lol experiment speed`'s measurement of that LoRA (`learn/{population}/speed/speed.json`);
  for a LoRA the store does not hold, the median over stored LoRAs of the population (or the speed
  experiment's mean); where none of these exists, "not recorded" (nothing is estimated).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lol_models.predict import Adapter, adapter_from_tensors, predict_adapters
from lol_models.predictors import (
    PredictorError,
    SavedPredictor,
    available,
    find_predictors,
    load_predictor,
)
from lol_models.published import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_WEIGHTS, MAX_CONFIG_BYTES
from storage import Store, StoreError

__all__ = ["LabelTime", "PredictReport", "PredictedRow", "base_problem", "predict", "read_adapter_folder"]

SPEED_FILE = "speed/speed.json"  # `lol experiment speed`'s results, under learn/{population}
TYPICAL_SAMPLE = 64  # stored LoRAs whose score records give the typical time for a LoRA the store lacks
_TINY_FOLDER = r"{name}-[A-Za-z0-9_]+-[0-9a-f]{{12}}"  # pipeline/bases/cache.py: {name}-{size}-{recipe hash}


@dataclass(frozen=True)
class LabelTime:
    """How long computing one scorer's labels took for a LoRA, and where that figure comes from."""

    seconds: float
    source: str  # "score record", "score record (cohort of 8)", "lol experiment speed", "median of 12 stored LoRAs" …


@dataclass
class PredictedRow:
    adapter: str  # the folder (or job id) as given
    job_id: str | None  # when it is a LoRA the store holds
    rank: int
    alpha: float
    values: dict[str, float]  # label column -> prediction (regression: label units; multilabel: P(1))
    scored: dict[str, float]  # label column -> the stored score, when the store has one
    predict_seconds: float  # featurise + forward of every predictor, this LoRA alone
    label_times: dict[str, LabelTime | None]  # scorer -> the time computing its labels took


@dataclass
class PredictReport:
    population: str
    predictor: str
    seed: int
    tasks: list[dict[str, Any]]  # {task, kind, columns, scorer, test metrics, file}
    rows: list[PredictedRow]
    kinds: dict[str, str]  # label column -> regression | multilabel
    scorers: dict[str, str]  # scorer name -> scorer id, of the predicted labels
    warmup_seconds: float
    load_seconds: float  # reading and checking the adapters and predictors
    device: str
    torch_threads: int
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        rows = [{"adapter": r.adapter, "job_id": r.job_id, "rank": r.rank, "alpha": r.alpha, "predicted": r.values,
                 "predicted_labels": {c: int(v >= 0.5) for c, v in r.values.items() if self.kinds[c] == "multilabel"},
                 "scored": r.scored, "predict_seconds": r.predict_seconds,
                 "label_seconds": {s: None if t is None else {"seconds": t.seconds, "source": t.source}
                                   for s, t in r.label_times.items()}} for r in self.rows]
        return {"population": self.population, "predictor": self.predictor, "seed": self.seed, "tasks": self.tasks,
                "kinds": self.kinds, "scorers": self.scorers, "adapters": rows, "warmup_seconds": self.warmup_seconds,
                "load_seconds": self.load_seconds, "device": self.device, "torch_threads": self.torch_threads,
                "notes": self.notes}


# ---------------------------------------------------------------- where things are


def learn_dir(store: Store, population: str) -> Path:
    if not store.is_local:
        raise StoreError(f"trained predictors are read from a local store; {store.url} is remote — copy its "
                         f"learn/{population} folder and pass the predictor's JSON file instead of its name")
    return store.local_path(f"learn/{population}")


def choose_population(store: Store, population: str | None) -> str:
    """The population named, else the only one whose learn folder holds trained predictors."""
    if population:
        return population
    trained = [name for name in store.list_dir("learn") if store.is_local and available(store.local_path(f"learn/{name}"))]
    if len(trained) == 1:
        return trained[0]
    if not trained:
        raise PredictorError(f"no trained predictors in {store.url}/learn; run `lol train MANIFEST` (or pass --store)")
    raise PredictorError(f"{store.url} holds predictors of {len(trained)} populations ({', '.join(trained)}); "
                         "choose one with --population NAME or --manifest FILE")


# ---------------------------------------------------------------- adapters


def read_adapter_folder(folder: Path, name: str | None = None, trust_remote_pickle: bool = False) -> Adapter:
    """The Adapter a peft folder holds (adapter_config.json + adapter_model.safetensors), read with
    `safe_weights`' checks; PredictorError for a folder that is not one."""
    from pipeline.safe_weights import load_weights_file

    name = name or str(folder)
    there = sorted(p.name for p in folder.iterdir())[:10] if folder.is_dir() else []
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file() and (folder / ADAPTER_PICKLE).is_file() and trust_remote_pickle:
        weights = folder / ADAPTER_PICKLE
    if not (folder / ADAPTER_CONFIG).is_file() or not weights.is_file():
        hint = " (a pickle: pass --trust-remote-pickle to read it)" if (folder / ADAPTER_PICKLE).is_file() else ""
        raise PredictorError(f"{name} is not a peft adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}; "
                             f"it holds: {', '.join(there) or 'nothing'}{hint}")
    config_path = folder / ADAPTER_CONFIG
    try:
        if config_path.stat().st_size > MAX_CONFIG_BYTES:
            raise PredictorError(f"{config_path}: {config_path.stat().st_size} bytes, larger than any adapter config")
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PredictorError(f"{config_path} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise PredictorError(f"{config_path} holds a JSON {type(config).__name__}, not an object")
    loaded = load_weights_file(weights, non_finite="count", trust_remote_pickle=trust_remote_pickle)
    if loaded.non_finite:
        raise PredictorError(f"{name}: {loaded.non_finite_total} NaN/Inf weight value(s); no prediction of a broken LoRA")
    return adapter_from_tensors(name, config, loaded.tensors)


def _stored_job(store: Store, population: str, folder: Path) -> str | None:
    """The job id when `folder` is the adapter folder of a LoRA of `population` that the store holds."""
    if not store.is_local or not population:
        return None
    jobs = store.local_path(f"populations/{population}/jobs").resolve()
    here = folder.resolve()
    if here.name != "adapter" or here.parent.parent != jobs:
        return None
    job_id = here.parent.name
    return job_id if store.population(population).record(job_id) is not None else None


def resolve_adapters(store: Store, population: str, given: list[str], trust_remote_pickle: bool = False
                     ) -> list[tuple[Adapter, str | None]]:
    """(Adapter, stored job id or None) for each folder or job id given."""
    resolved = []
    for item in given:
        path = Path(item).expanduser()
        if path.is_file() and path.name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, ADAPTER_PICKLE):
            path = path.parent
        if path.exists():
            resolved.append((read_adapter_folder(path, item, trust_remote_pickle), _stored_job(store, population, path)))
            continue
        job_id = _job_id(store, population, item)
        if job_id is None:
            raise PredictorError(f"{item!r} is neither an adapter folder nor a job id of {population} in {store.url} "
                                 f"(a peft folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}; `lol status MANIFEST` "
                                 f"and {store.url}/populations/{population}/jobs list the stored jobs)")
        folder = store.local_path(store.population(population).job_rel(job_id, "adapter"))
        resolved.append((read_adapter_folder(folder, item, trust_remote_pickle), job_id))
    return resolved


def _job_id(store: Store, population: str, item: str) -> str | None:
    if not store.is_local or not population or not re.fullmatch(r"[0-9a-f]{6,64}", item):
        return None
    try:
        return item if store.population(population).record(item) is not None else None
    except StoreError:
        return None


# ---------------------------------------------------------------- the base


def base_problem(config: dict[str, Any], facts: dict[str, Any]) -> str | None:
    """Why the base an adapter names is not the population's (None when it is, or names none).

    Accepted: the population's base reference itself; for `tiny:NAME`, a folder `NAME-{size}-{hash}`
    (a tiny-world build of it); for a hub id `org/name`, a path through its hub cache folder
    `models--org--name`; for a local folder, the same folder. The revisions, where both are known, must agree.
    """
    named = config.get("base_model_name_or_path")
    refs = [r for r in facts.get("base_ref") or [] if r]
    if not named or not refs:
        return None
    named = str(named)
    if not any(_same_base(named, ref) for ref in refs):
        return (f"adapter_config.json names the base {named!r}; the predictor reads LoRAs of "
                f"{' / '.join(map(repr, refs))} (a LoRA of another base, or of another build of it)")
    revision, revisions = config.get("revision"), [r for r in facts.get("base_revision") or [] if r]
    if revision and revisions and str(revision) not in revisions:
        return f"the adapter's base revision {revision!r} is not the population's ({', '.join(revisions)})"
    return None


def _same_base(named: str, ref: str) -> bool:
    if named == ref:
        return True
    if ref.startswith("tiny:"):
        return re.fullmatch(_TINY_FOLDER.format(name=re.escape(ref.removeprefix("tiny:"))), Path(named).name) is not None
    if "models--" + ref.replace("/", "--") in Path(named).parts:
        return True
    try:
        return Path(named).expanduser().resolve() == Path(ref).expanduser().resolve() and Path(ref).expanduser().exists()
    except (OSError, RuntimeError):
        return False


# ---------------------------------------------------------------- how long labels took


def _speed_results(store: Store, population: str) -> dict[str, Any] | None:
    path = learn_dir(store, population) / SPEED_FILE
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and isinstance(result.get("extra"), dict) else None


def _record_time(score: dict[str, Any] | None) -> LabelTime | None:
    seconds = (score or {}).get("seconds")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
        return None
    cohort = score.get("cohort_size")
    return LabelTime(float(seconds), f"score record (share of a cohort of {cohort})" if cohort else "score record")


def label_time(store: Store, population: str, job_id: str | None, scorer_id: str, speed: dict[str, Any] | None,
               typical: dict[str, LabelTime | None]) -> LabelTime | None:
    """The time computing `scorer_id`'s labels took for the LoRA `job_id` (None: one the store lacks)."""
    if job_id is not None:
        found = _record_time(store.population(population).read_score(job_id, scorer_id))
        if found is not None:
            return found
        if speed is not None and speed["extra"].get("scorer_id") == scorer_id and job_id in (speed["extra"].get("job_ids") or []):
            return LabelTime(float(speed["score_seconds"][speed["extra"]["job_ids"].index(job_id)]), "lol experiment speed")
        return None
    if scorer_id not in typical:
        typical[scorer_id] = _typical_time(store, population, scorer_id, speed)
    return typical[scorer_id]


def _typical_time(store: Store, population: str, scorer_id: str, speed: dict[str, Any] | None) -> LabelTime | None:
    """For a LoRA the store does not hold: the median over (up to TYPICAL_SAMPLE) stored LoRAs' score records,
    else the speed experiment's mean."""
    pop = store.population(population)
    times = []
    for job_id in pop.job_ids()[:TYPICAL_SAMPLE]:
        found = _record_time(pop.read_score(job_id, scorer_id))
        if found is not None:
            times.append(found.seconds)
    if times:
        return LabelTime(statistics.median(times), f"median of {len(times)} stored LoRAs")
    if speed is not None and speed["extra"].get("scorer_id") == scorer_id:
        return LabelTime(float(speed["score_seconds_per_lora"]), f"mean of {speed['loras_scored']} LoRAs, lol experiment speed")
    return None


# ---------------------------------------------------------------- predicting


def load_predictors(store: Store, population: str | None, predictor: str, tasks: list[str], seed: int
                    ) -> tuple[str, list[SavedPredictor]]:
    """(population, the saved predictors): a saved predictor's JSON file, or a predictor name looked up
    in the population's learn folder (one file per task, of seed `seed`)."""
    path = Path(predictor).expanduser()
    if predictor.endswith((".json", ".safetensors")) or path.is_file():
        loaded = load_predictor(path)
        return population or (loaded.facts.get("population") or [""])[0], [loaded]
    population = choose_population(store, population)
    return population, [load_predictor(p) for p in find_predictors(learn_dir(store, population), predictor, tasks, seed)]


def predict(store: Store, population: str | None, predictor: str, adapters: list[str], *, tasks: list[str] | None = None,
            seed: int = 0, repeats: int = 3, trust_remote_pickle: bool = False) -> PredictReport:
    """Apply a trained predictor to adapter folders (or stored job ids); see the module doc."""
    started = time.perf_counter()
    population, predictors = load_predictors(store, population, predictor, list(tasks or []), seed)
    facts = predictors[0].facts
    given = resolve_adapters(store, population, adapters, trust_remote_pickle)
    for adapter, _ in given:
        problem = base_problem(adapter.config, facts)
        if problem:
            raise PredictorError(f"{adapter.name}: {problem}")
    load_seconds = time.perf_counter() - started
    prediction = predict_adapters(predictors, [adapter for adapter, _ in given], repeats=repeats)

    scorers = {p.labels[c]["scorer"]: p.labels[c]["scorer_id"] for p in predictors for c in p.columns if c in p.labels}
    speed = _speed_results(store, population) if store.is_local and population else None
    typical: dict[str, LabelTime | None] = {}
    rows = []
    for (adapter, job_id), values, seconds in zip(given, prediction.values, prediction.seconds):
        scored: dict[str, float] = {}
        if job_id is not None:
            for p in predictors:
                for column in p.columns:
                    info = p.labels.get(column)
                    score = store.population(population).read_score(job_id, info["scorer_id"]) if info else None
                    if score and info["label"] in score.get("labels", {}):
                        scored[column] = float(score["labels"][info["label"]])
        times = {name: label_time(store, population, job_id, sid, speed, typical) if population else None
                 for name, sid in scorers.items()}
        rows.append(PredictedRow(adapter.name, job_id, adapter.rank, adapter.alpha, values, scored, seconds, times))
    notes = []
    if not any(adapter.config.get("base_model_name_or_path") for adapter, _ in given):
        notes.append("the adapters name no base (peft leaves it empty for bare diffusers UNets): checked by their modules and shapes")
    if any(t is None for row in rows for t in row.label_times.values()):
        notes.append("not recorded: the time of computing a label is kept in score records written by `lol score` since "
                     "they record it (rescoring adds it) and by `lol experiment speed` (clip_score)")
    tasks_out = [{"task": p.task, "kind": p.kind, "columns": list(p.columns), "test": p.metrics.get("test", {}),
                  "file": str(p.path)} for p in predictors]
    return PredictReport(population, predictors[0].predictor, predictors[0].seed, tasks_out, rows, prediction.kinds,
                         scorers, prediction.warmup_seconds, load_seconds, prediction.device, prediction.torch_threads, notes)

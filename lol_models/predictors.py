"""Trained predictors on disk: what `lol train` keeps of each (predictor, task, seed) so that
`lol predict` can apply it to new LoRAs.

Beside `runs/{predictor}--{task}.json` (metrics and test predictions), the learn stage writes

    predictors/{predictor}--{task}--seed{s}.safetensors   the model's state_dict (best-validation epoch)
    predictors/{predictor}--{task}--seed{s}.json          how to rebuild and use it (below)

The JSON holds the model name and its full config, the model's Layout, the task (kind and label
columns, with the scorer of each), the training split's target mean and std (regression), the
published layout (`layout.json`: which modules, their in/out sizes, r_max) that new LoRAs are
featurised through, and what the training rows had in common (population, base, target modules,
ranks) — what a LoRA must match to be predicted. `load_predictor` rebuilds the model with
`build_model` and loads the weights strictly; a file that does not describe a predictor is a
`PredictorError` (bad input, one line).

Shapes: T targets of a task, N LoRAs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lol_models.common import LoLModel, SettingsError, coerce_config
from lol_models.published import check_layout
from lol_models.registry import MODELS, build_model
from lol_models.weights import Layout
from storage.errors import DomainError

__all__ = ["FORMAT", "PREDICTORS_DIR", "PredictorError", "SavedPredictor", "available", "find_predictors",
           "load_predictor", "remove_saved", "save_predictor"]

FORMAT = "lol-predictor/1"
PREDICTORS_DIR = "predictors"
MAX_META_BYTES = 64 << 20
_NAME = re.compile(r"(?P<predictor>[A-Za-z0-9_]+)--(?P<task>.+)--seed(?P<seed>\d+)\.json")


class PredictorError(DomainError):
    """A trained predictor that cannot be found or read, or a LoRA it cannot be applied to."""


@dataclass
class SavedPredictor:
    """One trained predictor, ready to apply: the model (eval mode) and what it was trained on."""

    path: Path  # the .json file
    predictor: str
    seed: int
    task: str
    kind: str  # "regression" | "multilabel"
    columns: tuple[str, ...]  # the label columns it predicts, in output order (T)
    labels: dict[str, dict[str, str]]  # column -> {scorer, scorer_id, label}
    model: LoLModel
    target_mean: Tensor | None  # (T,) regression: outputs are standardised with these
    target_std: Tensor | None
    published_layout: dict[str, Any]  # the population's layout.json
    facts: dict[str, Any]  # population, base_ref, base_revision, target_modules, ranks, alphas
    metrics: dict[str, dict[str, float]]  # {"val": …, "test": …} at the best-validation epoch

    @property
    def name(self) -> str:
        return f"{self.predictor}--{self.task}--seed{self.seed}"

    @property
    def rank_agnostic(self) -> bool:
        return bool(getattr(self.model, "rank_agnostic", False))

    @property
    def max_rank(self) -> int:
        return int(self.published_layout["max_rank"])


def saved_stem(predictor: str, task: str, seed: int) -> str:
    """The file name, without suffix, of one saved seed of (predictor, task)."""
    return f"{predictor}--{task}--seed{seed}"


def remove_saved(out_dir: str | Path, predictor: str, task: str) -> None:
    """Delete every saved seed of (predictor, task) in `out_dir/predictors`, before training it again."""
    folder = Path(out_dir) / PREDICTORS_DIR
    for path in folder.glob(f"{predictor}--{task}--seed*"):
        if path.suffix in (".json", ".safetensors") and _NAME.fullmatch(path.with_suffix(".json").name):
            path.unlink()


def save_predictor(out_dir: str | Path, *, predictor: str, seed: int, task: Mapping[str, Any], model: LoLModel,
                   model_config: Any, labels: Mapping[str, Mapping[str, str]], published_layout: Mapping[str, Any],
                   facts: Mapping[str, Any], target_mean: Tensor | None = None, target_std: Tensor | None = None,
                   metrics: Mapping[str, Any] | None = None) -> Path:
    """Write one trained predictor (weights + JSON) into `out_dir/predictors`; returns the JSON's path.

    task: {name, kind, columns}; model_config: what `build_model` got (None, a dict or the config);
    labels: label column -> {scorer, scorer_id, label} for the task's columns; facts: what the
    training rows share (population, base_ref, base_revision, target_modules, ranks, alphas).
    """
    from safetensors.torch import save_file

    folder = Path(out_dir) / PREDICTORS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = saved_stem(predictor, task["name"], seed)
    config = dataclasses.asdict(coerce_config(MODELS[predictor].config_cls, model_config, model=predictor))
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    weights_path = folder / f"{stem}.safetensors"
    save_file(state, str(weights_path))
    dtype = next(iter(model.parameters())).dtype
    meta = {
        "format": FORMAT, "predictor": predictor, "seed": seed, "model_config": config,
        "task": {"name": task["name"], "kind": task["kind"], "columns": list(task["columns"])},
        "labels": {c: dict(labels[c]) for c in task["columns"]},
        "out_dim": model.out_dim, "dtype": str(dtype).removeprefix("torch."),
        "model_layout": model.layout.to_dict(), "published_layout": dict(published_layout),
        "target_mean": None if target_mean is None else target_mean.detach().cpu().double().tolist(),
        "target_std": None if target_std is None else target_std.detach().cpu().double().tolist(),
        "facts": dict(facts), "metrics": dict(metrics or {}),
        "weights_file": weights_path.name, "weights_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        "saved_at": time.time(),
    }
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return path


def available(learn_dir: str | Path) -> list[tuple[str, str, int]]:
    """(predictor, task, seed) of every saved predictor under `learn_dir/predictors`, sorted."""
    folder = Path(learn_dir) / PREDICTORS_DIR
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        match = _NAME.fullmatch(path.name)
        if match:
            found.append((match["predictor"], match["task"], int(match["seed"])))
    return sorted(found)


def find_predictors(learn_dir: str | Path, predictor: str, tasks: Sequence[str] = (), seed: int = 0) -> list[Path]:
    """The saved predictors `predictor` of seed `seed` in `learn_dir` (one per task, or only `tasks`,
    by task name or label column); PredictorError listing what there is otherwise."""
    saved = available(learn_dir)
    if not saved:
        raise PredictorError(f"no trained predictors in {Path(learn_dir) / PREDICTORS_DIR}; `lol train MANIFEST` "
                             "trains and keeps them (stores trained before predictors were kept need it again)")
    mine = [(t, s) for p, t, s in saved if p == predictor]
    if not mine:
        names = sorted({p for p, _, _ in saved})
        raise PredictorError(f"no trained predictor {predictor!r} in {Path(learn_dir) / PREDICTORS_DIR}; "
                             f"trained there: {', '.join(names)}")
    seeds = sorted({s for _, s in mine})
    if seed not in seeds:
        raise PredictorError(f"{predictor} has no run of seed {seed}; its seeds: {', '.join(map(str, seeds))}")
    names = sorted({t for t, s in mine if s == seed})
    chosen = names
    if tasks:
        columns = {t: _columns_of(Path(learn_dir) / PREDICTORS_DIR / f"{saved_stem(predictor, t, seed)}.json") for t in names}
        chosen = [t for t in names if t in tasks or any(c in tasks for c in columns[t])]
        unknown = sorted(set(tasks) - set(chosen) - {c for t in chosen for c in columns[t]})
        if unknown:
            raise PredictorError(f"{predictor} (seed {seed}) was not trained on {unknown}; its tasks: {', '.join(names)}")
    return [Path(learn_dir) / PREDICTORS_DIR / f"{saved_stem(predictor, t, seed)}.json" for t in chosen]


def _columns_of(path: Path) -> list[str]:
    try:
        return list(json.loads(path.read_text())["task"]["columns"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _fail(path: Path, why: str) -> PredictorError:
    return PredictorError(f"{path} is not a trained predictor that lol can read: {why}")


def load_predictor(path: str | Path) -> SavedPredictor:
    """Rebuild a saved predictor (model in eval mode, on the CPU) from its JSON file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        there = sorted(p.name for p in path.parent.iterdir())[:10] if path.parent.is_dir() else []
        raise PredictorError(f"no trained predictor at {path} ({path.parent} holds: {', '.join(there) or 'nothing'})")
    if path.stat().st_size > MAX_META_BYTES:
        raise _fail(path, f"{path.stat().st_size} bytes, far more than a predictor's description")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(path, f"not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, f"its format is {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}")
    try:
        name, task, out_dim = meta["predictor"], meta["task"], int(meta["out_dim"])
        if name not in MODELS:
            raise _fail(path, f"unknown predictor {name!r}; known: {', '.join(MODELS)}")
        model_layout = Layout.from_dict(meta["model_layout"])
        published_layout = check_layout(meta["published_layout"])
        columns = tuple(task["columns"])
        if len(columns) != out_dim or task["kind"] not in ("regression", "multilabel"):
            raise _fail(path, f"task {task!r} does not fit {out_dim} outputs")
        dtype = getattr(torch, str(meta.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise _fail(path, f"dtype {meta.get('dtype')!r} is not a floating-point torch dtype")
        weights_path = path.with_name(str(meta["weights_file"]))
    except PredictorError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, DomainError) as exc:
        raise _fail(path, f"{type(exc).__name__}: {exc}") from None
    if weights_path.parent != path.parent or not weights_path.is_file():
        raise _fail(path, f"its weights {weights_path.name} are missing")
    if meta.get("weights_sha256") and hashlib.sha256(weights_path.read_bytes()).hexdigest() != meta["weights_sha256"]:
        raise _fail(path, f"{weights_path.name} does not hash to the sha256 its description records (changed or damaged)")
    try:
        model = build_model(name, model_layout, out_dim, meta.get("model_config")).to(dtype)
        state = load_file(str(weights_path))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, ValueError, TypeError, SettingsError) as exc:
        raise _fail(path, f"the weights do not fit a {name} of this layout ({str(exc).splitlines()[0][:200]})") from None
    model.eval()
    mean, std = meta.get("target_mean"), meta.get("target_std")
    return SavedPredictor(
        path=path, predictor=name, seed=int(meta.get("seed", 0)), task=str(task["name"]), kind=str(task["kind"]),
        columns=columns, labels=dict(meta.get("labels") or {}), model=model,
        target_mean=None if mean is None else torch.tensor(mean, dtype=torch.float64),
        target_std=None if std is None else torch.tensor(std, dtype=torch.float64),
        published_layout=published_layout, facts=dict(meta.get("facts") or {}), metrics=dict(meta.get("metrics") or {}),
    )

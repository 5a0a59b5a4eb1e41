"""Are a population's labels informative? Spread of each label and its relation to the hyperparameters.

For every label of every scorer in the manifest: count, mean, std, min, max over the scored
LoRAs, and Kendall's τ-b (scipy) against each numeric hyperparameter and against the
*training budget* — learning rate × optimizer steps (diffusion: `steps`; language models:
`epochs`), the product the paper's grids vary. A label that does not vary, or does not move
with how hard a LoRA was trained, teaches a predictor little. Also per label: how many distinct
values it takes, its mean per quintile of the training budget (a label that rises and then
falls shows over-training), Kendall's τ-b against every other label, and the `HIGHEST` LoRAs with
the largest value (job id, value, hyperparameters, data groups); and, with `base_labels`, each label
of the base model itself, so that a LoRA's label reads as a change.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.jobs import expand
from pipeline.manifest import Manifest
from pipeline.score import scorer_id
from storage import Store

HIGHEST = 10  # LoRAs listed per label, largest value first
BUDGET_LENGTHS = ("steps", "epochs")  # the first of these a job has is its training length


def training_budget(hyperparameters: dict[str, Any]) -> float | None:
    """learning_rate × (steps or epochs), or None when a job lacks either."""
    length = next((hyperparameters[k] for k in BUDGET_LENGTHS if k in hyperparameters), None)
    if length is None or "learning_rate" not in hyperparameters:
        return None
    return float(hyperparameters["learning_rate"]) * float(length)


def _kendall(x: list[float], y: list[float]) -> dict[str, float] | None:
    from scipy.stats import kendalltau

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    result = kendalltau(x, y)
    return {"tau": round(float(result.statistic), 4), "p_value": float(f"{result.pvalue:.3g}")}


BUDGET_BINS = 5  # quintiles of lr × length


def budget_curve(budgets: list[float], values: list[float], bins: int = BUDGET_BINS) -> list[dict[str, float]]:
    """The label's mean in each of `bins` equal-count bins of the training budget, lowest first."""
    order = np.argsort(np.asarray(budgets), kind="stable")
    out = []
    for part in np.array_split(order, bins):
        if part.size:
            b, v = np.asarray(budgets)[part], np.asarray(values)[part]
            out.append({"budget_min": float(b.min()), "budget_max": float(b.max()), "count": int(part.size),
                        "mean": float(v.mean())})
    return out


def base_labels(manifest: Manifest, store: Store) -> dict[str, float]:
    """{label column: value} of the base model without any adapter, for every scorer that reads a model."""
    from pipeline.score import make_scorer

    out: dict[str, float] = {}
    for spec in manifest.scorers:
        scorer = make_scorer(spec)
        if getattr(scorer, "reads_data_only", False):
            continue
        scorer.setup(manifest, store)
        for label, value in scorer.score(None, None).items():
            out[f"{spec.name}/{label}"] = float(value)
    return out


def label_statistics(manifest: Manifest, store: Store, base: dict[str, float] | None = None) -> dict[str, Any]:
    """{label column: {count, distinct, mean, std, min, max, [base], kendall: {hyperparameter, "lr×length" or
    "label:<other column>": {tau, p_value}}, by_budget: [{budget_min, budget_max, count, mean}],
    highest: [{job_id, value, hyperparameters, data}] (`HIGHEST`, ties in job order)}}.

    `base`: the base model's labels (`base_labels`), copied next to each column's statistics."""
    population = store.population(manifest.population.name)
    jobs = list(expand(manifest))
    sids = {scorer_id(spec): spec.name for spec in manifest.scorers}
    columns: dict[str, list[tuple[dict[str, Any], float]]] = {}
    by_job: dict[str, dict[str, float]] = {}  # column -> {job id: value}, in job order
    for job in jobs:
        for sid, name in sids.items():
            payload = population.read_score(job.job_id, sid)
            for label, value in ((payload or {}).get("labels") or {}).items():
                if value is not None and math.isfinite(float(value)):
                    columns.setdefault(f"{name}/{label}", []).append((job.spec.hyperparameters, float(value)))
                    by_job.setdefault(f"{name}/{label}", {})[job.job_id] = float(value)
    specs = {job.job_id: job.spec for job in jobs}
    numeric = sorted({k for job in jobs for k, v in job.spec.hyperparameters.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)})
    stats: dict[str, Any] = {}
    for column, rows in sorted(columns.items()):
        values = np.array([v for _, v in rows])
        kendall = {}
        budget = [(training_budget(hp), v) for hp, v in rows]
        budget = [(b, v) for b, v in budget if b is not None]
        if budget:
            kendall["lr×length"] = _kendall([b for b, _ in budget], [v for _, v in budget])
        for name in numeric:
            pairs = [(float(hp[name]), v) for hp, v in rows if name in hp]
            kendall[name] = _kendall([p for p, _ in pairs], [v for _, v in pairs])
        for other in sorted(by_job):
            if other != column:
                shared = sorted(set(by_job[column]) & set(by_job[other]))
                kendall[f"label:{other}"] = _kendall([by_job[column][j] for j in shared], [by_job[other][j] for j in shared])
        stats[column] = {"count": int(values.size), "distinct": len(np.unique(values.round(12))), "mean": float(values.mean()),
                         "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                         "min": float(values.min()), "max": float(values.max()),
                         **({"base": base[column]} if base and column in base else {}),
                         "kendall": {k: v for k, v in kendall.items() if v is not None},
                         "by_budget": budget_curve([b for b, _ in budget], [v for _, v in budget]) if budget else [],
                         "highest": [{"job_id": job_id, "value": value, "hyperparameters": specs[job_id].hyperparameters,
                                      "data": specs[job_id].data}
                                     for job_id, value in sorted(by_job[column].items(), key=lambda kv: -kv[1])[:HIGHEST]]}
    return {"population": manifest.population.name, "planned": len(jobs), "labels": stats}

"""Are a population's labels informative? Spread of each label and its relation to the hyperparameters.

For every label of every scorer in the manifest: count, mean, std, min, max over the scored
LoRAs, and Kendall's τ-b (scipy) against each numeric hyperparameter and against the
*training budget* — learning rate × optimizer steps (diffusion: `steps`; language models:
`epochs`), the product the paper's grids vary. A label that does not vary, or does not move
with how hard a LoRA was trained, teaches a predictor little.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.jobs import expand
from pipeline.manifest import Manifest
from pipeline.score import scorer_id
from storage import Store

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


def label_statistics(manifest: Manifest, store: Store) -> dict[str, Any]:
    """{label column: {count, mean, std, min, max, kendall: {hyperparameter or "lr×length": {tau, p_value}}}}."""
    population = store.population(manifest.population.name)
    jobs = list(expand(manifest))
    sids = {scorer_id(spec): spec.name for spec in manifest.scorers}
    columns: dict[str, list[tuple[dict[str, Any], float]]] = {}
    for job in jobs:
        for sid, name in sids.items():
            payload = population.read_score(job.job_id, sid)
            for label, value in ((payload or {}).get("labels") or {}).items():
                if value is not None and math.isfinite(float(value)):
                    columns.setdefault(f"{name}/{label}", []).append((job.spec.hyperparameters, float(value)))
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
        stats[column] = {"count": int(values.size), "mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                         "min": float(values.min()), "max": float(values.max()),
                         "kendall": {k: v for k, v in kendall.items() if v is not None}}
    return {"population": manifest.population.name, "planned": len(jobs), "labels": stats}

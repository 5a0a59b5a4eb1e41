"""What running each question's context once saves `mc_accuracy` (`shared_context_logliks`).

Scores the first COUNT adapters of a tiny-arc store on the 563 test questions of skills:all, in
cohorts of 16 and one at a time, both with every (context, choice) pair as its own row (`batched_logliks`,
the scorer before) and with the contexts shared; prints one JSON line per setting (wall seconds, the
largest |Δ log-likelihood| and whether any acc label differs).

Usage: python bench/tuning/mc_shared_context.py STORE [THREADS] [COUNT]   (STORE: a tiny-arc store of up to 1,000 jobs,
at least COUNT of them finetuned)
"""

import json
import sys
import time

import numpy as np
import torch

from pipeline.jobs import expand
from pipeline.manifest import Manifest
from pipeline.score.lm_scorers import McAccuracyScorer, _LogLikelihoodScorer
from storage import Store


def main() -> None:
    store, threads = Store(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    torch.set_num_threads(threads)
    manifest = Manifest.from_yaml("manifests/tiny-arc.yaml", overrides=["count=1000"])
    population = store.population(manifest.population.name)
    done = [j for j in expand(manifest) if population.record(j.job_id) is not None][:count]
    dirs = [store.local_path(population.job_rel(j.job_id, "adapter")) for j in done]
    scorer = McAccuracyScorer(next(s for s in manifest.scorers if s.name == "mc_accuracy"))
    scorer.setup(manifest, store)
    results = {}
    for shared in (False, True):
        if not shared:  # the pairs path every scorer had before
            scorer.copies_logliks = lambda model, copies=1, route=None: _LogLikelihoodScorer.copies_logliks(scorer, model, copies, route)
        else:
            del scorer.copies_logliks
        for mode in ("cohort", "alone"):
            started = time.perf_counter()
            ll = scorer.cohort_logliks(dirs) if mode == "cohort" else np.stack([scorer.logliks(d) for d in dirs])
            results[shared, mode] = ll
            line = {"shared_context": shared, "mode": mode, "adapters": len(dirs), "questions": len(scorer.questions),
                    "threads": threads, "seconds": round(time.perf_counter() - started, 2)}
            if shared:
                before = results[False, mode]
                line["max_abs_diff"] = float(np.abs(ll - before).max())
                line["acc_labels_differ"] = sum(scorer.labels(a)["acc"] != scorer.labels(b)["acc"] for a, b in zip(ll, before))
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

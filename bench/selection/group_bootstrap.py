"""GL-net − each predictor on a `lol evaluate` results.json, resampling test LoRAs and resampling whole test
groups (a cluster bootstrap, `lol_models.bootstrap.group_resample_counts`), side by side.

LoRAs of one finetuning group share their training data (and, for labels of the data, their labels), so
the LoRA bootstrap treats as independent what is not: tiny-shapes' 167 test LoRAs come from 25 groups,
tiny-arc's 151 from 10. `lol evaluate` now reports both; this recomputes the group intervals for results
written before it did. Those kept only seed 0's test predictions, so the intervals here are of seed 0's
metric (not the 5-seed mean the tables show) unless the file holds every seed's (`test_predictions_all_seeds`).

Usage:
    python bench/selection/group_bootstrap.py RESULTS_JSON --published FOLDER      # groups: the published rows'
    python bench/selection/group_bootstrap.py RESULTS_JSON --groups-from-task sources  # groups: that label's vector
        [--out OUT.json]   (for populations whose label is the group, e.g. tiny-arc's sources)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lol_models.bootstrap import bootstrap_table
from lol_models.evaluation import REFERENCE


def groups_from_published(folder: str) -> dict[str, str]:
    """job_id → group of every published row."""
    import pyarrow.parquet as pq

    groups: dict[str, str] = {}
    for shard in sorted(Path(folder).glob("data/*.parquet")):
        table = pq.read_table(shard, columns=["job_id", "group"])
        groups.update(zip(table.column("job_id").to_pylist(), table.column("group").to_pylist()))
    if not groups:
        raise SystemExit(f"{folder} holds no data/*.parquet shards with job_id and group columns")
    return groups


def groups_from_task(results: dict, task: str) -> dict[str, str]:
    """job_id → the test LoRA's label vector of `task`, as a string: the group where the label is the group."""
    record = results[task]["predictors"][REFERENCE]
    return {job: "".join(str(int(v)) for v in y) for job, y in zip(record["test_job_ids"], record["test_targets"])}


def compare(results: dict, groups: dict[str, str]) -> dict:
    out = {}
    for name, task in results.items():
        ok = {p: r for p, r in task["predictors"].items() if "error" not in r}
        if REFERENCE not in ok:
            continue
        reference = ok[REFERENCE]
        y = np.asarray(reference["test_targets"], dtype=np.float64)
        every_seed = all("test_predictions_all_seeds" in r for r in ok.values())
        predictions = {p: np.asarray(r["test_predictions_all_seeds"] if every_seed else [r["test_predictions"]],
                                     dtype=np.float64) for p, r in ok.items()}
        test_groups = [groups[job] for job in reference["test_job_ids"]]
        variance = reference.get("train_target_variance") if task["kind"] == "regression" else None
        by_lora = bootstrap_table(task["kind"], y, predictions, reference=REFERENCE, train_variance=variance)
        by_group = bootstrap_table(task["kind"], y, predictions, reference=REFERENCE, train_variance=variance,
                                   groups=test_groups)
        out[name] = {"n": len(y), "groups": by_group["groups"], "seeds": "all" if every_seed else "seed 0",
                     "vs": {other: {metric: {"value": by_lora["difference"][other][metric]["value"],
                                             "lora_ci": [by_lora["difference"][other][metric][k] for k in ("low", "high")],
                                             "group_ci": [by_group["difference"][other][metric][k] for k in ("low", "high")]}
                                    for metric in by_lora["difference"][other]}
                            for other in by_lora["difference"]}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--published", help="the published folder the results were trained on")
    where.add_argument("--groups-from-task", help="a label task whose vector is the group (tiny-arc: sources)")
    parser.add_argument("--out", type=Path, help="write the comparison as JSON")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    groups = groups_from_published(args.published) if args.published else groups_from_task(results, args.groups_from_task)
    table = compare(results, groups)
    for name, task in table.items():
        print(f"{name}: {task['n']} test LoRAs from {task['groups']} groups ({task['seeds']})")
        for other, metrics in task["vs"].items():
            for metric, d in metrics.items():
                lo, hi = d["lora_ci"]
                glo, ghi = d["group_ci"]
                flip = "  <- significant by LoRA only" if (lo > 0 or hi < 0) and not (glo > 0 or ghi < 0) else ""
                print(f"  {REFERENCE} − {other:12s} {metric:13s} {d['value']:+.3f}  LoRAs [{lo:+.3f}, {hi:+.3f}]"
                      f"  groups [{glo:+.3f}, {ghi:+.3f}]{flip}")
    if args.out:
        args.out.write_text(json.dumps({"results": str(args.results), "reference": REFERENCE, "tasks": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()

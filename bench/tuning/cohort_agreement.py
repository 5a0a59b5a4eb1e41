"""How closely one job's adapter agrees across cohort compositions and thread counts (issue #16).

Trains the first COUNT jobs of a diffusion manifest with every (cohort size, threads) setting
below, for each step count, and compares every adapter with the reference setting (all jobs in
one cohort, 2 threads). Prints one JSON line per (steps, setting):

- `rel_fro_max`: max over jobs and tensors of ‖a − b‖_F / ‖b‖_F (the bound the tests assert);
- `rel_fro_b_max`: the same over the `lora_B` tensors only (zero at init, so all of B is update);
- `flipped_frac_max`: max over lora_B tensors of the fraction of entries whose difference
  exceeds lr (an Adam step of opposite sign: ≈ 2·lr);
- `bitwise`: whether every tensor is bit-identical to the reference.

The last setting trains every job alone in float64 (the adapter then saved as float32): rounding
far from any reduction order a CPU or cohort could pick, so its distance bounds what another
machine's rounding can do, sign flips of Adam's first steps included.

Usage: python bench/tuning/cohort_agreement.py BASE [COUNT] [STEPS,…] [OUT.jsonl]
  BASE: a diffusers folder (e.g. the tests' random SD, tests/random_sd.py) or `tiny:shapes-sd` (shipped).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.finetune.diffusion import DiffusionTrainer
from pipeline.finetune.runner import finetune_population
from pipeline.manifest import Manifest
from storage import Store

MANIFEST = Path(__file__).resolve().parents[2] / "manifests" / "tiny-shapes.yaml"
# (cohort size, threads, dtype); the first is the reference, the second reruns it
SETTINGS = [(3, 2, "float32"), (3, 2, "float32"), (2, 2, "float32"), (1, 2, "float32"), (3, 1, "float32"),
            (2, 1, "float32"), (1, 1, "float32"), (1, 2, "float64")]


class Float64Trainer(DiffusionTrainer):
    """The diffusion trainer on a float64 copy of the base (a stand-in for very different rounding)."""

    def setup(self, manifest: Manifest, store: Store) -> None:
        from pipeline.bases.loading import load_diffusion_pipeline
        from pipeline.data import source_examples, source_provenance

        self.examples = source_examples(manifest)
        self.data_provenance = source_provenance(manifest)
        self.use_pipeline(load_diffusion_pipeline(manifest.base.model_dump(), store, dtype=torch.float64),
                          manifest.lora.target_modules)


def train(base: str, count: int, steps: int, cohort: int, threads: int, dtype: str, root: Path, run: int) -> dict:
    torch.set_num_threads(threads)
    manifest = Manifest.from_yaml(MANIFEST, overrides=[
        f"base.ref={base}", f"count={count}", f"hyperparameters.steps={steps}", "hyperparameters.batch_size=1",
        f"data.subsets.num_groups={count}", f"execution.cohort_size={cohort}"])
    store = Store(str(root / f"s{steps}-c{cohort}-t{threads}-{run}"))
    summary = finetune_population(manifest, store, Float64Trainer if dtype == "float64" else DiffusionTrainer)
    assert len(summary.trained) == count, summary
    population = store.population(manifest.population.name)
    lrs = {j: population.read_spec(j)["spec"]["hyperparameters"]["learning_rate"] for j in summary.trained}
    return {j: (load_file(str(store.local_path(population.job_rel(j, "adapter", "adapter_model.safetensors")))), lrs[j])
            for j in summary.trained}


def compare(ours: dict, reference: dict) -> dict:
    rel, rel_b, flipped, bitwise = 0.0, 0.0, 0.0, True
    for job_id, (tensors, lr) in reference.items():
        other = ours[job_id][0]
        for key, b in tensors.items():
            a = other[key]
            bitwise &= torch.equal(a, b)
            r = float((a - b).norm() / b.norm().clamp(min=1e-30))
            rel = max(rel, r)
            if "lora_B" in key:
                rel_b = max(rel_b, r)
                flipped = max(flipped, float(((a - b).abs() > lr).float().mean()))
    return {"rel_fro_max": rel, "rel_fro_b_max": rel_b, "flipped_frac_max": flipped, "bitwise": bitwise}


def main() -> None:
    base = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    step_counts = [int(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "1,2,4,8").split(",")]
    out = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    with tempfile.TemporaryDirectory() as tmp:
        for steps in step_counts:
            reference = train(base, count, steps, *SETTINGS[0], Path(tmp), 0)
            for run, (cohort, threads, dtype) in enumerate(SETTINGS[1:], start=1):
                ours = train(base, count, steps, cohort, threads, dtype, Path(tmp), run)
                line = {"base": base, "count": count, "steps": steps, "cohort_size": cohort, "threads": threads,
                        "dtype": dtype, "rerun": run == 1,
                        "reference": dict(zip(("cohort_size", "threads", "dtype"), SETTINGS[0])), **compare(ours, reference)}
                print(json.dumps(line), flush=True)
                if out:
                    with out.open("a") as handle:
                        handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()

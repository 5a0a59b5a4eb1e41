"""The population runner with cohorts: the default path, memory sizing, out-of-memory retries, fallbacks."""

from __future__ import annotations

import torch
from conftest import ROOT, check_same_job_adapters
from safetensors.torch import load_file

from pipeline.cohort.sizing import CohortSizer, saved_tensor_bytes
from pipeline.finetune.diffusion import DiffusionTrainer
from pipeline.finetune.runner import finetune_population
from pipeline.manifest import Manifest
from storage import Store


def manifest(base, *extra) -> Manifest:
    return Manifest.from_yaml(ROOT / "manifests" / "tiny-shapes.yaml",
                              overrides=[f"base.ref={base}", "count=4", "hyperparameters.steps=4",
                                         "hyperparameters.batch_size=2", *extra])


def adapters(store: Store, name: str = "tiny-shapes") -> dict[str, dict[str, torch.Tensor]]:
    population = store.population(name)
    return {job_id: load_file(str(store.local_path(population.job_rel(job_id, "adapter", "adapter_model.safetensors"))))
            for job_id in population.job_ids() if population.record(job_id)}


def test_cohorts_are_the_default_and_store_what_one_at_a_time_stores(random_sd, tmp_path):
    together, alone = Store(str(tmp_path / "cohort")), Store(str(tmp_path / "alone"))
    summary = finetune_population(manifest(random_sd), together, DiffusionTrainer)
    assert len(summary.trained) == 4 and not summary.failed
    records = [together.population("tiny-shapes").record(j) for j in summary.trained]
    assert all(r["metrics"]["cohort"]["size"] == 4 for r in records)
    finetune_population(manifest(random_sd, "execution.cohort_size=1"), alone, DiffusionTrainer)
    a, b = adapters(together), adapters(alone)
    assert sorted(a) == sorted(b) and len(a) == 4
    ids = sorted(a)
    for k, job_id in enumerate(ids):  # float32: equal within the measured bound, not bit for bit (docs/cohorts.md)
        check_same_job_adapters(a[job_id], b[job_id], others=b[ids[(k + 1) % len(ids)]])


def test_out_of_memory_halves_the_cohort_and_says_so(random_sd, tmp_path, monkeypatch):
    sizes = []
    real = DiffusionTrainer.train_cohort

    def limited(self, tasks):
        sizes.append(len(tasks))
        if len(tasks) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, tasks)

    monkeypatch.setattr(DiffusionTrainer, "train_cohort", limited)
    store = Store(str(tmp_path / "store"))
    summary = finetune_population(manifest(random_sd), store, DiffusionTrainer)
    assert len(summary.trained) == 4 and not summary.failed
    assert sizes == [4, 2]  # then cohorts of 1: each job alone, the plain peft path
    assert any("ran out of memory" in note for note in summary.notes)
    assert not store.population("tiny-shapes").active_claims()


def test_a_cohort_that_fails_as_a_whole_trains_its_jobs_one_at_a_time(random_sd, tmp_path, monkeypatch):
    def broken(self, tasks):
        raise RuntimeError("a bug in the batched path")

    monkeypatch.setattr(DiffusionTrainer, "train_cohort", broken)
    store = Store(str(tmp_path / "store"))
    summary = finetune_population(manifest(random_sd), store, DiffusionTrainer)
    assert len(summary.trained) == 4 and not summary.failed
    assert all("cohort" not in store.population("tiny-shapes").record(j)["metrics"] for j in summary.trained)


def test_the_sizer_fits_the_cohort_to_free_memory():
    sizer = CohortSizer(requested=16, memory_fraction=0.5)
    assert sizer.size(None, torch.device("cpu")) == 16  # nothing measured yet
    assert sizer.size(100 * 2**20, torch.device("cpu"), free_bytes=2**30) == 3  # 512 MiB / (1.5 × 100 MiB)
    assert "reduced from 16 to 3" in sizer.notes[-1]
    assert sizer.size(2**20, torch.device("cpu"), free_bytes=2**34) == 16
    sizer.out_of_memory(16)
    assert sizer.size(None, torch.device("cpu")) == 8


def test_saved_tensor_bytes_counts_activations_not_the_frozen_weights():
    layer = torch.nn.Linear(256, 256).requires_grad_(False)
    lora = torch.nn.Parameter(torch.zeros(256, 4))
    x = torch.randn(32, 256)
    with saved_tensor_bytes(layer) as saved:
        (layer(x) @ lora).sum()
    assert saved.total == 32 * 256 * 4  # the (32, 256) float32 input of the LoRA matmul, once


def test_cohorts_group_jobs_of_equal_length_and_the_longest_run_first():
    from pipeline.finetune.runner import plan_cohorts, planned_micro_steps
    from pipeline.jobs import expand

    arc = Manifest.from_yaml(ROOT / "manifests" / "tiny-arc.yaml", overrides=["count=40", "execution.cohort_size=8"])
    jobs = list(expand(arc))
    job = jobs[0]  # epochs × batches of its data subset
    hp, data = job.spec.hyperparameters, job.spec.data
    examples = data["examples_per_source"] * len(data["sources"])
    assert planned_micro_steps(job) == hp["epochs"] * -(-examples // hp["batch_size"])
    cohorts = plan_cohorts(jobs, arc, workers=2)
    assert [len(c) for c in cohorts] == [8] * 5 and sorted(j.index for c in cohorts for j in c) == list(range(40))
    longest = [max(planned_micro_steps(j) for j in c) for c in cohorts]
    shortest = [min(planned_micro_steps(j) for j in c) for c in cohorts]
    assert longest == sorted(longest, reverse=True)  # the longest cohort is handed out first
    assert all(low >= high for low, high in zip(shortest, longest[1:]))  # cohorts do not overlap in length
    uneven = plan_cohorts(jobs[:37], arc, workers=2)
    assert [len(c) for c in uneven] == [8, 8, 8, 8, 5]  # the partial cohort runs last, with the shortest jobs
    qwen = Manifest.from_yaml(ROOT / "manifests" / "qwen2-arc.yaml", overrides=["count=6"])  # no per-source cap
    assert all(planned_micro_steps(j) >= 1 for j in expand(qwen))
    shapes = Manifest.from_yaml(ROOT / "manifests" / "tiny-shapes.yaml")
    steps_job = next(iter(expand(shapes, limit=1)))
    hp = steps_job.spec.hyperparameters
    assert planned_micro_steps(steps_job) == hp["steps"] * hp["gradient_accumulation"]


def test_the_same_job_on_the_same_machine_with_the_same_cohort_gives_the_same_bits(random_sd, tmp_path):
    """The strict half of the promise (docs/cohorts.md): same cohort composition, process and thread
    count → bit-identical adapters. Across compositions only the relative bound holds (above)."""
    first, second = Store(str(tmp_path / "first")), Store(str(tmp_path / "second"))
    for store in (first, second):
        finetune_population(manifest(random_sd, "count=2"), store, DiffusionTrainer)
    a, b = adapters(first), adapters(second)
    assert sorted(a) == sorted(b) and len(a) == 2
    assert all(torch.equal(a[j][k], b[j][k]) for j in a for k in a[j])

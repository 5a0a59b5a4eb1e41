"""Deterministic expansion of a manifest into job specs.

Job k depends only on the job-relevant content of the manifest (base, data, lora,
hyperparameters), the root seed and k: every random draw is a hash of
(seed, k, what is being drawn), so growing `count` from N to M leaves the first N jobs
byte-identical, and adding a hyperparameter does not shift the draws of the others.
No numpy/torch RNG is involved, so the expansion is stable across library versions.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lol_models.split_rule import group_unit, split_at
from pipeline.manifest import (
    Choice,
    ClassSubsets,
    IdentityGroups,
    IntRange,
    LogUniform,
    Manifest,
    SourceSubsets,
    Uniform,
)
from storage import DomainError

# Bump when a trainer's recipe changes what a spec produces; it is part of every job id.
RECIPE_VERSIONS = {"diffusion": "dreambooth-lora/1", "causal_lm": "qa-lora/1"}
JOB_ID_LENGTH = 16


class ShardError(DomainError):
    """A `--shard` that is not `i/n` with 1 ≤ i ≤ n."""


class JobSpec(BaseModel):
    """Everything that determines one LoRA. Its canonical JSON names the job (`job_id`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: dict[str, Any] = Field(description="{ref, revision, kind} of the base model.")
    data: dict[str, Any] = Field(description="Data source and the subset this job trains on.")
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    lora_dropout: float
    hyperparameters: dict[str, Any] = Field(description="Concrete values drawn for this job.")
    seed: int = Field(description="The job's own seed (data order, init, noise).")
    recipe_version: str

    def canonical_json(self) -> str:
        return canonical_json(self.model_dump(mode="json"))

    @property
    def job_id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:JOB_ID_LENGTH]


class Job(BaseModel):
    """A spec plus where it sits in its population (not part of the id)."""

    model_config = ConfigDict(frozen=True)

    population: str
    index: int
    spec: JobSpec

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    def to_json(self) -> str:
        return json.dumps({"job_id": self.job_id, "population": self.population, "index": self.index,
                           "spec": self.spec.model_dump(mode="json")}, indent=2, sort_keys=True)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def unit_draw(seed: int, index: int, name: str, draw: int = 0) -> float:
    """A uniform number in [0, 1) that depends only on its arguments."""
    digest = hashlib.sha256(f"{seed}\x1f{index}\x1f{name}\x1f{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _pick(seq: list | tuple, u: float):
    return seq[min(int(u * len(seq)), len(seq) - 1)]


def _tidy(x: float) -> float:
    """Round to 6 significant digits so specs stay readable; done identically for every job."""
    return float(f"{x:.6g}")


def draw_value(value: Any, seed: int, index: int, name: str) -> Any:
    """Draw one hyperparameter value for job `index`."""
    u = unit_draw(seed, index, f"hp:{name}")
    if isinstance(value, Choice):
        return _pick(value.choice, u)
    if isinstance(value, Uniform):
        low, high = value.uniform
        return _tidy(low + u * (high - low))
    if isinstance(value, LogUniform):
        low, high = value.loguniform
        return _tidy(math.exp(math.log(low) + u * (math.log(high) - math.log(low))))
    if isinstance(value, IntRange):
        low, high = value.int_range
        return low + min(int(u * (high - low + 1)), high - low)
    return value


def _sample_subset(items: list[str], size: int, seed: int, index: int, name: str) -> list[str]:
    """`size` distinct items, in the manifest's order, chosen by a hash-seeded shuffle."""
    keyed = sorted(range(len(items)), key=lambda i: unit_draw(seed, index, f"{name}:{items[i]}"))
    chosen = set(keyed[:size])
    return [items[i] for i in range(len(items)) if i in chosen]


def draw_data(manifest: Manifest, index: int) -> dict[str, Any]:
    data, seed = manifest.data, manifest.seed
    subsets = data.subsets
    descriptor: dict[str, Any] = {"source": data.source, "revision": data.revision, "split": data.split}
    if data.config is not None:  # only when set, so the job ids of manifests without them stay as they were
        descriptor["config"] = data.config
    if data.columns is not None:
        descriptor["columns"] = data.columns.model_dump(mode="json", exclude_defaults=True)
    if isinstance(subsets, IdentityGroups):
        group = min(int(unit_draw(seed, index, "data:group") * subsets.num_groups), subsets.num_groups - 1)
        descriptor.update(kind="identity_groups", group=group, num_groups=subsets.num_groups, group_size=subsets.group_size)
    elif isinstance(subsets, ClassSubsets):
        top = subsets.max_classes or len(subsets.classes)
        size = subsets.min_classes + min(int(unit_draw(seed, index, "data:size") * (top - subsets.min_classes + 1)), top - subsets.min_classes)
        descriptor.update(kind="class_subsets", classes=_sample_subset(subsets.classes, size, seed, index, "data:class"),
                          images_per_class=subsets.images_per_class)
    elif isinstance(subsets, SourceSubsets):
        # As in the paper: leave out a random subset whose size is uniform in [0, n-1].
        n = len(subsets.sources)
        left_out = min(int(unit_draw(seed, index, "data:left_out") * n), n - 1)
        kept = _sample_subset(subsets.sources, n - left_out, seed, index, "data:source")
        descriptor.update(kind="source_subsets", sources=kept, examples_per_source=subsets.examples_per_source)
    else:  # pragma: no cover - the schema admits only the kinds above
        raise AssertionError(f"unhandled subset kind {subsets!r}")
    return descriptor


def spec_values(manifest: Manifest, index: int, fixed: _Fixed | None = None) -> dict[str, Any]:
    """Job `index`'s spec as plain JSON values: exactly `JobSpec.model_dump(mode="json")` of `job_at`'s
    spec (tests/test_jobs.py checks it on every shipped manifest), so ids can be computed without
    building pydantic models (`planned_job_ids`)."""
    seed = manifest.seed
    fixed = fixed or _Fixed.of(manifest)
    hyper = {name: draw_value(value, seed, index, name) for name, value in fixed.hyperparameters}
    lora_dropout = float(hyper.pop("lora_dropout", manifest.lora.dropout))
    rank = int(_pick(manifest.lora.rank, unit_draw(seed, index, "lora:rank")))
    return {
        "base": dict(fixed.base),
        "data": draw_data(manifest, index),
        "rank": rank,
        "alpha": manifest.lora.alpha_at(rank),
        "target_modules": list(manifest.lora.target_modules),
        "lora_dropout": lora_dropout,
        "hyperparameters": hyper,
        "seed": int(unit_draw(seed, index, "job:seed") * 2**31),
        "recipe_version": RECIPE_VERSIONS[manifest.base.kind],
    }


def job_at(manifest: Manifest, index: int, fixed: _Fixed | None = None) -> Job:
    """Job `index` of the population (0-based); independent of `manifest.count`.

    `fixed`: what every job of `manifest` shares, worked out once (`expand` passes it)."""
    return Job(population=manifest.population.name, index=index, spec=JobSpec(**spec_values(manifest, index, fixed)))


def planned_job_ids(manifest: Manifest, limit: int | None = None) -> list[str]:
    """The ids of the jobs `expand` gives, in order, without building the models (`lol status` on
    10,000 jobs)."""
    fixed = _Fixed.of(manifest)
    return [hashlib.sha256(canonical_json(values).encode()).hexdigest()[:JOB_ID_LENGTH]
            for _, values in _planned_values(manifest, limit, fixed)]


def planned_count(manifest: Manifest, limit: int | None = None) -> int:
    """How many jobs `expand(manifest, limit)` gives."""
    if manifest.execution.only_splits is None:
        return manifest.count if limit is None else min(limit, manifest.count)
    return len(planned_job_ids(manifest, limit))


def expand(manifest: Manifest, limit: int | None = None) -> Iterator[Job]:
    """Jobs 0..count-1 in order (the first `limit` of them); with `execution.only_splits`, only those whose
    group falls in these published splits (the first `limit` such jobs), indices and ids unchanged."""
    fixed = _Fixed.of(manifest)
    for index, values in _planned_values(manifest, limit, fixed):
        yield Job(population=manifest.population.name, index=index, spec=JobSpec(**values))


def _planned_values(manifest: Manifest, limit: int | None, fixed: _Fixed) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, spec values) of each planned job, in order."""
    wanted = limit if limit is not None else manifest.count
    given = 0
    for index in range(manifest.count):
        if given >= wanted:
            return
        values = spec_values(manifest, index, fixed)
        if _planned(manifest, values["data"]):
            given += 1
            yield index, values


def group_name(data: dict[str, Any]) -> str:
    """The finetuning group of a job's data (`JobSpec.data`): no group ever appears in two splits."""
    if data["kind"] == "identity_groups":
        return f"group:{data['group']}"
    if data["kind"] == "class_subsets":
        return "classes:" + "|".join(sorted(data["classes"]))
    if data["kind"] == "source_subsets":
        return "sources:" + "|".join(sorted(data["sources"]))
    raise ValueError(f"unknown data kind {data['kind']!r} (known: identity_groups, class_subsets, source_subsets)")


def split_of(group: str, fractions: dict[str, float], seed: int | None) -> str:
    """The published split of a group: u = the protocol's hash of the group name
    (`lol_models.split_rule.group_unit`), or with a seed the seeded draw of (seed, group), cut at the
    fractions. With no seed and the protocol's fractions this is exactly the split `lol train` uses."""
    u = group_unit(group) if seed is None else unit_draw(seed, 0, f"split:{group}")
    return split_at(u, fractions)


def _planned(manifest: Manifest, data: dict[str, Any]) -> bool:
    wanted = manifest.execution.only_splits
    return wanted is None or split_of(group_name(data), dict(manifest.publish.splits), manifest.publish.split_seed) in wanted


@dataclass(frozen=True)
class _Fixed:
    """The parts of a manifest every job shares, read once per expansion (not once per job)."""

    base: dict[str, Any]
    hyperparameters: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, manifest: Manifest) -> _Fixed:
        return cls(base=manifest.base.model_dump(mode="json"),
                   hyperparameters=tuple((name, value) for name, value in manifest.hyperparameters if value is not None))


def shard(jobs: list[Job], shard_spec: str | None) -> list[Job]:
    """Jobs of shard `i/n` (1-based i): every n-th job starting at i-1."""
    if not shard_spec:
        return jobs
    try:
        i, n = (int(x) for x in shard_spec.split("/"))
    except ValueError:
        raise ShardError(f"--shard must look like i/n with 1 ≤ i ≤ n (e.g. 2/4), got {shard_spec!r}") from None
    if not 1 <= i <= n:
        raise ShardError(f"--shard must look like i/n with 1 ≤ i ≤ n (e.g. 2/4), got {shard_spec!r}")
    return jobs[i - 1 :: n]

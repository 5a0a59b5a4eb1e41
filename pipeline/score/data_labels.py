"""Scorers that label a LoRA by what it was trained on: attributes, classes, sources.

- `attributes`: for each attribute test, the majority vote over the job's training images
  (1 if more than half pass). A test is `name` (a 0/1 attribute, as CelebA's `Male`) or
  `name=value` / `name=v1|v2` (passes when the image's attribute is one of the values).
- `membership`: one 0/1 label per class of the manifest's `class_subsets`: was it in the data?
- `sources`: one 0/1 label per source of the manifest's `source_subsets`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.data import manifest_source, select_job_examples
from pipeline.data.base import DataSourceError
from pipeline.jobs import Job
from pipeline.manifest import ClassSubsets, Manifest, SourceSubsets
from pipeline.score import ScorerError
from storage import Store


def parse_attribute_test(test: str) -> tuple[str, frozenset[str] | None]:
    """`"shape=circle|triangle"` → ("shape", {"circle", "triangle"}); `"Male"` → ("Male", None)."""
    name, _, values = test.partition("=")
    if not name or (values == "" and "=" in test):
        raise ScorerError(f"attribute test {test!r} must look like NAME, NAME=VALUE or NAME=V1|V2")
    return name, (frozenset(values.split("|")) if values else None)


def passes(value: Any, wanted: frozenset[str] | None) -> bool:
    return bool(int(value)) if wanted is None else str(value) in wanted


class AttributesScorer:
    reads_data_only = True  # setup reads the manifest's data, no model: `lol finetune` checks it up front

    def __init__(self, spec: Any):
        self.spec = spec
        self.tests = [(test, *parse_attribute_test(test)) for test in spec.attributes]

    def setup(self, manifest: Manifest, store: Store) -> None:
        self.examples = manifest_source(manifest).examples(manifest.data.split)
        known: dict[str, set[str]] = {}
        for example in self.examples[:2000]:
            for key, value in example.attributes.items():
                known.setdefault(key, set()).add(str(value))
        for test, name, wanted in self.tests:
            if name not in known:
                raise DataSourceError(f"attribute {name!r} (in {test!r}) is not an attribute of {manifest.data.source!r}; known: {', '.join(sorted(known))}")
            if wanted is not None and not wanted <= known[name]:
                raise DataSourceError(f"{test!r}: {name} takes the values {', '.join(sorted(known[name]))}")
            if wanted is None and not known[name] <= {"0", "1"}:
                raise DataSourceError(f"{test!r}: {name} is not a 0/1 attribute; write {name}=VALUE with one of {', '.join(sorted(known[name]))}")

    def score(self, job: Job, adapter_dir: Path | None = None) -> dict[str, int]:
        examples = select_job_examples(self.examples, job.spec.data, job.spec.seed)
        return {test: int(2 * sum(passes(e.attributes[name], wanted) for e in examples) > len(examples))
                for test, name, wanted in self.tests}


class _InTheData:
    """One 0/1 label per name the manifest's subsets list: was it in this job's data?"""

    reads_data_only = True  # setup reads the manifest's data, no model: `lol finetune` checks it up front

    subsets_type: type = object
    key = ""

    def __init__(self, spec: Any):
        self.spec = spec

    def setup(self, manifest: Manifest, store: Store) -> None:
        if not isinstance(manifest.data.subsets, self.subsets_type):
            kind = self.subsets_type.model_fields["kind"].annotation.__args__[0]
            raise ScorerError(f"the {self.spec.name} scorer needs data.subsets.kind: {kind}")
        self.names = list(getattr(manifest.data.subsets, self.key))

    def score(self, job: Job, adapter_dir: Path | None = None) -> dict[str, int]:
        present = set(job.spec.data[self.key])
        return {name: int(name in present) for name in self.names}


class MembershipScorer(_InTheData):
    subsets_type, key = ClassSubsets, "classes"


class SourcesScorer(_InTheData):
    subsets_type, key = SourceSubsets, "sources"

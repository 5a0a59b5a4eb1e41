"""Job specs for storage tests: spec.json files whose content hashes to their job id, as the store requires."""

from __future__ import annotations

import hashlib
import json


def spec_json(population: str, tag: str) -> tuple[str, str]:
    """(job_id, spec.json text) of a minimal job of `population` (as `pipeline.jobs.Job.to_json` writes it)."""
    spec = {"tag": tag}
    job_id = hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    return job_id, json.dumps({"job_id": job_id, "population": population, "index": 0, "spec": spec}, indent=2, sort_keys=True)


def stored_spec(population, tag: str) -> str:
    """Write a job's spec into `population` (a PopulationStore); returns its job id."""
    job_id, text = spec_json(population.name, tag)
    population.write_spec(job_id, text)
    return job_id

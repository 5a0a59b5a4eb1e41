"""What a population's store holds after a fault: the promises each scenario checks.

`inspect_population` reads the store with a plain `Store` (never a faulty one) and reports, per
planned job: a complete LoRA (its record verifies: `verify_job` == []), a damaged one, nothing,
files without a record (an interrupted commit), a failure record; and for the population:
temporary files of interrupted writes (anywhere in the store), claims (live or expired), and staging folders of dead
workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.finetune import staging
from pipeline.jobs import expand
from pipeline.manifest import Manifest
from storage import Store
from storage.paths import TMP_MARK


@dataclass
class PopulationState:
    planned: list[str]
    verified: list[str] = field(default_factory=list)  # a record, and every file it lists verifies
    damaged: dict[str, list[str]] = field(default_factory=dict)  # job -> problems of its record or files
    missing: list[str] = field(default_factory=list)  # no record
    leftovers: dict[str, list[str]] = field(default_factory=dict)  # job -> files without a record
    failures: dict[str, str] = field(default_factory=dict)  # job -> failed.json reason
    scored: dict[str, list[str]] = field(default_factory=dict)  # scorer id -> jobs with an intact score
    tmp_files: list[str] = field(default_factory=list)  # interrupted writes anywhere in the population
    live_claims: list[str] = field(default_factory=list)
    expired_claims: list[str] = field(default_factory=list)
    dead_staging: list[str] = field(default_factory=list)  # staging folders of dead workers

    @property
    def complete(self) -> bool:
        """Every planned job has exactly one verified LoRA, and nothing else is left behind."""
        return (sorted(self.verified) == sorted(self.planned) and not self.damaged and not self.leftovers
                and not self.tmp_files and not self.live_claims and not self.dead_staging)

    def problems(self) -> list[str]:
        """What keeps the population from being complete, in words."""
        found = []
        if self.missing:
            found.append(f"{len(self.missing)} job(s) without a LoRA: {', '.join(self.missing[:4])}")
        found += [f"{job}: {', '.join(problems[:3])}" for job, problems in self.damaged.items()]
        found += [f"{job}: files without a record ({', '.join(files[:3])})" for job, files in self.leftovers.items()]
        if self.tmp_files:
            found.append(f"temporary files left: {', '.join(self.tmp_files[:4])}")
        if self.live_claims:
            found.append(f"claims still held: {', '.join(self.live_claims[:4])}")
        if self.dead_staging:
            found.append(f"staging folders of dead workers: {', '.join(self.dead_staging[:4])}")
        return found


def inspect_population(manifest: Manifest, store_url: str, tmp_dir: Path | None = None) -> PopulationState:
    """The state of `manifest`'s population in the store at `store_url`.

    `tmp_dir`: the temporary folder the workers used, searched for staging folders of dead
    processes (see `pipeline.finetune.staging`).
    """
    store = Store(store_url, create=False)
    population = store.population(manifest.population.name)
    state = PopulationState(planned=[job.job_id for job in expand(manifest)])
    for job_id in state.planned:
        if population.record(job_id) is None and not store.exists(population.job_rel(job_id, "record.json")):
            state.missing.append(job_id)
            if files := population.leftovers(job_id):
                state.leftovers[job_id] = files
        elif problems := population.verify_job(job_id):
            state.damaged[job_id] = [str(p) for p in problems]
        else:
            state.verified.append(job_id)
        if (failure := population.failure(job_id)) is not None:
            state.failures[job_id] = failure.get("reason", "?")
    for sid in {name.removesuffix(".json") for job_id in state.verified
                for name in store.list_dir(population.job_rel(job_id, "scores"))}:
        state.scored[sid] = [job_id for job_id in state.verified if population.has_score(job_id, sid)]
    state.tmp_files = [path for path in store.list_files("") if TMP_MARK in path]  # anywhere in the store
    state.live_claims = sorted(population.active_claims())
    state.expired_claims = [name for name in store.list_dir(population.rel("claims"))
                            if not name.startswith(".") and TMP_MARK not in name and name not in state.live_claims]
    if tmp_dir is not None:
        state.dead_staging = [str(f) for f in staging.dead_worker_folders(Path(tmp_dir) / staging.ROOT_NAME)]
    return state

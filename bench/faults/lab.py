"""The bench the fault scenarios run on: a smoke population, fresh stores, worker settings, and a
reference run (how long an undisturbed worker takes, and what a complete population holds).

The smoke population is the manifest given (by default `manifests/tiny-shapes.yaml`) with
`SMOKE` overrides: 4 LoRAs of 1 step each, labelled by the `attributes` scorer. Scenarios train
it two ways (`VARIANTS`): in cohorts (the default path) and one job at a time.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.faults import worker
from bench.faults.inject import EventLog
from pipeline.jobs import expand
from pipeline.manifest import Manifest

SMOKE = ("count=4", "hyperparameters.steps=1", "hyperparameters.batch_size=1", "hyperparameters.gradient_accumulation=1",
         "lora.rank=[2, 4]", "data.subsets.num_groups=4", "scorers=[{name: attributes, attributes: [shape=circle]}]")
VARIANTS = {"cohort": ("execution.cohort_size=auto",), "one at a time": ("execution.cohort_size=1",)}
PAGE = 4096  # tmpfs allocates whole pages


@dataclass
class Reference:
    """An undisturbed worker's run of one variant: wall seconds (fork to exit, and from its base
    being set up to its last outcome: the work a kill can interrupt) and the store it left."""

    seconds: float
    work_seconds: float
    store: Path
    bytes: int  # file bytes of the population's folder
    pages: int  # the same in whole pages (what a tmpfs charges)


@dataclass
class FaultLab:
    manifest: str  # manifest path
    overrides: list[str]  # the caller's overrides (e.g. base.ref=PATH), before SMOKE's
    work: Path  # every store, log and temporary folder of the trials goes under here
    lease_s: float = 2.0  # claim lease of the workers: a killed worker's claims expire this soon
    mount: bool = True  # a full disk is a tmpfs where mounting is permitted
    references: dict[str, Reference] = field(default_factory=dict)
    _serial: int = 0

    def overrides_for(self, variant: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
        return (*self.overrides, *SMOKE, *VARIANTS[variant], *extra)

    def load(self, variant: str, extra: tuple[str, ...] = ()) -> Manifest:
        return Manifest.from_yaml(self.manifest, overrides=list(self.overrides_for(variant, extra)))

    def planned(self, variant: str, extra: tuple[str, ...] = ()) -> list[str]:
        return [job.job_id for job in expand(self.load(variant, extra))]

    def folder(self, name: str) -> Path:
        """A fresh folder for one trial (numbered, so names never clash)."""
        self._serial += 1
        path = self.work / f"{self._serial:03d}-{name.replace(' ', '-')}"
        path.mkdir(parents=True)
        return path

    def settings(self, trial_folder: Path, name: str, variant: str, store: Path | None = None,
                 extra: tuple[str, ...] = (), **options: Any) -> worker.WorkerSettings:
        """Settings of worker `name` of a trial: its own folder under the trial's, and the trial's store
        (`trial_folder/store` unless given), event log (`events.jsonl`) and temporary folder (`tmp`)."""
        return worker.WorkerSettings(**{
            "manifest": self.manifest, "overrides": self.overrides_for(variant, extra), "store": str(store or trial_folder / "store"),
            "folder": str(trial_folder / name), "tmp_dir": str(trial_folder / "tmp"), "lease_s": self.lease_s,
            "events": str(trial_folder / "events.jsonl"), "name": name, **options})

    def reference(self, variant: str) -> Reference:
        """The variant's undisturbed run (made once): its duration and complete store."""
        if variant not in self.references:
            worker.warm_up()
            folder = self.folder(f"reference-{variant}")
            settings = self.settings(folder, "reference", variant)
            started = time.monotonic()
            summary = worker.run(settings)
            seconds = time.monotonic() - started
            if summary["failed"] or len(summary["trained"]) != len(self.planned(variant)):
                raise RuntimeError(f"the reference run of {variant!r} did not train every job: {summary}")
            files = [p for p in (folder / "store" / "populations").rglob("*") if p.is_file() and "claims" not in p.parts]
            times = {event["event"]: event["t"] for event in EventLog(settings.events).read()}
            self.references[variant] = Reference(seconds, times["done"] - times["setup"], folder / "store",
                                                 sum(p.stat().st_size for p in files),
                                                 sum(PAGE * math.ceil(p.stat().st_size / PAGE) for p in files))
        return self.references[variant]

    def copy_reference(self, variant: str, trial_folder: Path) -> Path:
        """A copy of the variant's complete store in `trial_folder/store`."""
        shutil.copytree(self.reference(variant).store, trial_folder / "store", symlinks=True)
        return trial_folder / "store"


def trainings(events_file: str | Path) -> dict[str, int]:
    """Trainings begun per job (`train` events of every worker of a trial)."""
    counts: dict[str, int] = {}
    for event in EventLog(events_file).read():
        if event["event"] == "train":
            counts[event["job"]] = counts.get(event["job"], 0) + 1
    return counts

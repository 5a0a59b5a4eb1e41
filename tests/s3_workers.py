"""The fault workers (bench.faults.worker) on an s3:// store: the same processes, forked from
the same warm fork server, handed the S3 endpoint and credentials that the fork server — started
before the S3 server, and shared by every test of a session — may not hold.

`start` replaces `bench.faults.worker.start` for a test (monkeypatched), so the fault scenarios
(`run_scenarios`) run on S3 unchanged; `S3Lab` puts each trial's store in the test bucket.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from s3_server import S3_ENV

from bench.faults import worker
from bench.faults.lab import FaultLab


@dataclass
class S3Lab(FaultLab):
    """A fault lab whose trials keep their store at `{bucket}/{trial folder name}` (an s3:// URL)."""

    bucket: str = ""

    def settings(self, trial_folder: Path, name: str, variant: str, store=None, extra=(), **options) -> worker.WorkerSettings:
        return super().settings(trial_folder, name, variant, store=store or f"{self.bucket}/{trial_folder.name}",
                                extra=extra, **options)


def start(settings: worker.WorkerSettings):
    """`worker.start`, with the S3 endpoint and credentials of the running test server (S3_ENV)."""
    Path(settings.folder).mkdir(parents=True, exist_ok=True)
    Path(settings.tmp_dir).mkdir(parents=True, exist_ok=True)
    process = worker._context().Process(target=main, args=(settings, dict(S3_ENV)),
                                        name=f"lol-fault-worker-{settings.label}", daemon=False)
    process.start()
    return process


def main(settings: worker.WorkerSettings, env: dict[str, str]) -> None:
    """In the forked worker: take up the endpoint and credentials, then be the usual worker."""
    import fsspec.config

    os.environ.update(env)
    fsspec.config.set_conf_env(fsspec.config.conf)  # FSSPEC_S3_ENDPOINT_URL, read at import in the fork server
    worker.main(settings)

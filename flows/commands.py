"""The `lol` commands that need Prefect (`lol run`, `lol deploy`); the CLI imports this lazily.

Everything is checked before a task is submitted: the manifest validates, an API URL
answers, the work pool exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.runtime import sigterm_exits
from storage.errors import DomainError

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO_ROOT / "prefect.yaml"


class OrchestrationError(DomainError):
    """The Prefect side cannot be used as asked (unreachable API, missing work pool…)."""


def check_api(api_url: str, timeout_s: float = 5.0) -> None:
    """Raise OrchestrationError unless a Prefect API answers at `api_url`."""
    import httpx

    try:
        response = httpx.get(api_url.rstrip("/") + "/health", timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise OrchestrationError(f"no Prefect API answers at {api_url} ({type(exc).__name__}); start one with "
                                 "`prefect server start`, or leave --api-url / PREFECT_API_URL unset to run locally") from None
    if response.status_code != 200:
        raise OrchestrationError(f"{api_url}/health answered HTTP {response.status_code}; is this a Prefect API URL (…/api)?")


EPHEMERAL_STARTUP_S = "120"  # Prefect waits 20 s for its temporary server: too little on a busy machine


def use_api(api_url: str | None) -> None:
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if api_url:
        check_api(api_url)
        os.environ["PREFECT_API_URL"] = api_url
    else:  # before prefect is imported in this process (flows.population is imported after this)
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_S)


def run(manifest: str, overrides: list[str], store: str | None, api_url: str | None = None,
        limit: int | None = None, stages: list[str] | None = None, workers: int = 1) -> dict[str, Any]:
    """`run_population` locally (ephemeral Prefect) or against the server at `api_url`."""
    if workers < 1:
        raise OrchestrationError(f"--workers must be ≥ 1, got {workers}")
    use_api(api_url)
    from flows.population import run_population

    with sigterm_exits():  # then Prefect's temporary server is stopped by its exit handler, not orphaned
        return run_population(manifest, overrides, store, limit, stages=stages, workers=workers)


def check_work_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async def read():
        async with get_client() as client:
            await client.read_work_pool(name)

    import asyncio

    try:
        asyncio.run(read())
    except ObjectNotFound:
        raise OrchestrationError(f"work pool {name!r} does not exist on {os.environ.get('PREFECT_API_URL')}; "
                                 f"create it with `prefect work-pool create {name} --type process`") from None


def deploy(api_url: str | None, names: list[str] | None = None, work_pool: str = "gpu") -> list[str]:
    """Apply the deployments of prefect.yaml (`prefect deploy`); returns the deployment names."""
    import yaml

    if not api_url and not os.environ.get("PREFECT_API_URL"):
        raise OrchestrationError("deployments need a Prefect server: pass --api-url http://HOST:4200/api or set PREFECT_API_URL")
    use_api(api_url or os.environ["PREFECT_API_URL"])
    check_work_pool(work_pool)
    declared = [d["name"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]]
    chosen = names or declared
    unknown = sorted(set(chosen) - set(declared))
    if unknown:
        raise OrchestrationError(f"unknown deployment(s) {unknown}; prefect.yaml declares: {', '.join(declared)}")
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    command = [prefect, "--no-prompt", "deploy", *[arg for name in chosen for arg in ("--name", name)]]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ})
    if result.returncode != 0:
        raise OrchestrationError(f"`prefect deploy` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return chosen

"""Orchestration at scale (issue #19 item 3): N jobs through a real `prefect server start`.

`lol bench orchestration --server sqlite|postgres --jobs N --workers W` starts a Prefect server
on loopback (on SQLite, or on a PostgreSQL it initialises and starts in a temporary folder), a
process work pool and W real `prefect worker` processes (`--limit 1` each, one per "GPU"),
deploys `bench/orchestration_flow.py:bench_finetune` and triggers W flow runs, shard i/W each: the
population's `finetune_population` flow, unchanged, with one task per job (`--cohort-size 1`) or
per cohort of K jobs.

To measure orchestration rather than training, the flows train with `FixedTimeTrainer`: a
benchmark fixture that sleeps a fixed time per LoRA and writes a real adapter of the tiny-shapes
layout (to_q / to_v of the tiny UNet, random rank-r factors). It is put in place by
`pipeline.stages.override_trainer` inside the bench's flow; no manifest can select it.

While the population runs, a sampler records every few seconds: LoRAs committed, the server's
RSS (its process tree), the database's size (SQLite file + WAL, or `pg_database_size`) and the
load average. After it: jobs/s (overall and sustained over the middle 80% of commits), the
orchestration overhead per job, task runs the server recorded, flow-run states and failures
(failed.json, worker / server log lines such as SQLite's "database is locked", LoRAs trained twice).

    overhead per job = wall × W / N − seconds per job (wall: first flow-run start → last end), and
    steady overhead per job = (last commit − first commit) / (commits − 1) − seconds per job, per
    worker process (flow start-up excluded), averaged over the workers.

The `library` arm runs the same W shards as W plain `finetune_population` processes (no Prefect),
so the store's and runner's share of the overhead is separated from Prefect's.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.server_settings import DROPPED_EVENTS_LOG, RECOMMENDED_SERVER_ENV

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "manifests" / "tiny-shapes.yaml"
RESULTS = ROOT / "bench" / "results"
POOL = "lol-bench"
FLOW_ENTRYPOINT = "bench/orchestration_flow.py:bench_finetune"
SERVERS = ("sqlite", "postgres")
MODULES_ENV = "LOL_BENCH_TINY_MODULES"  # {module: [in, out]} of the tiny UNet's LoRA targets, set by the bench
TRAINED_LOG_ENV = "LOL_BENCH_TRAINED_LOG"  # FixedTimeTrainer appends each job id it trains here (exactly-once check)
FAILURE_PATTERNS = {"database is locked": r"database is locked", "traceback": r"^Traceback", "crashed": r"Crashed|CRASHED",
                    "http 5xx": r"HTTP/1\.1\" 5\d\d|Server error '5\d\d",
                    # flows.population.with_api_retries running a unit or stage again
                    "api unavailable, run again": r"the Prefect API is unavailable",
                    # the server's in-memory message queue overflowed: a task run or event it never records
                    "events dropped by the server": DROPPED_EVENTS_LOG}


# ---------------------------------------------------------------- the bench-only trainer


@dataclass
class FixedTask:
    key: str  # the job id, as `run_cohort` expects of a cohort task
    job: Any
    out_dir: Path


class FixedTimeTrainer:
    """Benchmark fixture: 'trains' a LoRA by sleeping `seconds` and writes a real tiny-shapes adapter.

    A cohort of K sleeps K × `seconds` (the same time per LoRA), so cohorts change only what
    orchestration costs. Never selectable from a manifest: the bench installs it with
    `pipeline.stages.override_trainer`.
    """

    member_bytes = None  # no cohort-size cap from memory

    def __init__(self, seconds: float):
        import torch

        self.seconds = seconds
        self.device = torch.device("cpu")
        self.modules: dict[str, tuple[int, int]] = {}

    def setup(self, manifest, store) -> None:
        if os.environ.get(MODULES_ENV):  # the bench works the shapes out once, not in every worker (diffusers' import: seconds)
            self.modules = {name: tuple(shape) for name, shape in json.loads(os.environ[MODULES_ENV]).items()}
            return
        from bench.measure import tiny_modules

        self.modules = tiny_modules()

    def run(self, job, out_dir: Path) -> dict[str, Any]:
        time.sleep(self.seconds)
        return self._save(job, Path(out_dir), 1)

    def cohort_task(self, job, out_dir: Path) -> FixedTask:
        return FixedTask(job.job_id, job, Path(out_dir))

    def train_cohort(self, tasks: Sequence[FixedTask]) -> dict[str, dict[str, Any] | Exception]:
        time.sleep(self.seconds * len(tasks))
        return {task.key: self._save(task.job, task.out_dir, len(tasks)) for task in tasks}

    def _save(self, job, out_dir: Path, cohort: int) -> dict[str, Any]:
        import numpy as np
        from safetensors.numpy import save_file

        rank = job.spec.rank
        rng = np.random.default_rng(job.spec.seed)
        tensors = {}
        for name, (n_in, n_out) in self.modules.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = rng.standard_normal((rank, n_in), dtype=np.float32)
            tensors[f"base_model.model.{name}.lora_B.weight"] = rng.standard_normal((n_out, rank), dtype=np.float32) * 0.01
        adapter = out_dir / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
        (adapter / "adapter_config.json").write_text(json.dumps({
            "r": rank, "lora_alpha": job.spec.alpha, "peft_type": "LORA", "target_modules": list(job.spec.target_modules)}))
        if os.environ.get(TRAINED_LOG_ENV):
            with open(os.environ[TRAINED_LOG_ENV], "a", encoding="utf-8") as log:
                log.write(job.job_id + "\n")
        return {"bench": "fixed-time", "train_seconds": self.seconds, "cohort": cohort, "pid": os.getpid()}


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _wait(condition, timeout_s: float, what: str, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _stop(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM the process group started for `process`, SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


class Postgres:
    """A PostgreSQL (Debian's package) on 127.0.0.1 with its data in `folder`; run as user postgres under root."""

    def __init__(self, work: Path):
        # its own temp folder (not under `work`, whose 0700 root-owned parents user postgres cannot enter)
        self.folder = Path(tempfile.mkdtemp(prefix="lol-bench-postgres-"))
        self.log_copy = work / "postgres.log"
        self.data = self.folder / "pgdata"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.database = "prefect"

    @staticmethod
    def missing() -> str | None:
        """Why PostgreSQL cannot start here, or None."""
        for tool in ("initdb", "pg_ctl", "psql"):
            if not shutil.which(tool):
                return f"{tool} not found (apt-get install postgresql)"
        if os.geteuid() == 0 and not shutil.which("runuser"):
            return "running as root and runuser is missing (initdb refuses root)"
        return None

    def _run(self, *args: str) -> str:
        done = subprocess.run([*self.as_user, *args], capture_output=True, text=True, cwd=self.folder)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` exited {done.returncode}: {done.stderr[-2000:]}")
        return done.stdout

    def start(self) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "postgres.log"), "-w", "-t", "60",
                  "-o", f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c max_connections=200", "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", self.database)
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{self.database}"

    def size_bytes(self) -> int | None:
        try:
            out = self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-tAc",
                            f"select pg_database_size('{self.database}')", self.database)
            return int(out.strip())
        except (RuntimeError, ValueError):
            return None

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        with contextlib.suppress(OSError):
            shutil.copyfile(self.folder / "postgres.log", self.log_copy)
        shutil.rmtree(self.folder, ignore_errors=True)


class Cluster:
    """`prefect server start` (SQLite or PostgreSQL), a process work pool and W workers, in `work`."""

    def __init__(self, work: Path, server: str, workers: int, extra_env: dict[str, str] | None = None,
                 server_env: dict[str, str] | None = None):
        """`server_env`: settings of the server alone (flows.server_settings.RECOMMENDED_SERVER_ENV, or {} for Prefect's defaults)."""
        self.work, self.server, self.workers, self.extra_env = work, server, workers, dict(extra_env or {})
        self.server_env = dict(RECOMMENDED_SERVER_ENV if server_env is None else server_env)
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.postgres = Postgres(work) if server == "postgres" else None
        self.sqlite = work / "prefect.db"
        self.processes: dict[str, subprocess.Popen] = {}
        self.env: dict[str, str] = {}

    def start(self) -> float:
        """Start everything; the seconds until the server answered."""
        started = time.perf_counter()
        url = self.postgres.start() if self.postgres else f"sqlite+aiosqlite:///{self.sqlite}"
        home = self.work / "prefect-home"
        home.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_API_DATABASE_CONNECTION_URL": url, "PREFECT_API_URL": self.api_url,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "PREFECT_WORKER_QUERY_SECONDS": "2", "LOL_TORCH_THREADS": "1", **self.extra_env}
        self.processes["server"] = self._popen("server", [_bin("prefect"), "server", "start", "--host", "127.0.0.1",
                                                          "--port", str(self.port)], self.server_env)
        _wait(self._healthy, 300, "the Prefect server")
        server_s = time.perf_counter() - started
        self._prefect("work-pool", "create", POOL, "--type", "process")
        for i in range(self.workers):
            self.processes[f"worker-{i + 1}"] = self._popen(f"worker-{i + 1}", [
                _bin("prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1", "--name", f"bench-{i + 1}"])
        return server_s

    def _popen(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "w")  # noqa: SIM115 (kept open for the child's life)
        return subprocess.Popen(args, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)

    def _prefect(self, *args: str) -> None:
        subprocess.run([_bin("prefect"), *args], env=self.env, check=True, capture_output=True, cwd=ROOT)

    def _healthy(self) -> bool:
        import httpx

        if self.processes["server"].poll() is not None:
            raise RuntimeError(f"the Prefect server exited: {(self.work / 'server.log').read_text()[-2000:]}")
        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def server_rss_mb(self) -> float | None:
        import psutil

        try:
            parent = psutil.Process(self.processes["server"].pid)
            return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]) / 2**20
        except psutil.Error:
            return None

    def server_cpu_s(self) -> float | None:
        """CPU seconds (user + system) the server's process tree has used so far (Postgres not included)."""
        import psutil

        try:
            parent = psutil.Process(self.processes["server"].pid)
            times = [p.cpu_times() for p in [parent, *parent.children(recursive=True)]]
            return sum(t.user + t.system for t in times)
        except psutil.Error:
            return None

    def event_settings(self) -> dict[str, Any]:
        """How the running server records events, as it answers (`GET /admin/settings`): what reached it."""
        import httpx

        services = httpx.get(f"{self.api_url}/admin/settings", timeout=30).json()["server"]["services"]
        return {"task_run_recorder": {k: services["task_run_recorder"][k] for k in ("batch_size", "flush_interval")},
                "event_persister": {k: services["event_persister"][k] for k in ("batch_size", "flush_interval", "queue_max_size")}}

    def task_runs_recorded(self) -> int | None:
        """Task runs the server has written so far (it records them from the clients' events, asynchronously)."""
        import httpx

        try:
            return int(httpx.post(f"{self.api_url}/task_runs/count", json={}, timeout=10).json())
        except (httpx.HTTPError, ValueError, TypeError):
            return None

    def database_bytes(self) -> int | None:
        if self.postgres:
            return self.postgres.size_bytes()
        return sum(p.stat().st_size for p in self.work.glob("prefect.db*")) or None

    def log_failures(self) -> dict[str, dict[str, Any]]:
        """Per log file: how many lines match each failure pattern, and its ERROR lines by logger and message start."""
        counts: dict[str, dict[str, Any]] = {}
        for log in sorted(self.work.glob("*.log")):
            text = log.read_text(errors="replace")
            counts[log.stem] = {name: len(re.findall(pattern, text, re.M)) for name, pattern in FAILURE_PATTERNS.items()}
            errors = re.findall(r"^[\d:.]+ \| ERROR +\| (.{0,90})", text, re.M)
            counts[log.stem]["errors"] = {line: errors.count(line) for line in sorted(set(errors))}
            lines, examples = text.splitlines(), {}
            for i, line in enumerate(lines):  # the first of each kind, with what follows it (its traceback)
                kind = re.match(r"^[\d:.]+ \| ERROR +\| (.{0,90})", line)
                if kind and kind.group(1) not in examples:
                    examples[kind.group(1)] = "\n".join(lines[i:i + 60])[-6000:]
            counts[log.stem]["error_examples"] = examples
        return counts

    def stop(self) -> None:
        workers = [p for n, p in self.processes.items() if n != "server"]
        for process in workers:  # signal every worker first, then wait: each may take its flow run's time to stop
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in workers:
            _stop(process)
        if "server" in self.processes:
            _stop(self.processes["server"])
        if self.postgres:
            self.postgres.stop()


# ---------------------------------------------------------------- the runs


def _count_records(jobs_dir: Path) -> int:
    try:
        return sum(1 for entry in os.scandir(jobs_dir) if os.path.exists(os.path.join(entry.path, "record.json")))
    except FileNotFoundError:
        return 0


class Sampler:
    """Every `every_s`: seconds, LoRAs committed, server RSS, database bytes, load average."""

    def __init__(self, jobs_dir: Path, cluster: Cluster | None, every_s: float):
        self.jobs_dir, self.cluster, self.every_s = jobs_dir, cluster, every_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.started = time.time()

    def sample(self) -> dict[str, Any]:
        row = {"t": round(time.time() - self.started, 2), "done": _count_records(self.jobs_dir),
               "load1": round(os.getloadavg()[0], 2)}
        if self.cluster:
            rss, size, cpu = self.cluster.server_rss_mb(), self.cluster.database_bytes(), self.cluster.server_cpu_s()
            row.update(server_rss_mb=round(rss, 1) if rss else None, db_mb=round(size / 2**20, 2) if size else None,
                       server_cpu_s=round(cpu, 2) if cpu is not None else None, task_runs=self.cluster.task_runs_recorded())
        self.samples.append(row)
        return row

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def sustained_rate(samples: list[dict[str, Any]], total: int) -> float | None:
    """Jobs per second between the samples where 10% and 90% of `total` were committed."""
    lo = next((s for s in samples if s["done"] >= 0.1 * total), None)
    hi = next((s for s in samples if s["done"] >= 0.9 * total), None)
    if not lo or not hi or hi["t"] <= lo["t"]:
        return None
    return (hi["done"] - lo["done"]) / (hi["t"] - lo["t"])


def _overrides(jobs: int, cohort_size: int) -> list[str]:
    return [f"count={jobs}", f"execution.cohort_size={cohort_size}"]


def _store_outcome(store: Path, jobs: int, trained_logs: list[Path]) -> dict[str, Any]:
    jobs_dir = store / "populations" / "tiny-shapes" / "jobs"
    trained = [line for log in trained_logs if log.exists() for line in log.read_text().split()]
    failed = sum(1 for e in os.scandir(jobs_dir) if os.path.exists(os.path.join(e.path, "failed.json"))) if jobs_dir.exists() else 0
    return {"records": _count_records(jobs_dir), "failed_json": failed, "trainings": len(trained),
            "trained_twice": len(trained) - len(set(trained)), "planned": jobs, **_steady_seconds_per_job(jobs_dir)}


def _steady_seconds_per_job(jobs_dir: Path) -> dict[str, Any]:
    """Per worker process (the records' `pid`): (last commit − first commit) / (commits − 1), the time a
    job takes once the flow has started (start-up excluded); averaged over the workers."""
    by_pid: dict[int, list[float]] = {}
    for entry in os.scandir(jobs_dir) if jobs_dir.exists() else []:
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads(Path(entry.path, "record.json").read_text())
            by_pid.setdefault(record["metrics"]["pid"], []).append(record["committed_at"])
    spans = [(max(t) - min(t)) / (len(t) - 1) for t in by_pid.values() if len(t) > 1]
    return {"steady_s_per_job_per_worker": round(sum(spans) / len(spans), 4) if spans else None,
            "worker_processes": len(by_pid)}


def run_library(work: Path, jobs: int, workers: int, cohort_size: int, job_seconds: float, every_s: float) -> dict[str, Any]:
    """The W shards as W plain library processes (`finetune_population`, no Prefect)."""
    store = work / "store"
    logs = [work / f"trained-{i + 1}.txt" for i in range(workers)]
    started = time.time()
    with Sampler(store / "populations" / "tiny-shapes" / "jobs", None, every_s) as sampler:
        children = [subprocess.Popen([sys.executable, "-m", "bench.orchestration", "library", str(store), str(jobs),
                                      f"{i + 1}/{workers}", str(cohort_size), str(job_seconds)], cwd=ROOT,
                                     env={**os.environ, TRAINED_LOG_ENV: str(logs[i]), "LOL_TORCH_THREADS": "1",
                                          "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(workers)]
        outputs = [child.communicate()[0] for child in children]
    codes = [child.returncode for child in children]
    spans = [json.loads(out.strip().splitlines()[-1]) for out, code in zip(outputs, codes) if code == 0]
    if not spans:
        raise RuntimeError(f"library shards failed: {outputs[0][-2000:]}")
    wall = max(s["end"] for s in spans) - min(s["start"] for s in spans)
    return {"arm": "library", "wall_s": round(wall, 2), "total_s": round(time.time() - started, 2), "exit_codes": codes,
            "samples": sampler.samples, **_store_outcome(store, jobs, logs)}


def _library_child(store: str, jobs: int, shard_spec: str, cohort_size: int, job_seconds: float) -> None:
    from pipeline.finetune.runner import finetune_population
    from pipeline.manifest import Manifest
    from storage import Store

    manifest = Manifest.from_yaml(MANIFEST, overrides=_overrides(jobs, cohort_size))
    target = Store(store)
    target.population(manifest.population.name).write_manifest(MANIFEST.read_text())
    start = time.time()
    summary = finetune_population(manifest, target, lambda: FixedTimeTrainer(job_seconds), shard_spec=shard_spec)
    print(json.dumps({"start": start, "end": time.time(), "trained": len(summary.trained), "failed": len(summary.failed)}))


async def _deploy_and_trigger(cluster: Cluster, store: Path, jobs: int, cohort_size: int, job_seconds: float) -> list[str]:
    from prefect import Flow
    from prefect.client.orchestration import get_client

    # by its entrypoint: bench/orchestration_flow.py imports this module, so this one does not import it
    flow = await Flow.from_source(source=str(ROOT), entrypoint=FLOW_ENTRYPOINT)
    deployment_id = await flow.deploy(name="bench", work_pool_name=POOL, build=False, push=False, print_next_steps=False)
    ids = []
    async with get_client() as client:
        for i in range(cluster.workers):
            run = await client.create_flow_run_from_deployment(deployment_id, parameters={
                "manifest": str(MANIFEST), "overrides": _overrides(jobs, cohort_size), "store": str(store),
                "shard_spec": f"{i + 1}/{cluster.workers}", "job_seconds": job_seconds})
            ids.append(str(run.id))
    return ids


async def _flow_runs(ids: list[str]) -> list[dict[str, Any]]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        runs = [await client.read_flow_run(run_id) for run_id in ids]
    return [{"id": str(r.id), "state": r.state_type.value if r.state_type else None,
             "start": r.start_time.timestamp() if r.start_time else None, "end": r.end_time.timestamp() if r.end_time else None,
             "message": (r.state.message or "")[:300] if r.state else ""} for r in runs]


def _task_run_counts(api_url: str) -> dict[str, int]:
    """Task runs the server holds: in all and by state type."""
    import httpx

    counts = {"total": httpx.post(f"{api_url}/task_runs/count", json={}, timeout=60).json()}
    for state in ("COMPLETED", "FAILED", "CRASHED", "RUNNING", "PENDING"):
        counts[state.lower()] = httpx.post(f"{api_url}/task_runs/count", timeout=60,
                                           json={"task_runs": {"state": {"type": {"any_": [state]}}}}).json()
    return counts


@contextlib.contextmanager
def _client_of(api_url: str):
    """This process's Prefect client talks to `api_url` (settings are cached: setting the variable is not enough
    once a first arm has run)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def run_prefect(work: Path, server: str, jobs: int, workers: int, cohort_size: int, job_seconds: float,
                every_s: float, timeout_s: float, server_env: dict[str, str] | None = None) -> dict[str, Any]:
    """One arm: a fresh server and database, W workers, W flow runs (shards) of `jobs` jobs. `server_env`:
    the server's settings (None: flows.server_settings.RECOMMENDED_SERVER_ENV; {}: Prefect's defaults)."""
    import asyncio

    store = work / "store"
    logs = [work / "trained.txt"]
    cluster = Cluster(work, server, workers, {TRAINED_LOG_ENV: str(logs[0])}, server_env)
    with contextlib.ExitStack() as stack:
        stack.callback(cluster.stop)
        server_s = cluster.start()
        event_settings = cluster.event_settings()
        stack.enter_context(_client_of(cluster.api_url))
        triggered = time.time()
        with Sampler(store / "populations" / "tiny-shapes" / "jobs", cluster, every_s) as sampler:
            ids = asyncio.run(_deploy_and_trigger(cluster, store, jobs, cohort_size, job_seconds))
            terminal = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
            deadline = time.monotonic() + timeout_s
            runs = asyncio.run(_flow_runs(ids))
            while not all(r["state"] in terminal for r in runs) and time.monotonic() < deadline:
                time.sleep(2)
                runs = asyncio.run(_flow_runs(ids))
            flows_done = time.time()
            # the server records task runs from the clients' events, asynchronously: wait until it has caught up
            # (the count stops growing for 20 s), at most `drain_s`
            last, still_since = -1, time.monotonic()
            while time.monotonic() - still_since < 20 and time.monotonic() < deadline:
                time.sleep(every_s)
                count = cluster.task_runs_recorded()
                if count != last:
                    last, still_since = count, time.monotonic()
            drained = time.time()
        starts = [r["start"] for r in runs if r["start"]]
        ends = [r["end"] for r in runs if r["end"]]
        wall = (max(ends) - min(starts)) if starts and len(ends) == len(runs) else None
        tasks = _task_run_counts(cluster.api_url)
        tasks["recorded_when_flows_ended"] = next((s.get("task_runs") for s in reversed(sampler.samples)
                                                   if s["t"] <= flows_done - sampler.started), None)
        tasks["caught_up_s_after_flows_ended"] = round(drained - 20 - flows_done, 1)
        result = {"arm": f"prefect-{server}", "server_env": cluster.server_env, "server_event_settings": event_settings, "server_start_s": round(server_s, 2), "wall_s": round(wall, 2) if wall else None,
                  "total_s": round(time.time() - triggered, 2), "first_flow_start_after_trigger_s":
                  round(min(starts) - triggered, 2) if starts else None, "flow_runs": runs, "task_runs": tasks,
                  "timed_out": not all(r["state"] in terminal for r in runs), "samples": sampler.samples}
    result["log_failures"] = cluster.log_failures()
    result.update(_store_outcome(store, jobs, logs))
    return result


def summarise(result: dict[str, Any], jobs: int, workers: int, job_seconds: float) -> dict[str, Any]:
    """jobs/s, sustained jobs/s and the overhead per job (ms) of one arm's result."""
    wall = result.get("wall_s")
    out = {"jobs_per_s": round(jobs / wall, 2) if wall else None,
           "sustained_jobs_per_s": (round(r, 2) if (r := sustained_rate(result["samples"], jobs)) else None),
           "overhead_ms_per_job": round(1000 * (wall * workers / jobs - job_seconds), 1) if wall else None,
           "steady_overhead_ms_per_job": round(1000 * (steady - job_seconds), 1)
           if (steady := result.get("steady_s_per_job_per_worker")) else None}
    rss = [s["server_rss_mb"] for s in result["samples"] if s.get("server_rss_mb")]
    db = [s["db_mb"] for s in result["samples"] if s.get("db_mb")]
    if rss:
        out.update(server_rss_mb_start=rss[0], server_rss_mb_peak=max(rss), server_rss_mb_end=rss[-1])
    if db:
        out.update(db_mb_start=db[0], db_mb_end=db[-1])
    cpu = [s["server_cpu_s"] for s in result["samples"] if s.get("server_cpu_s") is not None]
    tasks = (result.get("task_runs") or {}).get("total")
    if len(cpu) > 1 and tasks:  # the server's CPU per task run it recorded (flow runs and heartbeats included)
        out.update(server_cpu_s=round(cpu[-1] - cpu[0], 1), server_cpu_ms_per_task_run=round(1000 * (cpu[-1] - cpu[0]) / tasks, 1),
                   server_cpu_ms_per_job=round(1000 * (cpu[-1] - cpu[0]) / jobs, 1))
    recorded = [(s["t"], s["task_runs"]) for s in result["samples"] if s.get("task_runs")]
    if len(recorded) > 1 and recorded[-1][0] > recorded[0][0]:  # how fast the server wrote task runs, backlog included
        out["server_task_runs_recorded_per_s"] = round((recorded[-1][1] - recorded[0][1]) / (recorded[-1][0] - recorded[0][0]), 2)
    loads = [s["load1"] for s in result["samples"]]
    out["load1_mean"] = round(sum(loads) / len(loads), 2) if loads else None
    return out


def bench_server(server: str, jobs: int, workers: int, cohort_sizes: Sequence[int], job_seconds: float,
                 library: bool = True, every_s: float = 5.0, timeout_s: float = 4 * 3600,
                 work_dir: Path | None = None, out_dir: Path = RESULTS, on_arm=None,
                 server_env: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], Path]:
    """Every arm (the library baseline, then the Prefect server) for each cohort size; the rows and the JSON written.
    `server_env`: the Prefect server's settings (None: the recommended ones; {}: Prefect's defaults)."""
    if not os.environ.get(MODULES_ENV):
        from bench.measure import tiny_modules

        os.environ[MODULES_ENV] = json.dumps(tiny_modules())  # children and workers inherit it
    arms: list[dict[str, Any]] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"orchestration-{server}-{jobs}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    for cohort_size in cohort_sizes:
        for kind in (["library"] if library else []) + [server]:
            with tempfile.TemporaryDirectory(prefix=f"lol-bench-orch-{kind}-", dir=work_dir) as tmp:
                work = Path(tmp)
                if kind == "library":
                    result = run_library(work, jobs, workers, cohort_size, job_seconds, every_s)
                elif kind == "postgres" and (why := Postgres.missing()):
                    result = {"arm": "prefect-postgres", "skipped": why, "samples": []}
                else:
                    result = run_prefect(work, kind, jobs, workers, cohort_size, job_seconds, every_s, timeout_s, server_env)
            row = {"cohort_size": cohort_size, **result, "summary": summarise(result, jobs, workers, job_seconds)
                   if "skipped" not in result else {}}
            arms.append(row)
            _write(path, server, jobs, workers, cohort_sizes, job_seconds, arms)  # after every arm: a later crash keeps these
            if on_arm:
                on_arm(row)
    return arms, path


def _write(path: Path, server: str, jobs: int, workers: int, cohort_sizes: Sequence[int], job_seconds: float,
           arms: list[dict[str, Any]]) -> None:
    payload = {"benchmark": "orchestration-server", "settings": {"server": server, "jobs": jobs, "workers": workers,
               "cohort_sizes": list(cohort_sizes), "job_seconds": job_seconds, "manifest": str(MANIFEST.relative_to(ROOT))},
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                           "load_at_start": os.getloadavg()}, "measured_at": time.time(), "arms": arms}
    path.write_text(json.dumps(payload, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "library":
        store, jobs, shard_spec, cohort_size, job_seconds = args[1:6]
        _library_child(store, int(jobs), shard_spec, int(cohort_size), float(job_seconds))
        return 0
    raise SystemExit("usage: python -m bench.orchestration library STORE JOBS SHARD COHORT SECONDS (use `lol bench orchestration`)")


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["FixedTimeTrainer", "Cluster", "Postgres", "bench_server", "summarise", "SERVERS"]

"""Benchmarks behind `lol bench …`: throughput and memory, measured in fresh processes.

Every measurement runs the real CLI in a child process (so start-up, imports and base
loading count, and peak memory is the child's own `ru_maxrss`), writes a JSON file under
`bench/results/` and returns rows for a table. Modes:

- finetune / score `sequential`: one process trains (scores) all N LoRAs, base loaded once;
- finetune / score `process`: one process per LoRA, reloading the base each time — how the
  paper's shell loops ran;
- `orchestration`: the same population through the library directly and through the
  Prefect flows (ephemeral server), to measure what orchestration costs.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path("bench/results")


@dataclass
class Measurement:
    benchmark: str
    mode: str
    loras: int
    seconds: float
    peak_rss_mb: float
    processes: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def loras_per_hour(self) -> float:
        return 3600 * self.loras / self.seconds if self.seconds else 0.0


def run_child(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of that child, output) of one child process; raises on failure."""
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    if process.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` exited {process.returncode}:\n{output[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, output


def _lol() -> list[str]:
    return [sys.executable, "-m", "pipeline.cli"]


def bench_finetune(manifest: str, overrides: list[str], count: int, modes: list[str]) -> list[Measurement]:
    """Finetune `count` LoRAs of `manifest` in each mode, each into a fresh store."""
    results = []
    overrides = [*overrides, f"count={count}"]
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix=f"lol-bench-{mode}-") as store:
            _warm_bases(manifest, overrides, store, scorers=False)
            if mode == "sequential":
                seconds, peak, _ = run_child([*_lol(), "finetune", manifest, *overrides, "--store", store])
                processes = 1
            elif mode == "process":
                seconds, peak = 0.0, 0.0
                for k in range(count):  # each process finds the first k done and trains job k
                    s, p, _ = run_child([*_lol(), "finetune", manifest, *overrides, "--store", store, "--limit", str(k + 1)])
                    seconds, peak = seconds + s, max(peak, p)
                processes = count
            else:
                raise ValueError(f"unknown finetune mode {mode!r}; modes: sequential, process")
            results.append(Measurement("finetune", mode, count, round(seconds, 2), round(peak, 1), processes))
    return results


def bench_score(manifest: str, overrides: list[str], count: int, modes: list[str]) -> list[Measurement]:
    """Score `count` finetuned LoRAs in each mode (finetuning them first, untimed)."""
    results = []
    overrides = [*overrides, f"count={count}"]
    with tempfile.TemporaryDirectory(prefix="lol-bench-score-") as base_store:
        _warm_bases(manifest, overrides, base_store)
        run_child([*_lol(), "finetune", manifest, *overrides, "--store", base_store])
        for mode in modes:
            with tempfile.TemporaryDirectory(prefix=f"lol-bench-score-{mode}-") as store:
                import shutil

                shutil.copytree(base_store, store, dirs_exist_ok=True)
                _drop_scores(Path(store))
                if mode == "sequential":
                    seconds, peak, _ = run_child([*_lol(), "score", manifest, *overrides, "--store", store])
                    processes = 1
                elif mode == "process":
                    seconds, peak = 0.0, 0.0
                    for k in range(count):
                        s, p, _ = run_child([*_lol(), "score", manifest, *overrides, "--store", store, "--limit", str(k + 1)])
                        seconds, peak = seconds + s, max(peak, p)
                    processes = count
                else:
                    raise ValueError(f"unknown score mode {mode!r}; modes: sequential, process")
                results.append(Measurement("score", mode, count, round(seconds, 2), round(peak, 1), processes))
    return results


def bench_orchestration(manifest: str, overrides: list[str], count: int) -> list[Measurement]:
    """The same population through the library (`lol finetune/score/publish`) and through `lol run`."""
    overrides = [*overrides, f"count={count}"]
    results = []
    with tempfile.TemporaryDirectory(prefix="lol-bench-direct-") as store:
        _warm_bases(manifest, overrides, store)
        seconds = peak = 0.0
        for stage in ("finetune", "score", "publish"):
            s, p, _ = run_child([*_lol(), stage, manifest, *overrides, "--store", store])
            seconds, peak = seconds + s, max(peak, p)
        results.append(Measurement("orchestration", "library (3 processes)", count, round(seconds, 2), round(peak, 1), 3))
    with tempfile.TemporaryDirectory(prefix="lol-bench-flow-") as store:
        _warm_bases(manifest, overrides, store)
        env = {"PREFECT_HOME": tempfile.mkdtemp(prefix="lol-bench-prefect-"), "PREFECT_API_URL": ""}
        seconds, peak, output = run_child([*_lol(), "run", manifest, *overrides, "--store", store], env=env)
        server_start = _server_start_seconds(output)
        results.append(Measurement("orchestration", "prefect flows (ephemeral)", count, round(seconds, 2), round(peak, 1), 1,
                                   {"ephemeral_server_start_s": server_start}))
    return results


def _server_start_seconds(output: str) -> float | None:
    """Seconds between 'Starting temporary server' and the first flow-run log line, if both appear."""
    import re

    stamps = re.findall(r"^(\d\d):(\d\d):(\d\d)\.(\d+) \| .*?(Starting temporary server|Beginning flow run|Created flow run)", output, re.M)
    if len(stamps) < 2:
        return None
    to_s = [int(h) * 3600 + int(m) * 60 + int(s) + float(f"0.{frac}") for h, m, s, frac, _ in stamps[:2]]
    return round(to_s[1] - to_s[0], 2)


def _warm_bases(manifest: str, overrides: list[str], store: str, scorers: bool = True) -> None:
    """Build or copy the tiny bases into `store` before timing (the cache makes this instant later)."""
    from pipeline.manifest import Manifest

    loaded = Manifest.from_yaml(manifest, overrides=overrides)
    if loaded.base.ref.startswith("tiny:"):
        run_child([*_lol(), "bases", "build", loaded.base.ref.removeprefix("tiny:"), "--size", loaded.base.size, "--store", store])
    for spec in loaded.scorers if scorers else []:
        model = getattr(spec, "model", "")
        if model.startswith("tiny:"):
            run_child([*_lol(), "bases", "build", model.removeprefix("tiny:"), "--size", spec.size, "--store", store])


def _drop_scores(store: Path) -> None:
    for scores in store.glob("populations/*/jobs/*/scores"):
        for file in scores.iterdir():
            file.unlink()


def write_results(name: str, measurements: list[Measurement], settings: dict[str, Any], out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    payload = {"benchmark": name, "settings": settings, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
               "python": platform.python_version()}, "measured_at": time.time(),
               "results": [{**asdict(m), "loras_per_hour": round(m.loras_per_hour, 1)} for m in measurements]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path

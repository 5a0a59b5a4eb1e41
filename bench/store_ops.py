"""Store operations at scale (issue #19 item 4): `lol status`, `lol verify`, `lol publish --no-push`
on a population of N stored records, on a local disk and on a loopback S3 (SeaweedFS's or moto's server).

Writes a store of N committed, scored LoRAs of manifests/tiny-shapes.yaml (`count=N`): random
factors in the tiny diffusion UNet's layout (to_q/to_v, rank 4), committed with sealed records and
scores through the library as the finetune and score stages leave them (fsync is skipped while the
fixture store is written: it is the reads that are measured). The S3 store is the same folder
uploaded to a bucket of an S3 server on loopback (tests/s3_server.py: SeaweedFS by default, a real
S3 server written in Go; or moto, Python, whose own CPU dominates its figures), byte for byte.

Each command then runs in a fresh process; its wall seconds, CPU seconds (user + system) and
peak RSS (`os.wait4`'s ru_maxrss) are recorded. Stores are written and uploaded in child
processes too, so the measuring process stays small (a forked child's peak RSS counts its
parent's pages from before `exec`).

    python -m bench.store_ops WORK_DIR --local 10000 100000 --s3 10000 [--s3-server seaweedfs|moto]
        → bench/results/store-ops-<timestamp>.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "manifests" / "tiny-shapes.yaml"
COMMANDS = ("status", "verify", "publish")
RESULTS = ROOT / "bench" / "results"


@contextlib.contextmanager
def _no_fsync():
    """Skip fsync while the fixture store is written (a bench store needs no crash safety)."""
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def write_store(folder: Path, count: int, seed: int = 0) -> float:
    """A local store holding `count` committed, scored tiny-shapes LoRAs; returns the seconds it took.

    Job 0 goes through the library (`write_spec`, `commit`, `write_score`); the others are written
    as plain files in exactly the bytes the library writes (spec, adapter, sealed record and
    scores), which is ~10× faster. `lol verify` on the store (exit 0) checks every one of them.
    """
    import numpy as np
    from safetensors.numpy import save

    from bench.measure import tiny_modules
    from pipeline.jobs import expand
    from pipeline.manifest import Manifest
    from pipeline.score import scorer_id
    from storage import Store
    from storage.paths import sha256_bytes
    from storage.seal import seal

    started = time.perf_counter()
    manifest = Manifest.from_yaml(MANIFEST, overrides=[f"count={count}"])
    store = Store(str(folder))
    population = store.population(manifest.population.name)
    population.write_manifest(MANIFEST.read_text())
    rng = np.random.default_rng(seed)
    modules = tiny_modules()
    sids = [(spec.name, scorer_id(spec)) for spec in manifest.scorers]
    jobs_dir = store.local_path(population.rel("jobs"))
    with tempfile.TemporaryDirectory() as tmp, _no_fsync():
        staged = Path(tmp) / "adapter-stage"
        (staged / "adapter").mkdir(parents=True)
        for n, job in enumerate(expand(manifest)):
            rank = job.spec.rank
            config = json.dumps({"r": rank, "lora_alpha": job.spec.alpha, "peft_type": "LORA",
                                 "target_modules": list(job.spec.target_modules)}).encode()
            tensors = {}
            for name, (n_in, n_out) in modules.items():
                tensors[f"base_model.model.{name}.lora_A.weight"] = rng.standard_normal((rank, n_in), dtype=np.float32)
                tensors[f"base_model.model.{name}.lora_B.weight"] = rng.standard_normal((n_out, rank), dtype=np.float32) * 0.01
            adapter = {"adapter/adapter_config.json": config, "adapter/adapter_model.safetensors": save(tensors)}
            scores = {sid: {"job_id": job.job_id, "scorer": name, "scorer_id": sid, "labels": {"value": float(rng.random())},
                            "versions": {}, "settings": {}, "scored_at": 0.0} for name, sid in sids}
            spec = job.to_json().encode()
            if n == 0:  # through the library
                for rel, data in adapter.items():
                    (staged / rel).write_bytes(data)
                population.write_spec(job.job_id, spec.decode())
                population.commit(job.job_id, staged, {"bench": "store-ops"})
                for sid, score in scores.items():
                    population.write_score(job.job_id, sid, score)
                continue
            job_dir = jobs_dir / job.job_id
            (job_dir / "adapter").mkdir(parents=True)
            (job_dir / "scores").mkdir()
            files = {}
            for rel, data in {**adapter, "spec.json": spec}.items():
                (job_dir / rel).write_bytes(data)
                files[rel] = {"sha256": sha256_bytes(data), "size": len(data)}
            record = {"job_id": job.job_id, "population": population.name, "files": files,
                      "metrics": {"bench": "store-ops"}, "committed_at": time.time()}
            (job_dir / "record.json").write_bytes(seal(record))
            for sid, score in scores.items():
                (job_dir / "scores" / f"{sid}.json").write_bytes(seal({**score, "population": population.name}))
            if (n + 1) % 10_000 == 0:
                print(f"  wrote {n + 1} of {count} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return time.perf_counter() - started


def upload(folder: Path, url: str, chunk: int = 6_000) -> float:
    """Copy the local store at `folder` to the object store `url`, `chunk` files at a time (s3fs's
    concurrent uploads within a chunk). One `put` of the whole tree first lists and plans all of it:
    at 100,000 records (600,000 files) that held 5.6 GB before its first request."""
    import fsspec

    started = time.perf_counter()
    fs, root = fsspec.core.url_to_fs(url)
    with contextlib.suppress(FileExistsError):  # s3fs raises it for a bucket that exists, exist_ok or not
        fs.mkdir(root.split("/", 1)[0], exist_ok=True)  # the bucket
    pending: list[tuple[str, str]] = []
    sent = 0

    def send() -> None:
        nonlocal sent
        fs.put([local for local, _ in pending], [remote for _, remote in pending])
        sent += len(pending)
        pending.clear()
        print(f"  uploaded {sent} files ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    for parent, _, names in os.walk(folder):
        relative = Path(parent).relative_to(folder).as_posix()
        for name in sorted(names):
            pending.append((os.path.join(parent, name), f"{root}/{name}" if relative == "." else f"{root}/{relative}/{name}"))
            if len(pending) >= chunk:
                send()
    if pending:
        send()
    seconds = time.perf_counter() - started
    fs.pipe_file(f"{root}/.bench-uploaded", f"{seconds:.1f}".encode())  # whole: a later run may reuse it
    return seconds


def _uploaded(url: str, env: dict[str, str]) -> float | None:
    """The seconds an earlier run took to upload the store at `url` (its `.bench-uploaded` object), or None."""
    done = subprocess.run([sys.executable, "-c", "import fsspec, sys; print(fsspec.open(sys.argv[1]).open().read().decode())",
                           f"{url}/.bench-uploaded"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, env={**os.environ, **env})
    return float(done.stdout) if done.returncode == 0 else None


def _in_child(*args: str, env: dict[str, str] | None = None) -> float:
    """Run `python -m bench.store_ops ARGS` (writing or uploading a store); the seconds it reports."""
    done = subprocess.run([sys.executable, "-m", "bench.store_ops", "WORK", *args], cwd=ROOT, check=True,
                          stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    return float(done.stdout.split()[-1])


def _cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) the process `pid` has used so far (Linux), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_command(command: str, store_url: str, count: int, env: dict[str, str], code: Path = ROOT,
                server_pid: int | None = None) -> dict:
    """Run `lol COMMAND` in a fresh process; its exit status, wall and CPU seconds and peak RSS, and
    the CPU seconds the S3 server (`server_pid`) spent meanwhile."""
    args = [sys.executable, "-m", "pipeline.cli", command, str(MANIFEST), f"count={count}", "--store", store_url]
    if command == "publish":
        args.append("--no-push")
    with tempfile.TemporaryFile("w+") as log:
        server_before = _cpu_s(server_pid)
        load = os.getloadavg()[0]  # other work on the machine inflates the wall time
        started = time.perf_counter()
        child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env, "PYTHONPATH": str(code)}, cwd=code)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        server_after = _cpu_s(server_pid)
        child.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-800:]
    return {"code": str(code), "command": f"lol {command}" + (" --no-push" if command == "publish" else ""), "exit_status": child.returncode,
            "wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "load_avg_1min_before": round(load, 2),
            **({"server_cpu_s": round(server_after - server_before, 2)} if server_after is not None else {}),
            "output_tail": tail}


def measure(where: str, store_url: str, count: int, commands: list[str], env: dict[str, str], written_s: float,
            codes: list[Path] = (ROOT,), server_pid: int | None = None) -> list[dict]:
    results = []
    for command, code in ((command, code) for command in commands for code in codes):
        result = {"where": where, "records": count, "store_write_s": round(written_s, 1),
                  **run_command(command, store_url, count, env, code, server_pid)}
        print(json.dumps({k: v for k, v in result.items() if k != "output_tail"}), flush=True)
        if result["exit_status"] != 0:
            print(result["output_tail"], flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="folder for the stores (needs ~45 kB per record)")
    parser.add_argument("--local", type=int, nargs="*", default=[10_000, 100_000], help="record counts on a local disk")
    parser.add_argument("--s3", type=int, nargs="*", default=[10_000], help="record counts on an S3 server on loopback")
    parser.add_argument("--s3-server", choices=("seaweedfs", "moto"), default="seaweedfs",
                        help="the S3 server started for --s3 (tests/s3_server.py); ignored with --endpoint")
    parser.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS))
    parser.add_argument("--endpoint", help="an S3 server already running (e.g. `python tests/s3_server.py PORT_FILE "
                        "--no-serialise`) instead of a fresh server: a store uploaded to it by an earlier run "
                        "is reused (uploading 10,000 records to moto takes ~20 min)")
    parser.add_argument("--endpoint-pid", type=int, help="the process id of --endpoint's server, to record its CPU seconds")
    parser.add_argument("--code", type=Path, nargs="+", default=[ROOT], help="run the commands from these source "
                        "trees, each in turn (e.g. a `git archive` of an older commit, for before/after figures)")
    parser.add_argument("--label", default="", help="a note stored with the results (e.g. before/after a change)")
    parser.add_argument("--write-store", nargs=2, metavar=("FOLDER", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--upload", nargs=2, metavar=("FOLDER", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_store:  # in a child of the measuring process
        print(f"{write_store(Path(args.write_store[0]), int(args.write_store[1])):.1f}")
        return 0
    if args.upload:
        print(f"{upload(Path(args.upload[0]), args.upload[1]):.1f}")
        return 0
    results: list[dict] = []
    written: dict[int, tuple[Path, float]] = {}

    def store_of(count: int) -> tuple[Path, float]:
        folder = args.work / f"store-{count}"
        if count not in written:
            marker = folder / ".bench-complete"
            if marker.exists():  # written by an earlier run: reused
                written[count] = (folder, float(marker.read_text()))
            else:
                print(f"writing {count} records to {folder}", flush=True)
                seconds = _in_child("--write-store", str(folder), str(count))
                marker.write_text(f"{seconds:.1f}")
                written[count] = (folder, seconds)
        return written[count]

    for count in args.local:
        folder, seconds = store_of(count)
        results += measure("local", str(folder), count, args.commands, {}, seconds, args.code)
    if args.s3:
        sys.path.insert(0, str(ROOT / "tests"))
        from s3_server import ACCESS, SERVER_PIDS, moto_s3_server, seaweedfs_s3_server

        with contextlib.ExitStack() as stack:
            # no claims race here: moto serves requests as they come
            start = seaweedfs_s3_server if args.s3_server == "seaweedfs" else functools.partial(moto_s3_server, serialise=False)
            endpoint = args.endpoint or stack.enter_context(start())
            where = f"s3 ({'an existing server' if args.endpoint else args.s3_server}, loopback)"
            env = {**ACCESS, "FSSPEC_S3_ENDPOINT_URL": endpoint}
            for count in args.s3:
                folder, seconds = store_of(count)
                url = f"s3://lol-bench-{count}/store"  # a bucket each: moto scans its whole bucket for every listing
                uploaded = _uploaded(url, env) if args.endpoint else None
                if uploaded is None:
                    uploaded = _in_child("--upload", str(folder), url, env=env)
                    print(f"uploaded {count} records to {url} in {uploaded:.0f} s", flush=True)
                results += measure(where, url, count, args.commands, env, uploaded, args.code,
                                   args.endpoint_pid or SERVER_PIDS.get(endpoint))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"store-ops-{time.strftime('%Y%m%dT%H%M%S')}.json"
    command = " ".join(["python -m bench.store_ops", "WORK", "--local", *map(str, args.local), "--s3", *map(str, args.s3),
                        "--s3-server", args.s3_server, "--commands", *args.commands])
    out.write_text(json.dumps({"benchmark": "store-ops", "command": command, "label": args.label,
                               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                           "python": platform.python_version()},
                               "measured_at": time.time(), "results": results}, indent=1) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

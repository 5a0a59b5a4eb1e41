"""Benchmarks behind `lol bench …`: throughput and memory, measured in fresh processes.

Every measurement runs the real CLI in a child process (so start-up, imports and base
loading count, and peak memory is the child's own `ru_maxrss`), writes a JSON file under
`bench/results/` and returns rows for a table. Modes:

- finetune / score `process`: one process per LoRA, reloading the base each time — how the
  paper's shell loops ran;
- finetune / score `sequential`: one process trains (scores) all N LoRAs one at a time, base
  loaded once (`execution.cohort_size=1`);
- finetune / score `cohort`: one process, K LoRAs per pass over the base (the manifest's
  `execution` section: the default path, `pipeline.finetune.cohort`);
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

import numpy as np

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
    """(wall seconds, peak RSS MB of that child, output) of one child process; raises on failure.

    Linux carries the parent's high-water mark into a forked child's `ru_maxrss`, so keep the
    measuring process small (generate test data in children too).
    """
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


MODES = ("process", "sequential", "cohort")


def _time_modes(stage: str, manifest: str, overrides: list[str], count: int, store: str, mode: str) -> Measurement:
    """Run `lol {stage}` over `count` LoRAs once (sequential, cohort) or once per LoRA (process)."""
    if mode == "cohort":
        seconds, peak, _ = run_child([*_lol(), stage, manifest, *overrides, "--store", store])
        return Measurement(stage, mode, count, round(seconds, 2), round(peak, 1), 1, {"cohort_size": _cohort_size(manifest, overrides)})
    one_at_a_time = [*overrides, "execution.cohort_size=1"]
    if mode == "sequential":
        seconds, peak, _ = run_child([*_lol(), stage, manifest, *one_at_a_time, "--store", store])
        return Measurement(stage, mode, count, round(seconds, 2), round(peak, 1), 1)
    if mode == "process":  # each process finds the first k done and handles job k, reloading everything
        seconds = peak = 0.0
        for k in range(count):
            s, p, _ = run_child([*_lol(), stage, manifest, *one_at_a_time, "--store", store, "--limit", str(k + 1)])
            seconds, peak = seconds + s, max(peak, p)
        return Measurement(stage, mode, count, round(seconds, 2), round(peak, 1), count)
    raise ValueError(f"unknown {stage} mode {mode!r}; modes: {', '.join(MODES)}")


def _cohort_size(manifest: str, overrides: list[str]) -> int:
    from pipeline.manifest import Manifest

    return Manifest.from_yaml(manifest, overrides=overrides).execution.requested_cohort_size


def bench_finetune(manifest: str, overrides: list[str], count: int, modes: list[str]) -> list[Measurement]:
    """Finetune `count` LoRAs of `manifest` in each mode, each into a fresh store."""
    results = []
    overrides = [*overrides, f"count={count}"]
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix=f"lol-bench-{mode}-") as store:
            _warm_bases(manifest, overrides, store, scorers=False)
            results.append(_time_modes("finetune", manifest, overrides, count, store, mode))
    return results


def bench_score(manifest: str, overrides: list[str], count: int, modes: list[str]) -> list[Measurement]:
    """Score `count` finetuned LoRAs in each mode (finetuning them first, untimed)."""
    import shutil

    results = []
    overrides = [*overrides, f"count={count}"]
    with tempfile.TemporaryDirectory(prefix="lol-bench-score-") as base_store:
        _warm_bases(manifest, overrides, base_store)
        run_child([*_lol(), "finetune", manifest, *overrides, "--store", base_store])
        for mode in modes:
            with tempfile.TemporaryDirectory(prefix=f"lol-bench-score-{mode}-") as store:
                shutil.copytree(base_store, store, dirs_exist_ok=True)
                _drop_scores(Path(store))
                results.append(_time_modes("score", manifest, overrides, count, store, mode))
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
        seconds, peak, output = run_child([*_lol(), "run", manifest, *overrides, "--store", store,
                                           "--stages", "finetune,score,publish"], env=env)
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


def write_json(name: str, payload: Any, out_dir: Path = RESULTS_DIR, stamped: bool = True) -> Path:
    """`payload` as `out_dir/{name}-{time}.json` (or `{name}.json` unstamped); the path written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json" if stamped else f"{name}.json")
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


# ---------------------------------------------------------------- loading published weights

SD14_BLOCK_WIDTHS = [320] * 5 + [640] * 5 + [1280] * 6  # transformer blocks of SD-1.x's UNet by width
SD14_TEXT_WIDTH = 768


def sd14_lora_modules() -> dict[str, tuple[int, int]]:
    """name -> (in, out) of SD-1.x's attn1/attn2 to_q/to_v (rank-4 LoRAs: 398,592 parameters)."""
    modules = {}
    for block, width in enumerate(SD14_BLOCK_WIDTHS):
        for attn, kv_in in (("attn1", width), ("attn2", SD14_TEXT_WIDTH)):
            modules[f"block{block:02d}.{attn}.to_q"] = (width, width)
            modules[f"block{block:02d}.{attn}.to_v"] = (kv_in, width)
    return modules


def write_random_population(folder: Path, modules: dict[str, tuple[int, int]], count: int, rank: int = 4,
                            per_file: bool = False, rows_per_shard: int = 250, seed: int = 0) -> int:
    """A published-format folder (parquet shards, layout.json, labels.json) of random LoRAs.

    Written in shards, so memory stays bounded whatever `count` is. With `per_file`, also one
    peft-named safetensors file per LoRA under `files/`, as the paper's loaders read them.
    Returns the number of floats per LoRA.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    from pipeline.publish import PARQUET_OPTIONS, make_layout

    rng = np.random.default_rng(seed)
    example = {name: (np.zeros((rank, n_in), np.float32), np.zeros((n_out, rank), np.float32)) for name, (n_in, n_out) in modules.items()}
    layout = make_layout(example, rank)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "layout.json").write_text(json.dumps(layout))
    (folder / "labels.json").write_text(json.dumps({"score.value": {"scorer": "score", "scorer_id": "score-x", "label": "value"}}))
    if per_file:
        (folder / "files").mkdir(exist_ok=True)
    for shard_start in range(0, count, rows_per_shard):
        n = min(rows_per_shard, count - shard_start)
        flat = rng.standard_normal((n, layout["size"]), dtype=np.float32) * 0.01
        table = pa.table({
            "job_id": [f"lora{shard_start + i:05d}" for i in range(n)], "group": [f"g{shard_start + i}" for i in range(n)],
            "rank": [rank] * n, "alpha": [float(rank)] * n, "score.value": rng.standard_normal(n).tolist(),
            "weights": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), layout["size"]),
        })
        pq.write_table(table, folder / "data" / f"train-{shard_start // rows_per_shard:05d}.parquet", **PARQUET_OPTIONS)
        arrow_dir = folder / "arrow" / "train"
        arrow_dir.mkdir(parents=True, exist_ok=True)
        with pa.OSFile(str(arrow_dir / f"data-{shard_start // rows_per_shard:05d}.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        if per_file:
            for i in range(n):
                tensors = {}
                for module in layout["modules"]:
                    a = flat[i, module["a_offset"]:module["a_offset"] + rank * module["in"]].reshape(rank, module["in"])
                    b = flat[i, module["b_offset"]:module["b_offset"] + module["out"] * rank].reshape(module["out"], rank)
                    tensors[f"base_model.model.{module['name']}.lora_A.weight"] = np.ascontiguousarray(a)
                    tensors[f"base_model.model.{module['name']}.lora_B.weight"] = np.ascontiguousarray(b)
                save_file(tensors, str(folder / "files" / f"lora{shard_start + i:05d}.safetensors"))
    # the listing `save_to_disk` writes beside its Arrow files, which `stream` requires before reading them
    shards = [{"filename": f"data-{i:05d}.arrow"} for i in range((count + rows_per_shard - 1) // rows_per_shard)]
    (folder / "arrow" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    (folder / "arrow" / "train" / "state.json").write_text(json.dumps({"_data_files": shards}))
    return layout["size"]


def bench_load(count_sd: int, count_tiny: int, work_dir: Path) -> list[Measurement]:
    """Reading published weights: tiny population opened as tensors; SD-shaped streamed vs per-file."""
    results = []
    tiny = work_dir / "tiny"
    if count_tiny:
        in_child("tiny", tiny, count_tiny, "--arrow")
        _, _, output = run_child([sys.executable, "-m", "bench.load_worker", "open", str(tiny)])
        mode, n, seconds, peak = output.split()[-4:]
        results.append(Measurement("load", "tiny: tensors after open", int(n), float(seconds), float(peak), 1,
                                   {"floats_per_lora": json.loads((tiny / "layout.json").read_text())["size"]}))
    if count_sd:
        sd = work_dir / "sd14"
        in_child("sd14", sd, count_sd, "--per-file")
        size = json.loads((sd / "layout.json").read_text())["size"]
        for mode in ("stream", "per-file"):
            _, _, output = run_child([sys.executable, "-m", "bench.load_worker", mode, str(sd)])
            _, n, seconds, peak = output.split()[-4:]
            results.append(Measurement("load", f"SD-1.4 rank 4: {mode}", int(n), float(seconds), float(peak), 1,
                                       {"floats_per_lora": size, "gigabytes": round(4 * size * count_sd / 1e9, 2)}))
    return results


def in_child(shape: str, folder: Path, count: int, *flags: str) -> None:
    """Write a random population in a child (`python -m bench.measure write-population …`), so this
    measuring process stays small."""
    subprocess.run([sys.executable, "-m", "bench.measure", "write-population", shape, str(folder), str(count), *flags],
                   check=True, capture_output=True)


def tiny_modules() -> dict[str, tuple[int, int]]:
    """LoRA module shapes (to_q/to_v) of the tiny diffusion UNet, from its recipe (no build needed)."""
    import torch

    from tinyworld import shapes_sd

    unet = shapes_sd.make_unet(shapes_sd.recipe_config("full"))
    return {name: (m.in_features, m.out_features) for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and name.endswith(("to_q", "to_v"))}


def publish_arrow(folder: Path) -> None:
    """Replace the raw Arrow shards with a `save_to_disk` folder that `pull` memory-maps."""
    import shutil

    import datasets

    files = sorted(str(p) for p in (folder / "data").glob("train-*.parquet"))
    shutil.rmtree(folder / "arrow", ignore_errors=True)
    datasets.DatasetDict({"train": datasets.Dataset.from_parquet(files)}).save_to_disk(str(folder / "arrow"))


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.measure write-population tiny|sd14 FOLDER COUNT [--per-file] [--arrow]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.measure")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write-population", help="random rank-4 LoRAs of a layout, as a published folder")
    write.add_argument("shape", choices=("tiny", "sd14"))
    write.add_argument("folder", type=Path)
    write.add_argument("count", type=int)
    write.add_argument("--per-file", action="store_true", help="also one safetensors file per LoRA")
    write.add_argument("--arrow", action="store_true", help="also a save_to_disk folder that pull memory-maps")
    args = parser.parse_args(argv)
    modules = tiny_modules() if args.shape == "tiny" else sd14_lora_modules()
    write_random_population(args.folder, modules, args.count, rank=4, per_file=args.per_file)
    if args.arrow:
        publish_arrow(args.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())

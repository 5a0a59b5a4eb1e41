"""Publish a population as a Hugging Face dataset: one row per verified, scored LoRA.

What a published folder holds, a row's columns, the layout of its `weights` vector and the peft
names of the factors are the published format, defined in `lol_models.published` (which the
reader, `lol_models.data`, uses too); this module assembles the rows and writes the folder::

    {store}/published/{population}/
        README.md                          # dataset card (`pipeline.card`)
        data/{split}-{sha12}.parquet       # parquet shards, named by content (so pushes append)
        arrow/                             # the same splits, `save_to_disk` (memory-mapped on load)
        layout.json                        # the layout: where each module's factors sit in `weights`
        labels.json                        # label column -> scorer id, scorer, original label name
        manifest.yaml                      # the manifest as run

Splits are group-disjoint: a LoRA's group is its identity group, its set of classes or its
set of sources; each group goes to a split by a hash of the group's name alone (the LoL protocol's
rule, `lol_models.split_rule`; or of (split_seed, group) where the manifest sets a seed) against the
manifest's fractions, so adding LoRAs never moves old ones between splits, and populations that
share groups put each in the same split. The folder is
written under `published/.versions/` and `published/{population}` is a symlink swapped
atomically: readers see the old version or the new, and a killed publish leaves the old.

Nothing is published from a damaged store: if any planned LoRA fails verification (or its
score does, or a job holds files without a record), publishing stops and names them. Adapter
weights are read with `pipeline.safe_weights` (safetensors, checked; pickle only when
trusted); a LoRA holding NaN/Inf weights is left out and listed with its count.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lol_models.published import (
    ADAPTER_CONFIG,
    ADAPTER_PICKLE,
    ADAPTER_WEIGHTS,
    LABELS_FILE,
    LAYOUT_FILE,
    MAX_CONFIG_BYTES,
    WEIGHTS_COLUMN,
    FormatError,
    check_factor_shapes,
    flatten,
    label_column,
    make_layout,
    module_factors,
)
from pipeline.finetune.staging import scratch_dir, sweep
from pipeline.jobs import (
    Job,
    canonical_json,
    expand,
    group_name,
    planned_job_ids,
    split_of,
)
from pipeline.manifest import Manifest
from pipeline.score import scorer_id
from storage import DomainError, Store, StoreError

ROWS_PER_SHARD = 1000
MAX_SHARD_BYTES = 256 << 20  # a parquet shard holds at most this many bytes of weights (fewer rows for big LoRAs)
BATCH_BYTES = 64 << 20  # weights of the rows written to Arrow at once
OBJECT_STORE_READS = 8  # jobs read at once from an object store (one job's files at a time on local disks)
# Float weights do not compress and dictionary encoding only slows them down.
PARQUET_OPTIONS = {"compression": "none", "use_dictionary": False, "write_statistics": False}


class PublishError(DomainError):
    """The population cannot be published as asked; names the rows or files at fault."""


@dataclass
class PublishSummary:
    folder: str
    rows: dict[str, int]
    excluded: dict[str, str] = field(default_factory=dict)  # job_id -> why it is not published
    pushed: bool = False
    message: str = ""


# ---------------------------------------------------------------- groups and splits


def group_key(job: Job) -> str:
    """The finetuning group of a job: no group ever appears in two splits."""
    try:
        return group_name(job.spec.data)
    except ValueError as exc:
        raise PublishError(f"job {job.job_id}: {exc}") from None


# ---------------------------------------------------------------- weights


def read_adapter(store: Store, rel: str, trust_remote_pickle: bool = False, files: dict[str, int] | None = None):
    """(Weights, adapter_config) of a stored peft adapter folder, read with `safe_weights`.

    NaN/Inf values are counted, not refused (`Weights.non_finite`): the caller decides.
    `files` ({name: size} of the folder, from a listing of the store) spares listing the folder.
    """
    from pipeline.safe_weights import load_weights, max_file_bytes

    name = _adapter_weights_name(store, rel, files)  # its size checked: a bounded read (one GET on S3) then refuses a larger one
    weights = load_weights(store.read_bytes(f"{rel}/{name}", max_bytes=max_file_bytes()), f"{rel}/{name}", non_finite="count",
                           trust_remote_pickle=trust_remote_pickle)
    return weights, read_adapter_config(store, rel)


def _adapter_weights_name(store: Store, rel: str, files: dict[str, int] | None = None) -> str:
    """The weights file of the adapter folder `rel` (safetensors, else a pickle), its sizes checked
    (from `files`, {name: size}, where given)."""
    from pipeline.safe_weights import max_file_bytes

    names = sorted(files) if files is not None else store.list_dir(rel)
    name = ADAPTER_WEIGHTS if ADAPTER_WEIGHTS in names else ADAPTER_PICKLE if ADAPTER_PICKLE in names else None
    if name is None or ADAPTER_CONFIG not in names:
        raise PublishError(f"{rel} is not a peft adapter folder: it needs {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}, "
                           f"it holds: {', '.join(names) or 'nothing'}")
    size = files.__getitem__ if files is not None else lambda file: store.size(f"{rel}/{file}")
    if size(name) > max_file_bytes() or size(ADAPTER_CONFIG) > MAX_CONFIG_BYTES:
        raise PublishError(f"{rel}: the adapter files are larger than any LoRA's")
    return name


def read_adapter_config(store: Store, rel: str) -> dict[str, Any]:
    """The adapter_config.json of the adapter folder `rel`, as a dict."""
    try:
        data = store.read_bytes(f"{rel}/{ADAPTER_CONFIG}", max_bytes=MAX_CONFIG_BYTES)
    except StoreError as exc:
        raise PublishError(f"{rel}/{ADAPTER_CONFIG}: {exc}") from None
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PublishError(f"{rel}/{ADAPTER_CONFIG} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise PublishError(f"{rel}/{ADAPTER_CONFIG} holds a JSON {type(config).__name__}, not an object")
    return config


# ---------------------------------------------------------------- assembling rows


@dataclass
class Assembled:
    """What a publish writes, before any weights are read: one metadata row per LoRA (no weights,
    each with its split), the layout of the weight vector, the label columns, and the jobs left
    out with why. Weights are read row by row while the folder is written (`weighted_rows`), so
    memory does not grow with the population."""

    rows: list[dict[str, Any]]
    layout: dict[str, Any]
    label_names: dict[str, dict[str, str]]
    excluded: dict[str, str]
    adapters: dict[str, str]  # job_id -> the adapter folder's store path
    ranks: dict[str, int]  # job_id -> the rank its spec trains
    adapter_files: dict[str, dict[str, int]] | None = None  # job_id -> {file: size} (object stores: from one listing)


def assemble(manifest: Manifest, store: Store, trust_remote_pickle: bool = False) -> Assembled:
    """Every publishable LoRA's row (without weights), the layout, label columns and exclusions.

    Raises PublishError if any planned LoRA is damaged (see `refuse_damage`). The layout comes
    from the first row's adapter (its module shapes, checked against its spec's rank) and the
    largest rank of the rows; every other adapter is checked against it when it is read.
    """
    population = store.population(manifest.population.name)
    listing = None if store.is_local else population.object_listing()  # one listing, not one per job
    refuse_damage(manifest, population, listing)
    scorers = [(spec.name, scorer_id(spec)) for spec in manifest.scorers]
    excluded: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    adapters: dict[str, str] = {}
    ranks: dict[str, int] = {}
    label_names: dict[str, dict[str, str]] = {}

    def read(job: Job) -> tuple[dict | None, list[dict | None], dict | None]:
        """The job's record (None: its failure, or None), its scores (None where missing) and,
        if it has all of them, its adapter config."""
        record = population.record(job.job_id)
        if record is None:
            return None, [population.failure(job.job_id)], None
        scores = [population.read_score(job.job_id, sid) for _, sid in scorers]
        if any(score is None for score in scores):
            return record, scores, None
        return record, scores, read_adapter_config(store, population.job_rel(job.job_id, "adapter"))

    jobs = list(expand(manifest))
    for job, (record, read_back, config) in zip(jobs, _in_order(store, read, jobs)):
        if record is None:
            failure = read_back[0]
            excluded[job.job_id] = f"failed: {failure['reason']}" if failure else "not finetuned yet"
            continue
        labels, missing = {}, []
        for (name, sid), score in zip(scorers, read_back):
            if score is None:
                missing.append(sid)
                continue
            for label, value in score["labels"].items():
                column = label_column(name, label)
                label_names.setdefault(column, {"scorer": name, "scorer_id": sid, "label": label})
                labels[column] = value
        if missing:
            excluded[job.job_id] = f"not scored by {', '.join(missing)}"
            continue
        adapters[job.job_id] = population.job_rel(job.job_id, "adapter")
        ranks[job.job_id] = job.spec.rank
        spec = job.spec
        rows.append({
            "job_id": job.job_id, "population": job.population, "index": job.index,
            "base_ref": spec.base["ref"], "base_revision": spec.base.get("revision") or "",
            "rank": spec.rank, "alpha": spec.alpha, "target_modules": list(spec.target_modules),
            "lora_dropout": spec.lora_dropout, "seed": spec.seed,
            "hyperparameters": canonical_json(spec.hyperparameters), "data": canonical_json(spec.data),
            "group": group_key(job), "adapter_config": json.dumps(config, sort_keys=True),
            **labels,
        })
    if not rows:
        reasons = sorted(set(excluded.values()))[:5]
        raise PublishError(f"population {manifest.population.name!r} has no verified, scored LoRA to publish "
                           f"({len(excluded)} planned; e.g. {'; '.join(reasons)}); run `lol finetune` and `lol score` first")
    gaps = {column: [r["job_id"] for r in rows if column not in r] for column in label_names}
    gaps = {c: ids for c, ids in gaps.items() if ids}
    if gaps:
        column, ids = next(iter(gaps.items()))
        raise PublishError(f"label {column!r} is missing from {len(ids)} row(s), e.g. {ids[:5]}; rescore those LoRAs")
    first = rows[0]["job_id"]
    adapter_files = None if listing is None else {job_id: _adapter_files(listing[0].get(job_id, {})) for job_id in adapters}
    weights, _ = read_adapter(store, adapters[first], trust_remote_pickle, adapter_files and adapter_files[first])
    layout = make_layout(job_factors(weights.tensors, ranks[first], first), max(ranks.values()))
    fractions = dict(manifest.publish.splits)
    for row in rows:
        row["split"] = split_of(row["group"], fractions, manifest.publish.split_seed)
    return Assembled(rows, layout, label_names, excluded, adapters, ranks, adapter_files)


def _adapter_files(job_files: dict[str, int]) -> dict[str, int]:
    """{name: size} of the files directly in a job's adapter folder, of {path in the job folder: size};
    a folder inside it shows as its name with size -1 (never a weights or config file)."""
    files: dict[str, int] = {}
    for path, size in job_files.items():
        folder, _, rest = path.partition("/")
        if folder == "adapter" and rest:
            name, _, deeper = rest.partition("/")
            files[name] = -1 if deeper else size
    return files


def weighted_rows(assembled: Assembled, store: Store, rows: list[dict[str, Any]],
                  trust_remote_pickle: bool = False) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """(row, its (D,) float32 weight vector) for each of `rows`, one adapter read at a time (from an
    object store at most OBJECT_STORE_READS at once); a LoRA holding NaN/Inf weights is skipped and
    added to `assembled.excluded` with its count."""
    def read(row: dict[str, Any]):
        files = assembled.adapter_files[row["job_id"]] if assembled.adapter_files is not None else None
        return read_adapter(store, assembled.adapters[row["job_id"]], trust_remote_pickle, files)[0]

    for row, weights in zip(rows, _in_order(store, read, rows)):
        job_id = row["job_id"]
        if weights.non_finite:
            assembled.excluded[job_id] = f"{weights.non_finite_total} NaN/Inf weight value(s)"
            continue
        factors = job_factors(weights.tensors, assembled.ranks[job_id], job_id)
        try:
            vector = flatten(factors, assembled.layout)
        except FormatError as exc:
            raise PublishError(f"job {job_id}: {exc}; every LoRA of a population adapts the same base "
                               f"(the layout is job {assembled.rows[0]['job_id']}'s)") from None
        yield row, vector


def _in_order(store: Store, read: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
    """`read(item)` for each item, in order: one after the other on a local disk; on an object
    store up to OBJECT_STORE_READS at once (a request's latency is most of its cost there), holding
    at most that many results ahead of the caller."""
    if store.is_local:
        yield from map(read, items)
        return
    with ThreadPoolExecutor(OBJECT_STORE_READS, thread_name_prefix="publish-read") as pool:
        ahead: deque = deque()
        for item in items:
            ahead.append(pool.submit(read, item))
            if len(ahead) >= OBJECT_STORE_READS:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def job_factors(tensors: dict[str, np.ndarray], rank: int, job_id: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> (lora_A (rank, in), lora_B (out, rank)) of job `job_id`'s adapter tensors, checked
    against its spec's rank; PublishError naming the job otherwise."""
    try:
        factors = module_factors(tensors)
    except FormatError as exc:
        raise PublishError(f"job {job_id}: {exc}") from None
    try:
        check_factor_shapes(factors, rank)
    except FormatError as exc:
        raise PublishError(f"job {job_id}: {exc} (its spec's rank) — the adapter is not this job's; "
                           "`lol finetune` retrains it once it is removed") from None
    return factors


def refuse_damage(manifest: Manifest, population, listing=None) -> None:
    """PublishError naming every planned job whose LoRA, scores or files are damaged.

    Publishing around damage would silently drop those LoRAs (or their labels) from the
    dataset; the repair is a rerun (`lol finetune` retrains them, `lol score` relabels them).
    """
    damaged = {job_id: found for job_id, found in population.verify(planned_job_ids(manifest), listing=listing) if found}
    if damaged:
        examples = "; ".join(str(p) for problems in list(damaged.values())[:3] for p in problems[:1])
        raise PublishError(f"{len(damaged)} stored LoRA(s) of {manifest.population.name!r} are damaged, so nothing was "
                           f"published: {examples}. `lol verify` lists every problem; `lol finetune` then `lol score` repair them")


# ---------------------------------------------------------------- writing


def in_memory_dataset(rows: list[dict[str, Any]], weights: np.ndarray):
    """A published split held in memory: `rows` (dicts of columns) with their (N, D) float32
    `weights` as the fixed-size `weights` column — the schema `publish_population` streams to
    disk (small populations and tests)."""
    import datasets
    import pyarrow as pa

    table = pa.table({key: [row[key] for row in rows] for key in rows[0]})
    flat = pa.array(np.ascontiguousarray(weights, np.float32).reshape(-1), type=pa.float32())
    return datasets.Dataset(table.append_column(WEIGHTS_COLUMN, pa.FixedSizeListArray.from_arrays(flat, weights.shape[1])))


def _metadata_table(rows: list[dict[str, Any]]):
    """The rows' columns (no weights) as one Arrow table: its types are the published schema's."""
    import pyarrow as pa

    return pa.table({key: [row[key] for row in rows] for key in rows[0]})


def _record_batch(rows: list[dict[str, Any]], vectors: list[np.ndarray], schema):
    import pyarrow as pa

    columns = [pa.array([row[field.name] for row in rows], type=field.type) for field in schema if field.name != WEIGHTS_COLUMN]
    flat = pa.array(np.concatenate(vectors), type=pa.float32())
    columns.append(pa.FixedSizeListArray.from_arrays(flat, len(vectors[0])))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


class _SplitWriter:
    """Streams one split's record batches into `save_to_disk`-format Arrow shards (rolled over at
    MAX_SHARD_BYTES) and parquet shards of `rows_per_shard` rows (named by their sha256), holding
    at most one parquet shard's rows in memory and never mapping what it wrote."""

    def __init__(self, folder: Path, name: str, schema, rows_per_shard: int):
        self.folder, self.name, self.schema, self.rows_per_shard = folder, name, schema, rows_per_shard
        self.arrow_dir = folder / "arrow" / name
        self.arrow_dir.mkdir(parents=True)
        self.arrow_files: list[Path] = []
        self.parquet_files: list[str] = []
        self._sink = self._writer = None
        self._arrow_bytes = 0
        self._pending: list = []
        self._pending_rows = 0
        self.rows = 0

    def write(self, batch) -> None:
        if self._writer is None or self._arrow_bytes >= MAX_SHARD_BYTES:
            self._close_arrow()
            import pyarrow as pa

            self.arrow_files.append(self.arrow_dir / f".shard-{len(self.arrow_files):05d}.arrow")
            self._sink = pa.OSFile(str(self.arrow_files[-1]), "wb")
            self._writer = pa.ipc.new_stream(self._sink, self.schema)
            self._arrow_bytes = 0
        self._writer.write_batch(batch)
        self._arrow_bytes += batch.nbytes
        self.rows += batch.num_rows
        start = 0
        while start < batch.num_rows:  # parquet shards hold exactly rows_per_shard rows (the last fewer)
            take = min(batch.num_rows - start, self.rows_per_shard - self._pending_rows)
            self._pending.append(batch.slice(start, take))
            self._pending_rows += take
            start += take
            if self._pending_rows == self.rows_per_shard:
                self._flush_parquet()

    def close(self) -> None:
        """Finish the shards: the last parquet shard, then the Arrow shards named as `save_to_disk` names them."""
        if self._pending_rows:
            self._flush_parquet()
        self._close_arrow()
        count = len(self.arrow_files)
        for index, path in enumerate(self.arrow_files):
            path.rename(self.arrow_dir / f"data-{index:05d}-of-{count:05d}.arrow")
        self.arrow_files = [self.arrow_dir / f"data-{i:05d}-of-{count:05d}.arrow" for i in range(count)]

    def _close_arrow(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        (self.folder / "data").mkdir(exist_ok=True)
        part = self.folder / "data" / f".{self.name}-part.parquet"
        pq.write_table(pa.Table.from_batches(self._pending, schema=self.schema), part, **PARQUET_OPTIONS)
        path = f"data/{self.name}-{_file_sha256(part)[:12]}.parquet"
        part.rename(self.folder / path)
        self.parquet_files.append(path)
        self._pending, self._pending_rows = [], 0


def _write_split(assembled: Assembled, store: Store, rows: list[dict[str, Any]], writer: _SplitWriter,
                 trust_remote_pickle: bool) -> list[dict[str, Any]]:
    """Stream `rows` with their weights through `writer`, a few rows per batch; returns the rows
    written (LoRAs with NaN/Inf weights are left out)."""
    batch_rows = max(1, min(64, BATCH_BYTES // (4 * assembled.layout["size"])))
    written: list[dict[str, Any]] = []
    pending: tuple[list, list] = ([], [])
    for row, vector in weighted_rows(assembled, store, rows, trust_remote_pickle):
        pending[0].append(row)
        pending[1].append(vector)
        written.append(row)
        if len(pending[0]) == batch_rows:
            writer.write(_record_batch(*pending, writer.schema))
            pending = ([], [])
    if pending[0]:
        writer.write(_record_batch(*pending, writer.schema))
    writer.close()
    return written


def _write_arrow_metadata(folder: Path, splits: dict[str, _SplitWriter], schema) -> None:
    """`save_to_disk`'s bookkeeping files for the streamed Arrow shards: made by `datasets` itself
    (saving the empty splits with the same features), then pointed at the shards."""
    import datasets

    features = datasets.Features.from_arrow_schema(schema)
    template = folder / "arrow-template"
    datasets.DatasetDict({name: datasets.Dataset.from_dict({key: [] for key in features}, features=features)
                          for name in splits}).save_to_disk(str(template))
    shutil.copyfile(template / "dataset_dict.json", folder / "arrow" / "dataset_dict.json")
    for name, writer in splits.items():
        shutil.copyfile(template / name / "dataset_info.json", writer.arrow_dir / "dataset_info.json")
        state = json.loads((template / name / "state.json").read_text())
        state["_data_files"] = [{"filename": path.name} for path in writer.arrow_files]
        (writer.arrow_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    shutil.rmtree(template)


def write_folder(manifest: Manifest, store: Store, folder: Path, assembled: Assembled,
                 trust_remote_pickle: bool = False) -> dict[str, int]:
    """Write the published folder for `assembled` into `folder`, reading one adapter at a time and
    holding at most one parquet shard (≤ MAX_SHARD_BYTES of weights): memory does not grow with
    the number of LoRAs."""
    import datasets

    size = assembled.layout["size"]
    schema = _schema_of(_metadata_table(assembled.rows), size)  # column types inferred over every row
    rows_per_shard = max(1, min(ROWS_PER_SHARD, MAX_SHARD_BYTES // (4 * size)))
    splits: dict[str, _SplitWriter] = {}
    published: list[dict[str, Any]] = []
    for name in ("train", "validation", "test"):
        rows = [row for row in assembled.rows if row["split"] == name]
        if not rows:
            continue
        writer = _SplitWriter(folder, name, schema, rows_per_shard)
        written = _write_split(assembled, store, rows, writer, trust_remote_pickle)
        if written:
            splits[name] = writer
            published += written
        else:
            shutil.rmtree(writer.arrow_dir)
    if not splits:
        raise PublishError(f"population {manifest.population.name!r} has no LoRA with finite weights to publish; "
                           f"excluded: {'; '.join(sorted(set(assembled.excluded.values()))[:5])}")
    _write_arrow_metadata(folder, splits, schema)
    (folder / LAYOUT_FILE).write_text(json.dumps(assembled.layout, indent=1) + "\n")
    (folder / LABELS_FILE).write_text(json.dumps(assembled.label_names, indent=1, sort_keys=True) + "\n")
    manifest_rel = store.population(manifest.population.name).rel("manifest.yaml")
    if store.exists(manifest_rel):
        (folder / "manifest.yaml").write_bytes(store.read_bytes(manifest_rel))
    from pipeline.card import dataset_card

    dataset = datasets.load_from_disk(str(folder / "arrow"))  # memory-mapped: the card reads the rank column only
    shard_bytes = {name: sum((folder / path).stat().st_size for path in writer.parquet_files) for name, writer in splits.items()}
    dataset_card(manifest, dataset, shard_bytes, assembled.layout, assembled.label_names,
                 data_provenance(store, manifest, published)).save(folder / "README.md")
    return {name: writer.rows for name, writer in splits.items()}


def _schema_of(metadata, size: int):
    """The published schema (with its `datasets` features) for `metadata`'s columns plus `weights`."""
    import datasets
    import pyarrow as pa

    one = metadata.slice(0, 1).append_column(
        WEIGHTS_COLUMN, pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(size, np.float32)), size))
    return datasets.Dataset(one).features.arrow_schema


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_provenance(store: Store, manifest: Manifest, rows) -> list[tuple[dict[str, Any], int]]:
    """The distinct data provenances (source, config, revision, fingerprints) the published LoRAs' records
    hold, each with how many LoRAs trained on it; empty for built-in sources, which record none."""
    population = store.population(manifest.population.name)
    counts: dict[str, int] = {}
    for row in rows:
        record = population.record(row["job_id"]) or {}
        data = (record.get("metrics") or {}).get("data")
        if isinstance(data, dict):
            key = json.dumps(data, sort_keys=True)
            counts[key] = counts.get(key, 0) + 1
    return [(json.loads(key), n) for key, n in sorted(counts.items(), key=lambda kv: -kv[1])]


def published_rel(manifest: Manifest) -> str:
    return f"published/{manifest.population.name}"


def publish_population(manifest: Manifest, store: Store, push: bool | None = None,
                       trust_remote_pickle: bool = False) -> PublishSummary:
    """Assemble, write the folder atomically, and push when a token is set (and `push` allows)."""
    sweep()  # what killed publishes (or workers) of this host left in the temporary folder
    assembled = assemble(manifest, store, trust_remote_pickle)
    rel = published_rel(manifest)
    with scratch_dir("lol-publish-") as tmp:
        staging = tmp / "folder"
        staging.mkdir()
        counts = write_folder(manifest, store, staging, assembled, trust_remote_pickle)
        _install(store, staging, rel)
    summary = PublishSummary(folder=store.path(rel), rows=counts, excluded=assembled.excluded)
    from pipeline.hub import push_folder, redact, token_from_env

    token = token_from_env()
    if manifest.publish.repo_id and token and push is not False:
        failure = None
        try:
            push_folder(store.local_path(rel) if store.is_local else store.path(rel), manifest.publish.repo_id, token,
                        private=manifest.publish.private)
        except Exception as exc:  # noqa: BLE001 - the hub's errors vary; the local folder is done either way
            failure = redact(f"{type(exc).__name__}: {exc}", token)[:500]
        if failure is not None:  # raised outside the handler: the hub's error (it may echo the token) is not chained
            raise PublishError(f"wrote {summary.folder} locally, but pushing to {manifest.publish.repo_id} failed "
                               f"({failure}); rerun `lol publish` to resume the push")
        summary.pushed, summary.message = True, f"pushed to the hub as {manifest.publish.repo_id}"
    elif manifest.publish.repo_id and not token:
        summary.message = f"wrote {summary.folder} locally; did not push to {manifest.publish.repo_id}: no HF_TOKEN set"
    else:
        summary.message = f"wrote {summary.folder} locally (no publish.repo_id in the manifest, so nothing to push)"
    return summary


def _install(store: Store, staging: Path, rel: str) -> None:
    """Put the staged folder at `rel` atomically.

    Local disks: the folder is copied to `published/.versions/{name}-{id}` and `published/{name}`
    is a symlink swapped with one `os.replace`, so a reader (or a crash) sees the old version or
    the new, never a mix. Versions other than the current one — the previous version, and what
    a killed publish left half-copied — are removed only after the swap. Publishes of one
    population are serialised by a lock, so this cleanup never removes a version in the making.
    Every path is the store's `write_path` (no link between the root and it is followed), so a
    `.versions`, lock or version planted as a link is refused or unlinked, never written through.
    """
    if store.is_local:
        parent, name = rel.rsplit("/", 1)
        versions_rel = f"{parent}/.versions"
        versions = Path(store.write_path(f"{versions_rel}/{name}"))
        if store.is_link(versions_rel):
            raise StoreError(f"{versions_rel!r} is a symbolic link; the store never writes through links — remove it")
        try:
            versions.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StoreError(f"{versions_rel!r} is not a folder; remove what stands there") from None
        with store.lock(f"{parent}/.lock-{name}"):
            version_name = f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
            version = Path(store.write_path(f"{versions_rel}/{version_name}"))
            shutil.copytree(staging, version)
            link = Path(store.write_path(rel))
            if link.exists() and not link.is_symlink():  # a plain folder from elsewhere: keep it aside
                os.rename(link, store.write_path(f"{versions_rel}/{name}-replaced-{uuid.uuid4().hex[:8]}"))
            temporary_link = Path(store.write_path(f"{parent}/.link-{name}-{uuid.uuid4().hex[:8]}"))
            os.symlink(os.path.relpath(version, link.parent), temporary_link)
            os.replace(temporary_link, link)
            _remove_stale(store, parent, name, keep=version_name)
        return
    # Object stores: upload every file, the card last (a reader that finds the card finds the data),
    # each a block at a time: a shard holds up to MAX_SHARD_BYTES, read whole it set publish's peak memory.
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != "README.md")
    for path in [*files, staging / "README.md"]:
        store.upload_file(path, f"{rel}/{path.relative_to(staging).as_posix()}")


def _remove_stale(store: Store, parent: str, name: str, keep: str) -> None:
    """Remove every version of population `name` but `keep` (kept-aside folders stay), and the
    temporary links a killed publish left — through `store.delete`, which unlinks links and never
    follows them."""
    ours = re.compile(rf"{re.escape(name)}-\d{{8}}T\d{{6}}-[0-9a-f]{{8}}")  # not another population's
    for entry in store.list_dir(f"{parent}/.versions"):
        if ours.fullmatch(entry) and entry != keep:
            store.delete(f"{parent}/.versions/{entry}")
    for entry in store.list_dir(parent):
        if entry.startswith(f".link-{name}-"):
            store.delete(f"{parent}/{entry}")

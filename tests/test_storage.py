"""The store: atomic commits, verification, claims, layout checks — on disk and memory://."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from job_specs import spec_json, stored_spec

from storage import STORE_FORMAT, Store, StoreError

WORKERS = Path(__file__).with_name("store_workers.py")


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    return Store(f"memory://lol-test-{uuid.uuid4().hex}")


def staged_adapter(tmp_path: Path, payload: bytes = b"\x00" * 4096) -> Path:
    staged = tmp_path / f"staged-{uuid.uuid4().hex[:6]}"
    (staged / "adapter").mkdir(parents=True)
    (staged / "adapter" / "adapter_config.json").write_text('{"r": 4}')
    (staged / "adapter" / "adapter_model.safetensors").write_bytes(payload)
    return staged


def test_commit_writes_files_then_a_record_with_checksums(store, tmp_path):
    population = store.population("pop")
    job = stored_spec(population, "job1")
    assert not population.is_done(job)
    record = population.commit(job, staged_adapter(tmp_path), {"final_loss": 0.5})
    assert population.is_done(job, verify=True)
    assert set(record["files"]) == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "spec.json"}
    assert record["metrics"] == {"final_loss": 0.5} and (record["job_id"], record["population"]) == (job, "pop")
    stored = store.read_bytes(population.job_rel(job, "adapter/adapter_model.safetensors"))
    assert stored == b"\x00" * 4096
    assert population.verify_job(job) == []


def test_verify_reports_a_flipped_byte_and_a_missing_file(store, tmp_path):
    population = store.population("pop")
    good, flipped, gone = (stored_spec(population, tag) for tag in ("good", "flipped", "gone"))
    for job in (good, flipped, gone):
        population.commit(job, staged_adapter(tmp_path, bytes(range(256)) * 8), {})
    rel = population.job_rel(flipped, "adapter/adapter_model.safetensors")
    data = bytearray(store.read_bytes(rel))
    data[100] ^= 0x01
    store.write_bytes(rel, bytes(data))
    store.delete(population.job_rel(gone, "adapter/adapter_config.json"))
    results = dict(population.verify())
    assert results[good] == []
    assert [(p.path, p.kind) for p in results[flipped]] == [("adapter/adapter_model.safetensors", "corrupt")]
    assert [(p.path, p.kind) for p in results[gone]] == [("adapter/adapter_config.json", "missing")]
    assert not population.is_done(flipped, verify=True)


def test_an_uploaded_file_reads_back_whole_with_its_sha256_and_leaves_no_temporary(store, tmp_path, monkeypatch):
    import hashlib

    import storage.store

    monkeypatch.setattr(storage.store, "COPY_BLOCK_BYTES", 7)  # many blocks
    source = tmp_path / "shard.parquet"
    source.write_bytes(bytes(range(256)) * 3)
    assert store.upload_file(source, "published/p/data/shard.parquet") == hashlib.sha256(source.read_bytes()).hexdigest()
    assert store.read_bytes("published/p/data/shard.parquet") == source.read_bytes()
    assert store.list_files("published/p") == ["data/shard.parquet"]


def test_failed_jobs_are_recorded_and_cleared_by_success(store, tmp_path):
    population = store.population("pop")
    j = stored_spec(population, "j")
    population.write_failed(j, "non-finite loss", "loss=nan at step 3")
    population.write_failed(j, "non-finite loss", "again")
    assert population.failure(j)["attempts"] == 2
    report = population.status([j, "k"])
    assert report.failed == {j: "non-finite loss"} and report.pending == ["k"]
    population.commit(j, staged_adapter(tmp_path), {})
    assert population.failure(j) is None and population.status([j]).done == [j]


def test_scores_are_kept_per_scorer_id(store):
    population = store.population("pop")
    population.write_score("j", "clip_score-aaaa", {"job_id": "j", "scorer_id": "clip_score-aaaa", "value": 1.0})
    population.write_score("j", "clip_score-bbbb", {"job_id": "j", "scorer_id": "clip_score-bbbb", "value": 2.0})
    assert population.read_score("j", "clip_score-aaaa") == {"job_id": "j", "population": "pop", "scorer_id": "clip_score-aaaa", "value": 1.0}
    assert population.has_score("j", "clip_score-bbbb") and not population.has_score("j", "clip_score-cccc")


def test_claims_exclude_other_workers_until_expiry(store):
    population = store.population("pop")
    first = population.claim("j", "worker-a", lease_s=0.3)
    assert first is not None
    assert population.claim("j", "worker-b", lease_s=10) is None
    assert population.status(["j"]).claimed == {"j": "worker-a"}
    time.sleep(0.35)
    second = population.claim("j", "worker-b", lease_s=10)
    assert second is not None and second.worker == "worker-b"
    population.release(first)  # a stale token does not release the new owner's claim
    assert population.claim("j", "worker-a", lease_s=10) is None
    population.release(second)
    assert population.claim("j", "worker-a", lease_s=10) is not None


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x" * 200])
def test_unsafe_names_are_refused(store, name):
    with pytest.raises(StoreError, match="not a safe name"):
        store.population(name)
    with pytest.raises(StoreError, match="not a safe name"):
        store.population("pop").write_spec(name, "{}")


@pytest.mark.parametrize(("name", "key"), [("FORMAT.json", "store_format"), ("LAYOUT.json", "layout_version")])
def test_a_newer_store_format_is_refused_and_untouched(tmp_path, name, key):
    root = tmp_path / "store"
    root.mkdir()
    (root / name).write_text(json.dumps({key: STORE_FORMAT + 1}))
    with pytest.raises(StoreError, match=f"store format {STORE_FORMAT + 1}"):
        Store(str(root))
    assert json.loads((root / name).read_text())[key] == STORE_FORMAT + 1
    assert sorted(p.name for p in root.iterdir()) == [name]


def test_a_new_store_names_its_format_and_a_store_from_before_keeps_its_file(tmp_path):
    Store(str(tmp_path / "new"))
    assert json.loads((tmp_path / "new" / "FORMAT.json").read_text()) == {"store_format": STORE_FORMAT}
    old = tmp_path / "old"
    old.mkdir()
    (old / "LAYOUT.json").write_text(json.dumps({"layout_version": 1}))  # as stores before FORMAT.json were written
    Store(str(old)).population("p").write_manifest("x: 1\n")
    assert not (old / "FORMAT.json").exists() and (old / "LAYOUT.json").is_file()


@pytest.mark.parametrize("url", ["/proc/no-such-dir/store", "nosuchproto://bucket/x", "https://example.invalid/store"])
def test_unusable_store_urls_get_one_clear_error(url):
    with pytest.raises(StoreError, match="store URL|not reachable"):
        Store(url)


def test_store_url_defaults_to_env_then_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOL_STORE", raising=False)
    assert Store().root.endswith("lol-store")
    monkeypatch.setenv("LOL_STORE", str(tmp_path / "elsewhere"))
    assert Store().root == str(tmp_path / "elsewhere")


def test_sigkill_mid_commit_leaves_no_record_and_a_rerun_completes(tmp_path):
    store_url = str(tmp_path / "store")
    staged = staged_adapter(tmp_path, b"\x07" * (1 << 20))
    ready, job = tmp_path / "ready", spec_json("pop", "job1")[0]
    child = subprocess.Popen([sys.executable, str(WORKERS), "commit_slowly", store_url, "job1", str(staged), str(ready)])
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert child.poll() is None, "the writer exited before reaching the commit"
            assert time.time() < deadline, "the writer never reached the commit"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    population = Store(store_url).population("pop")
    assert population.record(job) is None and not population.is_done(job)
    assert population.status([job]).pending == [job]
    # The rerun: claim, clear what the dead attempt left, commit again.
    claim = population.claim(job, "rerun")
    population.clear_partial(job)
    population.commit(job, staged, {"attempt": 2})
    population.release(claim)
    assert population.is_done(job, verify=True)
    leftovers = [p for p in population.store.list_files(population.job_rel(job)) if ".tmp-" in p]
    assert leftovers == []


def test_two_processes_racing_claim_each_job_exactly_once(tmp_path):
    store_url, go, count = str(tmp_path / "store"), tmp_path / "go", 200
    Store(store_url)
    outs = [tmp_path / f"won-{w}.json" for w in ("a", "b")]
    children = [subprocess.Popen([sys.executable, str(WORKERS), "claim_all", store_url, f"worker-{w}", str(go), str(out), str(count)])
                for w, out in zip("ab", outs)]
    time.sleep(1.0)  # let both import and start polling
    go.write_text("go")
    for child in children:
        assert child.wait(timeout=120) == 0
    won = [json.loads(out.read_text()) for out in outs]
    assert not set(won[0]) & set(won[1]), "a job was claimed by both workers"
    assert sorted(won[0] + won[1]) == [f"job{i:04d}" for i in range(count)]


def test_a_held_claim_is_renewed_and_released(store):
    population = store.population("pop")
    claim = population.claim("j", "worker-a", lease_s=0.3)
    with population.holding(claim, lease_s=0.3):
        time.sleep(0.6)  # longer than the lease: only renewal keeps others out
        assert population.claim("j", "worker-b", lease_s=10) is None
    assert population.claim("j", "worker-b", lease_s=10) is not None


def test_status_from_one_listing_matches_each_job_read_path_by_path(store, tmp_path):
    """`status` reads one listing, not each job's paths: every state it reports agrees with the
    job's own files — done, failed, live and expired claims, leftovers without a record, no
    folder, records of jobs not planned and (on disk) record.json a folder, folders that are
    links or files."""
    population = store.population("pop")
    done, failed, claimed, expired, leftover, unplanned = (stored_spec(population, t) for t in
                                                           ("done", "failed", "claimed", "expired", "leftover", "unplanned"))
    for job in (done, unplanned):
        population.commit(job, staged_adapter(tmp_path), {})
    population.write_failed(failed, "out of memory")
    population.write_failed(claimed, "earlier failure")  # a live claim outranks an old failure
    assert population.claim(claimed, "worker-a", lease_s=60) is not None
    assert population.claim(expired, "worker-b", lease_s=0.05) is not None
    population.store.write_bytes(population.job_rel(leftover, "adapter", "adapter_model.safetensors"), b"partial")
    planned = [done, failed, claimed, expired, leftover, "nofolder"]
    damaged = {}
    if store.is_local:
        jobs = store.local_path(population.rel("jobs"))
        (jobs / "recfolder" / "record.json").mkdir(parents=True)
        (jobs / "afile").write_text("not a folder")
        (jobs / "linked").symlink_to(jobs / done)
        planned += ["recfolder", "afile", "linked"]
        damaged = {"afile": "the job's folder is a file", "linked": "the job folder is a symbolic link"}
    time.sleep(0.1)
    report = population.status(planned)
    assert report.done == [done] and report.failed == {failed: "out of memory"}
    assert report.claimed == {claimed: "worker-a"} and report.damaged == damaged
    assert report.pending == [expired, leftover, "nofolder"] + (["recfolder"] if store.is_local else [])
    assert report.unplanned == [unplanned]

"""Store operations on S3 (real S3 APIs on loopback: SeaweedFS and moto, tests/s3_server.py): the
concurrent listing lists every object once whatever its name, folder markers are not files, and
what `status` and `verify` read from it agrees with each job's own files."""

from __future__ import annotations

import time
import uuid

import fsspec
import pytest
from conftest import ROOT
from job_specs import stored_spec
from s3_server import s3_bucket  # noqa: F401  (the fixture)

from storage import Store
from storage.listing import list_objects


@pytest.fixture
def s3_store(s3_bucket) -> Store:  # noqa: F811
    return Store(f"{s3_bucket}/{uuid.uuid4().hex[:12]}")


def staged_adapter(tmp_path, payload: bytes = b"\x00" * 512):
    staged = tmp_path / f"staged-{uuid.uuid4().hex[:6]}"
    (staged / "adapter").mkdir(parents=True)
    (staged / "adapter" / "adapter_config.json").write_text('{"r": 4}')
    (staged / "adapter" / "adapter_model.safetensors").write_bytes(payload)
    return staged


def test_the_concurrent_listing_lists_every_object_once_whatever_its_name(s3_store):
    """Hex names, names starting with other characters, direct files and deep paths, over
    several pages per part: the same objects and sizes as one recursive `find`."""
    names = [f"{c}{n}/a/b.json" for c in "0379af" for n in range(3)]
    names += ["Zfolder/x", "_under/y/z", "-dash/w", "README", "f", "fz", "ff/deep/er/still.bin", "ünïcode/k"]
    for n, name in enumerate(names):
        s3_store.write_bytes(f"top/{name}", b"x" * n)
    s3_store.write_bytes("top-sibling/0/not-under-top", b"no")
    fs, folder = s3_store.fs, s3_store.path("top")
    expected = {path[len(folder) + 1:]: info["size"] for path, info in fs.find(folder, detail=True).items()}
    assert expected == {name: n for n, name in enumerate(names)}
    for page_size in (1, 2, 1000):
        listed, empty = list_objects(fs, [folder, s3_store.path("nothing-here")], page_size=page_size, concurrency=3)
        assert listed == expected and empty == {}
    assert list_objects(fs, [f"lol-no-such-bucket-{uuid.uuid4().hex[:8]}/x"]) == [{}]


def test_folder_markers_are_not_files(s3_store):
    """A "folder/" key (the S3 console's "Create folder"; SeaweedFS lists an emptied folder as one)
    is neither a file of the listings nor an entry of its own folder."""
    fs = s3_store.fs
    s3_store.write_bytes("top/job/file.json", b"{}")
    for marker in ("top/job/made-in-the-console/", "top/empty/"):
        bucket, key, _ = fs.split_path(s3_store.path(marker))
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"")
    s3_store.write_bytes("top/emptied/gone", b"x")
    fs.rm_file(s3_store.path("top/emptied/gone"))
    assert s3_store.list_files("top") == ["job/file.json"]
    assert s3_store.list_trees("top") == [{"job/file.json": 2}]
    for folder in ("top/empty", "top/emptied", "top/job/made-in-the-console"):
        assert s3_store.list_dir(folder) == [] and s3_store.list_files(folder) == []
    assert "file.json" in s3_store.list_dir("top/job")
    # A deleted folder is gone from its parent's listing (SeaweedFS kept it until its marker was deleted).
    s3_store.write_bytes("top/deleted/a/b", b"x")
    s3_store.delete("top/deleted")
    assert "deleted" not in s3_store.list_dir("top") and not s3_store.exists("top/deleted")
    # A "…/" key that holds bytes is not a marker (AWS S3 and moto keep them): it is listed, so `verify` sees it.
    bucket, key, _ = fs.split_path(s3_store.path("top/job/hidden/"))
    fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"content")
    if fs.cat_file(s3_store.path("top/job/hidden/")) == b"content":  # SeaweedFS drops such a key's bytes
        assert list(s3_store.list_trees("top")[0]) == ["job/file.json", "job/hidden/"]
        assert s3_store.list_files("top") == ["job/file.json", "job/hidden"]


def test_status_on_s3_from_the_listing_matches_each_jobs_files(s3_store, tmp_path):
    population = s3_store.population("pop")
    done, failed, claimed, expired, leftover, unplanned = (stored_spec(population, t) for t in
                                                           ("done", "failed", "claimed", "expired", "leftover", "unplanned"))
    for job in (done, unplanned, "Zunplanned"):
        if job == "Zunplanned":
            population.write_spec(job, "{}")
        population.commit(job, staged_adapter(tmp_path), {})
    population.write_failed(failed, "out of memory")
    population.write_failed(claimed, "earlier failure")  # a live claim outranks an old failure
    assert population.claim(claimed, "worker-a", lease_s=60) is not None
    assert population.claim(expired, "worker-b", lease_s=0.05) is not None
    s3_store.write_bytes(population.job_rel(leftover, "adapter", "adapter_model.safetensors"), b"partial")
    time.sleep(0.1)  # past worker-b's lease: a fast server answers all of the above within 0.05 s
    report = population.status([done, failed, claimed, expired, leftover, "nofolder"])
    assert report.done == [done] and report.failed == {failed: "out of memory"} and report.damaged == {}
    assert report.claimed == {claimed: "worker-a"}
    assert report.pending == [expired, leftover, "nofolder"]
    assert report.unplanned == sorted([unplanned, "Zunplanned"])


def test_listing_a_memory_store_agrees_with_find():
    fs = fsspec.filesystem("memory")
    root = f"/lol-test-{uuid.uuid4().hex[:8]}"
    fs.pipe({f"{root}/a/b": b"12", f"{root}/Z/c/d": b"3"})
    assert list_objects(fs, [root]) == [{"a/b": 2, "Z/c/d": 1}]


def test_verify_on_s3_from_the_listing_reports_what_each_job_read_path_by_path_reports(s3_store, tmp_path):
    """A flipped byte, a missing file, a stray file, a damaged score, remains of a dead commit (and
    of a live one), a folder with an unsafe name: `verify` (one listing, jobs checked at once)
    reports exactly what the path-by-path check of each job reports, and nothing for intact jobs."""
    population = s3_store.population("pop")
    tags = ("good", "flipped", "gone", "stray", "badscore", "unscored", "dead", "live")
    jobs = dict(zip(tags, (stored_spec(population, t) for t in tags)))
    for tag in tags[:6]:
        population.commit(jobs[tag], staged_adapter(tmp_path, bytes(range(256)) * 2), {})
        if tag != "unscored":
            population.write_score(jobs[tag], "s-1", {"job_id": jobs[tag], "scorer_id": "s-1", "labels": {"v": 1.0}})
    weights = population.job_rel(jobs["flipped"], "adapter/adapter_model.safetensors")
    s3_store.write_bytes(weights, b"\x01" + s3_store.read_bytes(weights)[1:])
    s3_store.delete(population.job_rel(jobs["gone"], "adapter/adapter_config.json"))
    s3_store.write_bytes(population.job_rel(jobs["stray"], "adapter/extra.bin"), b"?")
    s3_store.write_bytes(population.score_rel(jobs["badscore"], "s-1"), b"{}")
    for tag in ("dead", "live"):
        s3_store.write_bytes(population.job_rel(jobs[tag], "adapter/adapter_model.safetensors"), b"partial")
    assert population.claim(jobs["live"], "worker-a", lease_s=60) is not None
    s3_store.write_bytes(population.rel("jobs", ".hidden", "record.json"), b"{}")
    scored: dict[str, set[str]] = {}
    found = dict(population.verify(scored=scored))
    assert found[jobs["good"]] == [] and found[jobs["unscored"]] == [] and jobs["live"] not in found
    assert [(p.path, p.kind) for p in found[jobs["flipped"]]] == [("adapter/adapter_model.safetensors", "corrupt")]
    assert [(p.path, p.kind) for p in found[jobs["gone"]]] == [("adapter/adapter_config.json", "missing")]
    assert [(p.path, p.kind) for p in found[jobs["stray"]]] == [("adapter/extra.bin", "unexpected")]
    assert [(p.path, p.kind) for p in found[jobs["badscore"]]] == [("scores/s-1.json", "corrupt")]
    assert [(p.path, p.kind) for p in found[jobs["dead"]]] == [("record.json", "incomplete")]
    assert [p.kind for p in found[".hidden"]] == ["unsafe"]
    for job_id, problems in found.items():
        if job_id != ".hidden":
            assert problems == population._damage_by_path(job_id), job_id
    assert scored == {jobs["good"]: {"s-1"}, jobs["unscored"]: set()}
    assert dict(population.verify([jobs["good"], jobs["flipped"], "absent"])) == {
        jobs["good"]: [], jobs["flipped"]: found[jobs["flipped"]]}


def test_a_bounded_read_on_s3_is_one_ranged_get_that_refuses_a_larger_file(s3_store, monkeypatch):
    from storage import StoreError

    s3_store.write_bytes("small", b"12345")
    s3_store.write_bytes("empty", b"")
    calls = []
    call = s3_store.fs._call_s3
    monkeypatch.setattr(s3_store.fs, "_call_s3", lambda method, *a, **kw: calls.append(method) or call(method, *a, **kw))
    assert s3_store.read_bytes("small", max_bytes=5) == b"12345" and calls == ["get_object"]
    with pytest.raises(StoreError, match="more than the 4 bytes"):
        s3_store.read_bytes("small", max_bytes=4)
    assert s3_store.read_bytes("empty", max_bytes=4) == b""
    with pytest.raises(FileNotFoundError):
        s3_store.read_bytes("absent", max_bytes=4)
    assert s3_store.read_bytes("small") == b"12345"


def test_uploading_a_file_to_s3_sends_it_in_parts_never_whole(s3_store, monkeypatch, tmp_path):
    """A file of two parts or more is a multipart upload, one bounded part per request (publish
    uploads shards of up to 256 MiB this way); a smaller one is one PUT. Both read back whole."""
    import hashlib

    import storage.store

    part = 5 << 20  # S3's (and moto's) least part size
    monkeypatch.setattr(storage.store, "UPLOAD_PART_BYTES", part)
    big, small = tmp_path / "big.bin", tmp_path / "small.json"
    big.write_bytes(uuid.uuid4().bytes * ((2 * part + 123) // 16 + 1))
    small.write_bytes(b'{"small": true}')
    calls, bodies = [], []
    call = s3_store.fs._call_s3

    def recording(method, *args, **kwargs):
        calls.append(method)
        bodies.append(len(kwargs.get("Body") or b""))
        return call(method, *args, **kwargs)

    monkeypatch.setattr(s3_store.fs, "_call_s3", recording)
    assert s3_store.upload_file(big, "published/big.bin") == hashlib.sha256(big.read_bytes()).hexdigest()
    assert calls == ["create_multipart_upload", "upload_part", "upload_part", "upload_part", "complete_multipart_upload"]
    assert max(bodies) == part
    calls.clear()
    s3_store.upload_file(small, "published/small.json")
    assert calls == ["put_object"]
    assert s3_store.read_bytes("published/big.bin") == big.read_bytes()
    assert s3_store.read_bytes("published/small.json") == small.read_bytes()


def test_a_scorer_reads_an_s3_adapter_from_this_processs_staging_folder_and_leaves_nothing(s3_store, tmp_path, monkeypatch):
    """Scoring from an object store downloads the adapter into the process's staging folder (which
    `sweep` can find after a kill) and removes it when the job is scored."""
    import tempfile

    from pipeline.finetune import staging
    from pipeline.score.runner import _adapter_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    population = s3_store.population("pop")
    job = stored_spec(population, "one")
    population.commit(job, staged_adapter(tmp_path, b"weights"), {})
    with _adapter_dir(population, job) as folder:
        assert folder.is_relative_to(mine := staging.worker_dir())
        assert (folder / "adapter_model.safetensors").read_bytes() == b"weights"
    assert not folder.exists() and not mine.exists()


def test_cli_verify_on_s3_lists_the_store_once(s3_bucket, run_cli, tmp_path, monkeypatch):  # noqa: F811
    """`lol verify` on an object store lists the jobs and claims folders once (the listing names the
    jobs too) and reports what the job-by-job check reports: an intact LoRA and a flipped byte."""
    url = f"{s3_bucket}/{uuid.uuid4().hex[:12]}"
    population = Store(url).population("tiny-shapes")
    good, flipped = (stored_spec(population, tag) for tag in ("good", "flipped"))
    for job in (good, flipped):
        population.commit(job, staged_adapter(tmp_path, bytes(range(256))), {})
    weights = population.job_rel(flipped, "adapter/adapter_model.safetensors")
    population.store.write_bytes(weights, b"\x01" + population.store.read_bytes(weights)[1:])
    calls: list[tuple[str, tuple[str, ...]]] = []
    for name in ("list_dir", "list_trees", "list_files"):
        method = getattr(Store, name)
        monkeypatch.setattr(Store, name, lambda self, *rels, _m=method, _n=name: calls.append((_n, rels)) or _m(self, *rels))
    code, out, _ = run_cli("verify", ROOT / "manifests" / "tiny-shapes.yaml", "count=3", "--store", url)
    assert code == 1 and "1 of 2 stored LoRAs verify; 1 problem(s)" in out and flipped in out, out
    jobs = population.rel("jobs")
    assert [rels for name, rels in calls if name == "list_trees"] == [(jobs, population.rel("claims"))], calls
    assert ("list_dir", (jobs,)) not in calls, "the jobs folder was listed a second time"
    # only the damaged job is listed again, path by path (the listing never decides damage alone)
    assert {rel.split("/")[len(jobs.split("/"))] for name, rels in calls if name != "list_trees" for rel in rels} == {flipped}

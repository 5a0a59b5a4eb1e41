"""Claims on S3 (a real S3 API: moto's server on loopback, tests/s3_server.py): created only if
absent, renewed, released and taken over only if unchanged, so of workers racing for one job
exactly one wins — and a store that ignores the conditions is refused, not trusted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from s3_server import S3_ENV, s3_bucket  # noqa: F401  (the fixture)

from storage import Store
from storage.conditional import ConditionalWritesUnsupported, S3ConditionalWrites, object_claims

WORKERS = Path(__file__).with_name("store_workers.py")
RACE_ROUNDS = 30  # per kind of race (a fresh job, an expired claim), four claimers each


@pytest.fixture
def s3_store(s3_bucket) -> Store:  # noqa: F811
    return Store(f"{s3_bucket}/{uuid.uuid4().hex[:12]}")


def test_the_server_honours_conditional_puts_as_s3_does(s3_store):
    writes = s3_store.conditional_writes("probe")  # the probe passed
    path = s3_store.path("x")
    first = writes.create(path, b"1")
    assert first and writes.create(path, b"2") is None
    assert writes.replace(path, b"3", '"not-its-etag"') is None
    second = writes.replace(path, b"3", first)
    assert second and second != first and writes.read(path).data == b"3"
    assert writes.replace(path, b"4", first) is None, "a replace with a stale ETag went through"
    assert writes.replace(s3_store.path("absent"), b"5", first) is None
    assert writes.read(s3_store.path("absent")) is None
    assert s3_store.list_dir("probe") == [], "the probe's object is left"


def test_claims_exclude_other_workers_until_expiry_and_renewals_keep_them(s3_store):
    population = s3_store.population("pop")
    first = population.claim("j", "worker-a", lease_s=0.6)
    assert first is not None
    assert population.claim("j", "worker-b", lease_s=10) is None
    assert population.status(["j"]).claimed == {"j": "worker-a"}
    with population.holding(first, lease_s=0.6):
        time.sleep(0.9)  # longer than the lease: only renewal keeps others out
        assert population.claim("j", "worker-b", lease_s=10) is None
    assert population.active_claims() == {}, "a released claim is not live"
    second = population.claim("j", "worker-b", lease_s=0.3)
    assert second is not None
    time.sleep(0.35)
    third = population.claim("j", "worker-c", lease_s=10)  # b's lease ran out: taken over in place
    assert third is not None and not population.renew(second, 10)
    population.release(second)  # a stale token neither releases nor overwrites the new owner's claim
    assert population.active_claims()["j"].token == third.token
    assert population.sweep_claims() == 0 and population.store.list_dir(population.rel("claims")) == ["j"]


@pytest.mark.parametrize("stored", [b"{not json", json.dumps({"job_id": "j", "worker": "forger", "token": "t",
                                                               "expires": 1e300, "lease_s": 60}).encode()],
                         ids=["damaged", "absurd expiry"])
def test_a_damaged_or_absurd_claim_object_is_taken_over_in_place(s3_store, stored):
    population = s3_store.population("pop")
    s3_store.write_bytes(population.rel("claims", "j"), stored)
    claim = population.claim("j", "worker-a", lease_s=60)
    assert claim is not None and population.active_claims()["j"].token == claim.token


@pytest.mark.parametrize("expired", [False, True], ids=["fresh job", "expired claim"])
def test_of_two_claimers_that_read_the_same_claim_only_one_writes(s3_store, expired):
    """A reads the claim; B claims the job in full; then A's write is refused (If-None-Match /
    If-Match), whatever A read."""
    url = s3_store.url
    a, b = Store(url).population("pop"), Store(url).population("pop")
    if expired:
        assert a.claim("j", "dead-worker", lease_s=0.05)
        time.sleep(0.1)
    writes = a.store.conditional_writes(a.rel("claims"))
    read, b_claims = writes.read, []

    def read_then_let_b_claim(path):
        seen = read(path)
        b_claims.append(b.claim("j", "worker-b", lease_s=60))
        return seen

    writes.read = read_then_let_b_claim
    assert a.claim("j", "worker-a", lease_s=60) is None
    assert b_claims[0] is not None and a.active_claims()["j"].worker == "worker-b"


def test_a_claim_whose_answer_was_lost_is_still_ours(s3_store):
    """The client retried a create whose first try had landed: the store refuses the retry, and
    the claim object (our token) says the job is ours."""
    population = s3_store.population("pop")
    writes = s3_store.conditional_writes(population.rel("claims"))
    create = writes.create
    writes.create = lambda path, data: create(path, data) and None
    claim = population.claim("j", "worker-a", lease_s=60)
    assert claim is not None and population.active_claims()["j"].token == claim.token


def test_a_renewal_or_release_is_one_conditional_put_on_our_own_etag_unless_the_claim_changed(s3_store):
    """Renewing (and releasing) our claim is one PutObject with If-Match: the ETag of our last
    write, no read; the object holds the claim's fields only. Once another worker has taken the
    job over, that PUT is refused, the claim is read, and the renewal fails."""
    population = s3_store.population("pop")
    writes = s3_store.conditional_writes(population.rel("claims"))
    read, reads = writes.read, []
    writes.read = lambda path: reads.append(path) or read(path)
    claim = population.claim("j", "worker-a", lease_s=60)
    assert claim is not None and claim.etag and len(reads) == 1  # claiming reads the current claim
    before = claim.etag
    assert population.renew(claim, 60) and claim.etag != before and len(reads) == 1
    stored = json.loads(s3_store.read_bytes(population.rel("claims", "j")))
    assert stored == {"job_id": "j", "worker": "worker-a", "token": claim.token, "expires": claim.expires, "lease_s": 60.0}
    population.release(claim)
    assert len(reads) == 1 and population.active_claims() == {}
    mine = population.claim("j", "worker-a", lease_s=0.05)
    time.sleep(0.1)
    theirs = Store(s3_store.url).population("pop").claim("j", "worker-b", lease_s=60)
    assert theirs is not None and not population.renew(mine, 60)
    assert population.active_claims()["j"].token == theirs.token
    population.release(mine)
    assert population.active_claims()["j"].token == theirs.token


def test_racing_claimers_on_one_job_exactly_one_wins(s3_bucket):  # noqa: F811
    """Four threads, each with its own Store, claim one job at the same moment; RACE_ROUNDS rounds
    on a fresh job and RACE_ROUNDS on a job whose claim expired (taken over by If-Match)."""
    url = f"{s3_bucket}/race-{uuid.uuid4().hex[:8]}"
    stores = [Store(url) for _ in range(4)]
    refused = _count_refused_writes(stores)
    for expired in (False, True):
        for round_ in range(RACE_ROUNDS):
            populations = [store.population(f"{'expired' if expired else 'fresh'}-{round_}") for store in stores]
            if expired:
                assert populations[0].claim("j", "dead-worker", lease_s=0.05)
                time.sleep(0.1)
            won = _race(populations, "j")
            assert len(won) == 1, f"{populations[0].name}: {len(won)} claimers won"
            assert populations[0].active_claims()["j"].worker == f"worker-{won[0]}"
    print(f"{2 * RACE_ROUNDS} races of 4 claimers: {refused['create']} creates and {refused['replace']} "
          "replaces refused by their condition")
    assert refused["create"] and refused["replace"], "the claimers never wrote at the same time: no race was tested"


def test_two_processes_racing_claim_each_job_exactly_once(s3_bucket, tmp_path):  # noqa: F811
    store_url, go, count = f"{s3_bucket}/procs-{uuid.uuid4().hex[:8]}", tmp_path / "go", 100
    Store(store_url)
    outs = [tmp_path / f"won-{w}.json" for w in ("a", "b")]
    children = [subprocess.Popen([sys.executable, str(WORKERS), "claim_all", store_url, f"worker-{w}", str(go), str(out), str(count)],
                                 env={**os.environ, **S3_ENV}) for w, out in zip("ab", outs)]
    time.sleep(2.0)  # let both import and start polling
    go.write_text("go")
    for child in children:
        assert child.wait(timeout=120) == 0
    won = [json.loads(out.read_text()) for out in outs]
    assert not set(won[0]) & set(won[1]), "a job was claimed by both workers"
    assert sorted(won[0] + won[1]) == [f"job{i:04d}" for i in range(count)]


def test_a_store_that_ignores_the_conditions_is_refused_before_any_claim(s3_store, monkeypatch):
    """An S3 API that drops If-None-Match / If-Match (simulated: the headers are not sent) fails
    the probe, and no claim is written."""
    put = S3ConditionalWrites._put
    monkeypatch.setattr(S3ConditionalWrites, "_put", lambda self, path, data, **condition: put(self, path, data))
    population = s3_store.population("pop")
    with pytest.raises(ConditionalWritesUnsupported, match=r"If-None-Match.*AWS S3 and MinIO"):
        population.claim("j", "worker-a")
    assert population.store.list_files(population.rel("claims")) == []


def test_object_stores_other_than_s3_have_no_claims():
    class GcsLike:
        protocol = ("gcs", "gs")

    with pytest.raises(ConditionalWritesUnsupported, match="gcs:// store are not supported.*local"):
        object_claims(GcsLike())


def _race(populations, job_id: str) -> list[int]:
    """Each population (worker-i) claims `job_id` in its own thread, all at once; the winners' indices."""
    barrier, won = threading.Barrier(len(populations)), []

    def claim(i: int) -> None:
        barrier.wait()
        if populations[i].claim(job_id, f"worker-{i}", lease_s=60):
            won.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(populations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


def _count_refused_writes(stores) -> dict[str, int]:
    """Count the creates and replaces the stores refused (their condition failed)."""
    refused = {"create": 0, "replace": 0}
    lock = threading.Lock()
    for store in stores:
        writes = store.conditional_writes("probe")
        for name in refused:
            def counting(*args, _name=name, _write=getattr(writes, name)):
                answer = _write(*args)
                if answer is None:
                    with lock:
                        refused[_name] += 1
                return answer
            setattr(writes, name, counting)
    return refused

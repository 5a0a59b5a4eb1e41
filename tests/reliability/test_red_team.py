"""The outside red team's store findings (issue #20), each reproduced on a copy of a real store.

Each test did what the red team did and failed before the fix: a publish that wrote and deleted
outside the store, swapped or linked job folders that verified, unsealed edits and absurd
adapter shapes that were accepted, one bad job that stopped every command, an absurd claim
that blocked its job forever.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from storage.seal import seal

from .conftest import SHAPES, smoke_overrides


def _outside(tmp_path: Path) -> Path:
    """A folder beside the store, with a file and an old-looking version folder in it."""
    outside = tmp_path / "outside"
    (outside / "tiny-shapes-20200101T000000-0123abcd").mkdir(parents=True)
    (outside / "tiny-shapes-20200101T000000-0123abcd" / "keep.txt").write_text("not the store's")
    (outside / "precious.txt").write_text("do not touch")
    return outside


def _listing(folder: Path) -> dict[str, str]:  # path -> content (hex)
    return {p.relative_to(folder).as_posix(): p.read_bytes().hex() if p.is_file() else "<dir>" for p in sorted(folder.rglob("*"))}


def _cli(run_cli, command: str, manifest, store, *extra: str):
    return run_cli(command, SHAPES, *smoke_overrides(manifest.base.ref), "--store", store.url, *extra)


def test_1_publish_never_writes_or_deletes_through_a_linked_versions_folder(smoke_copy, tmp_path, run_cli):
    store, manifest = smoke_copy
    outside = _outside(tmp_path)
    before = _listing(outside)
    versions = store.local_path("published/.versions")
    shutil.rmtree(versions)
    os.symlink(outside, versions)
    code, _, err = _cli(run_cli, "publish", manifest, store)
    assert code == 2 and "symbolic link" in err and ".versions" in err, err
    assert _listing(outside) == before


def test_1_a_planted_publish_lock_link_is_not_followed(smoke_copy, tmp_path, run_cli):
    store, manifest = smoke_copy
    target, lock = tmp_path / "outside-lock", store.local_path("published") / f".lock-{manifest.population.name}"
    lock.unlink(missing_ok=True)  # the smoke population's own publish left the lock file
    os.symlink(target, lock)
    code, _, err = _cli(run_cli, "publish", manifest, store)
    assert code == 2 and "lock" in err, err
    assert not target.exists()


def test_2_swapped_job_folders_are_damage_refused_by_publish_and_retrained(smoke_copy, run_cli):
    store, manifest = smoke_copy
    population = store.population(manifest.population.name)
    a, b = sorted(population.job_ids())[:2]
    folder_a, folder_b = store.local_path(population.job_rel(a)), store.local_path(population.job_rel(b))
    os.rename(folder_a, folder_a.with_name("swap"))
    os.rename(folder_b, folder_a)
    os.rename(folder_a.with_name("swap"), folder_b)
    code, out, _ = _cli(run_cli, "verify", manifest, store)
    assert code == 1 and "2 of 4 stored LoRAs verify" in out, out
    assert {p.job_id for _, found in population.verify() for p in found if p.kind == "mismatch"} == {a, b}
    assert not population.is_done(a) and not population.is_done(b)
    code, _, err = _cli(run_cli, "publish", manifest, store)
    assert code == 2 and "damaged" in err
    code, out, err = _cli(run_cli, "finetune", manifest, store)
    assert code == 0, err
    assert sorted(population.record(j)["job_id"] for j in (a, b)) == sorted([a, b])
    assert dict(population.verify([a, b])) == {a: [], b: []}


def test_2_a_job_folder_linked_to_another_job_is_damage_and_is_retrained(smoke_copy, run_cli):
    store, manifest = smoke_copy
    population = store.population(manifest.population.name)
    a, b = sorted(population.job_ids())[:2]
    folder_a = store.local_path(population.job_rel(a))
    shutil.rmtree(folder_a)
    os.symlink(store.local_path(population.job_rel(b)), folder_a)
    assert [p.kind for p in dict(population.verify())[a]] == ["unsafe"] and not population.is_done(a)
    code, _, err = _cli(run_cli, "finetune", manifest, store)
    assert code == 0, err
    assert not folder_a.is_symlink() and population.is_done(a, verify=True) and population.is_done(b, verify=True)


def test_3_an_absurd_adapter_shape_is_refused_before_any_allocation(smoke_copy, run_cli):
    """An adapter whose header declares lora_A of [2**40, 0] (zero bytes), under a record that
    lists it with valid checksums and seal (a forger can recompute both): publish names the job."""
    store, manifest = smoke_copy
    population = store.population(manifest.population.name)
    job_id = sorted(population.job_ids())[0]
    weights_rel = population.job_rel(job_id, "adapter/adapter_model.safetensors")
    header = {"base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight":
              {"dtype": "F32", "shape": [2**40, 0], "data_offsets": [0, 0]},
              "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight":
              {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}}
    blob = json.dumps(header).encode()
    data = len(blob).to_bytes(8, "little") + blob
    store.write_bytes(weights_rel, data)
    record = population.record(job_id)
    from storage.store import sha256_bytes

    record["files"]["adapter/adapter_model.safetensors"] = {"sha256": sha256_bytes(data), "size": len(data)}
    store.write_bytes(population.job_rel(job_id, "record.json"), seal(record))
    code, _, err = _cli(run_cli, "publish", manifest, store)
    assert code == 2 and job_id in err and "lora_A" in err, err


def test_5_one_bad_job_is_that_jobs_problem(smoke_copy, tmp_path, run_cli):
    """A job folder linked outside the store: verify lists it with every other problem, status
    counts it, finetune repairs it (unlinks, never follows) and the outside folder is untouched."""
    store, manifest = smoke_copy
    population = store.population(manifest.population.name)
    linked, flipped = sorted(population.job_ids())[:2]
    outside = _outside(tmp_path)
    shutil.copytree(store.local_path(population.job_rel(linked)), outside / "job")
    before = _listing(outside)
    shutil.rmtree(store.local_path(population.job_rel(linked)))
    os.symlink(outside / "job", store.local_path(population.job_rel(linked)))
    weights = store.local_path(population.job_rel(flipped, "adapter/adapter_model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))

    code, out, _ = _cli(run_cli, "verify", manifest, store)
    assert code == 1 and linked in out and flipped in out and "2 of 4 stored LoRAs verify" in out, out
    code, out, _ = _cli(run_cli, "status", manifest, store)
    assert code == 0 and "damaged" in out and linked in out, out
    code, _, err = _cli(run_cli, "publish", manifest, store)
    assert code == 2 and "damaged" in err
    code, out, err = _cli(run_cli, "finetune", manifest, store)
    assert code == 0, err
    assert all(population.is_done(j, verify=True) for j in population.job_ids())
    assert _listing(outside) == before


def test_6_a_claim_with_an_absurd_expiry_is_stale(smoke_copy, run_cli):
    store, manifest = smoke_copy
    population = store.population(manifest.population.name)
    far, ahead = sorted(population.job_ids())[:2]
    for job_id in (far, ahead):
        population.clear_partial(job_id)  # the jobs are not done, so their claims matter
    store.write_json(population.rel("claims", far), {"job_id": far, "worker": "x", "token": "t", "expires": 1e300})
    store.write_json(population.rel("claims", ahead), {"job_id": ahead, "worker": "x", "token": "t", "lease_s": 120,
                                                       "expires": time.time() + 86400})  # a clock a day ahead
    assert population.active_claims() == {}
    report = population.status([far, ahead])
    assert report.claimed == {} and sorted(report.pending) == sorted([far, ahead])
    code, _, err = _cli(run_cli, "finetune", manifest, store)
    assert code == 0, err
    assert population.is_done(far, verify=True) and population.is_done(ahead, verify=True)
    assert not store.exists(population.rel("claims", far)) and not store.exists(population.rel("claims", ahead))


def test_6_a_live_claim_within_its_lease_still_excludes():
    from storage.population import CLOCK_SKEW_S, Claim

    now = time.time()
    assert Claim("j", "w", "t", now + 100, 120).is_live(now)
    assert Claim("j", "w", "t", now + 120 + CLOCK_SKEW_S - 1, 120).is_live(now)
    assert not Claim("j", "w", "t", now + 120 + CLOCK_SKEW_S + 1, 120).is_live(now)
    assert not Claim("j", "w", "t", 1e300, 0).is_live(now) and not Claim("j", "w", "t", now - 1, 120).is_live(now)
    # second review: a claim declaring a day-long lease held its job a day; leases are capped at MAX_LEASE_S
    from storage.population import MAX_LEASE_S

    assert MAX_LEASE_S <= 3600 and not Claim("j", "w", "t", now + 86000, 86400).is_live(now)


def test_review_learn_outputs_never_go_through_a_link(smoke_copy, tmp_path, run_cli):
    """Second review: a link planted in learn/{population} made `lol evaluate` overwrite a file outside."""
    store, manifest = smoke_copy
    outside = _outside(tmp_path)
    before = _listing(outside)
    learn = store.local_path("published").parent / "learn" / manifest.population.name
    learn.mkdir(parents=True)
    os.symlink(outside / "precious.txt", learn / "results.md")
    for command in ("evaluate", "report", "train"):
        code, _, err = _cli(run_cli, command, manifest, store)
        assert code == 2 and "symbolic link" in err, (command, err)
    assert _listing(outside) == before


def test_review_score_never_reads_a_linked_adapter(smoke_copy, tmp_path, run_cli):
    """Second review: `lol score` chose jobs by their record and read an adapter linked outside,
    sealing a label computed from foreign weights. It scores verified LoRAs only."""
    store, manifest = smoke_copy
    population = store.population(manifest.population.name)
    job_id = sorted(population.job_ids())[0]
    sid = population.store.list_dir(population.job_rel(job_id, "scores"))[0].removesuffix(".json")
    store.delete(population.score_rel(job_id, sid))
    weights = store.local_path(population.job_rel(job_id, "adapter/adapter_model.safetensors"))
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(weights.read_bytes())
    weights.unlink()
    os.symlink(foreign, weights)
    code, _, err = _cli(run_cli, "score", manifest, store)
    assert code in (0, 1), err
    assert not population.has_score(job_id, sid)


def test_review_wrong_file_types_and_deep_json_are_one_jobs_damage(smoke_copy, run_cli):
    """Second review: a job folder that is a file, a record that is a folder, a FIFO record and
    100,000-deep JSON made verify/status/finetune raise or hang. Each is now its job's damage."""
    store, manifest = smoke_copy
    population = store.population(manifest.population.name)
    as_file, record_dir, fifo, deep = sorted(population.job_ids())
    folder = store.local_path(population.job_rel(as_file))
    shutil.rmtree(folder)
    folder.write_text("not a folder")
    record = store.local_path(population.job_rel(record_dir, "record.json"))
    record.unlink()
    record.mkdir()
    fifo_record = store.local_path(population.job_rel(fifo, "record.json"))
    fifo_record.unlink()
    os.mkfifo(fifo_record)
    store.local_path(population.job_rel(deep, "spec.json")).write_text("[" * 100000)
    code, out, err = _cli(run_cli, "verify", manifest, store)
    assert code == 1 and "0 of 4 stored LoRAs verify" in out and all(j in out for j in (as_file, record_dir, fifo, deep)), out + err
    code, out, err = _cli(run_cli, "status", manifest, store)
    assert code == 0, err
    code, _, err = _cli(run_cli, "finetune", manifest, store)
    assert code == 0, err
    assert all(population.is_done(j, verify=True) for j in (as_file, record_dir, fifo, deep))

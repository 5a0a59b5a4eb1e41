"""Damage in a stored population — flipped bits, truncated files, deleted files and records —
is found by `lol verify`, refused by `lol publish`, and repaired by rerunning the stages."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from pipeline.publish import PublishError, publish_population
from storage import Store

from .conftest import SHAPES, TRIALS, smoke_overrides, tree_digest, write_report

# What a stored job holds, by role: every one of them is covered by a checksum or a seal.
ROLES = {
    "weights": "adapter/adapter_model.safetensors",
    "config": "adapter/adapter_config.json",
    "adapter card": "adapter/README.md",
    "spec": "spec.json",
    "record": "record.json",
    "score": "scores/",
}
DAMAGES = ("flip", "truncate", "delete")


def damage(file: Path, how: str, rng: random.Random) -> str:
    """Damage one file in place; returns what was done."""
    data = bytearray(file.read_bytes())
    if how == "flip":
        at, bit = rng.randrange(len(data)), rng.randrange(8)
        data[at] ^= 1 << bit
        file.write_bytes(bytes(data))
        return f"bit {bit} of byte {at} flipped"
    if how == "truncate":
        keep = rng.randrange(len(data))
        file.write_bytes(bytes(data[:keep]))
        return f"cut to {keep} of {len(data)} bytes"
    file.unlink()
    return "deleted"


def role_file(store: Store, population, job_id: str, role: str) -> Path:
    rel = ROLES[role]
    folder = store.local_path(population.job_rel(job_id))
    return next((folder / rel).iterdir()) if rel.endswith("/") else folder / rel


def run_trials(smoke_population, tmp_path, run_cli, count: int) -> list[dict]:
    """`count` seeded trials, each on a fresh copy of the store: one role × one kind of damage."""
    folder, overrides = smoke_population
    combos = [(role, how) for role in ROLES for how in DAMAGES]
    outcomes = []
    for trial in range(count):
        rng = random.Random(trial)
        role, how = combos[trial % len(combos)]
        copy = tmp_path / f"trial-{trial}"
        shutil.copytree(folder, copy, symlinks=True)
        store = Store(str(copy))
        population = store.population("tiny-shapes")
        job_id = rng.choice(sorted(population.job_ids()))
        published = store.local_path("published/tiny-shapes")
        before = (published.resolve(), tree_digest(published))
        what = damage(role_file(store, population, job_id, role), how, rng)
        code_verify, out_verify, _ = run_cli("verify", SHAPES, *overrides, "--store", copy)
        code_publish, out_publish, err_publish = run_cli("publish", SHAPES, *overrides, "--store", copy)
        refused = code_publish == 2 and "damaged" in err_publish and job_id in err_publish
        left_out = code_publish == 0 and "not published × 1: not scored" in out_publish
        outcomes.append({
            "trial": trial, "role": role, "damage": how, "what": what, "job": job_id,
            "verify": "damage" if code_verify == 1 and job_id in out_verify
            else "unscored" if code_verify == 0 and "unscored: 1 intact LoRA" in out_verify and job_id in out_verify
            else "missed",
            "publish": "refused" if refused else "left out, named" if left_out else "published",
            "previous version intact": (published.resolve(), tree_digest(published)) == before,
        })
        shutil.rmtree(copy)
    return outcomes


@pytest.mark.slow
def test_verify_finds_and_publish_refuses_every_damage(smoke_population, tmp_path, run_cli):
    """A deleted score file cannot be told from a score never computed: verify notes the LoRA as
    unscored and publish leaves it out by name (`lol score` recomputes it). Every other damage is
    damage: verify exits 1 naming the job, publish refuses and the published version stays."""
    outcomes = run_trials(smoke_population, tmp_path, run_cli, TRIALS or 2 * len(ROLES) * len(DAMAGES))
    write_report("corruption", outcomes)
    deleted_score = [o for o in outcomes if (o["role"], o["damage"]) == ("score", "delete")]
    damaged = [o for o in outcomes if o not in deleted_score]
    assert all(o["verify"] == "damage" and o["publish"] == "refused" and o["previous version intact"] for o in damaged), damaged
    assert all(o["verify"] == "unscored" and o["publish"] == "left out, named" for o in deleted_score), deleted_score
    assert {(o["role"], o["damage"]) for o in outcomes} == {(r, d) for r in ROLES for d in DAMAGES}


@pytest.mark.slow
def test_rerunning_the_stages_repairs_every_damage(smoke_copy, run_cli):
    """One store, four kinds of damage at once (plus a planted pickle): finetune + score repair all."""
    store, manifest = smoke_copy
    overrides = smoke_overrides(manifest.base.ref)
    population = store.population(manifest.population.name)
    jobs = sorted(population.job_ids())
    rng = random.Random(0)
    labels_before = {j: population.read_score(j, _only_scorer(population, j))["labels"] for j in jobs}
    damage(role_file(store, population, jobs[0], "weights"), "flip", rng)
    (store.local_path(population.job_rel(jobs[0], "adapter")) / "adapter_model.bin").write_bytes(b"\x80\x02planted")
    damage(role_file(store, population, jobs[1], "record"), "delete", rng)
    damage(role_file(store, population, jobs[2], "score"), "flip", rng)
    damage(role_file(store, population, jobs[3], "spec"), "truncate", rng)

    code, out, _ = run_cli("verify", SHAPES, *overrides, "--store", store.url)
    assert code == 1 and all(j in out for j in jobs) and "adapter_model.bin: unexpected" in out
    code, _, err = run_cli("publish", SHAPES, *overrides, "--store", store.url)
    assert code == 2 and "4 stored LoRA(s)" in err

    code, out, err = run_cli("finetune", SHAPES, *overrides, "--store", store.url)
    assert code == 0, err
    trained = [c.strip() for c in next(line for line in out.splitlines() if line.startswith("│")).strip("│").split("│")]
    assert trained[:3] == ["4", "3", "1"], out  # planned, trained again (jobs 0, 1, 3), already done (job 2)
    code, _, err = run_cli("score", SHAPES, *overrides, "--store", store.url)
    assert code == 0, err
    code, out, _ = run_cli("verify", SHAPES, *overrides, "--store", store.url)
    assert code == 0 and "4 of 4 stored LoRAs verify" in out, out
    code, out, err = run_cli("publish", SHAPES, *overrides, "--store", store.url)
    assert code == 0, err
    assert {j: population.read_score(j, _only_scorer(population, j))["labels"] for j in jobs} == labels_before
    assert not (store.local_path(population.job_rel(jobs[0], "adapter")) / "adapter_model.bin").exists()


def test_a_damaged_score_is_rescored_not_retrained(smoke_copy):
    store, manifest = smoke_copy
    population = store.population(manifest.population.name)
    job_id = sorted(population.job_ids())[0]
    sid = _only_scorer(population, job_id)
    path = store.local_path(population.score_rel(job_id, sid))
    text = json.loads(path.read_text())
    text["labels"] = {k: 1 - v for k, v in text["labels"].items()}  # a plausible, wrong label
    path.write_text(json.dumps(text, indent=2, sort_keys=True))
    assert population.is_done(job_id) and not population.has_score(job_id, sid)
    assert [p.kind for p in dict(population.verify())[job_id]] == ["corrupt"]
    with pytest.raises(PublishError, match="damaged"):
        publish_population(manifest, store)


def _unseal(store, population, job_id: str, sid: str, labels=None) -> None:
    """Rewrite the job's record and score as files written before seals existed."""
    for rel in (population.job_rel(job_id, "record.json"), population.score_rel(job_id, sid)):
        value = json.loads(store.read_bytes(rel))
        value.pop("_sha256")
        if rel.endswith(f"{sid}.json"):
            value.pop("population")  # scores named no population then, nor their time
            value.pop("seconds", None)
            value.pop("cohort_size", None)
            if labels is not None:
                value["labels"] = {k: labels for k in value["labels"]}
        store.write_json(rel, value)


def test_unsealed_files_are_refused_until_resealed_once(smoke_copy, run_cli):
    """Red team: dropping the seal made any edit an accepted "legacy" file. Unsealed records and
    scores are now damage; `lol verify --reseal` migrates a population written before seals (every
    record unsealed, identity and checksums checked) and is refused in one written after them."""
    store, manifest = smoke_copy
    population = store.population(manifest.population.name)
    jobs = sorted(population.job_ids())
    overrides = smoke_overrides(manifest.base.ref)
    edited = jobs[0]
    _unseal(store, population, edited, _only_scorer(population, edited), labels=99999)
    assert not population.is_done(edited) and not population.has_score(edited, _only_scorer(population, edited))
    assert sorted(p.kind for p in dict(population.verify())[edited]) == ["unsealed", "unsealed"]
    with pytest.raises(PublishError, match="damaged"):
        publish_population(manifest, store)
    code, _, err = run_cli("verify", SHAPES, *overrides, "--store", store.url, "--reseal")
    assert code == 2 and "already holds sealed records" in err, err  # one unsealed file among sealed ones: damage

    for job_id in jobs[1:]:  # a population written before seals: every record and score unsealed
        _unseal(store, population, job_id, _only_scorer(population, job_id))
    code, out, _ = run_cli("verify", SHAPES, *overrides, "--store", store.url, "--reseal")
    assert code == 0 and f"resealed {2 * len(jobs)} file(s) of {len(jobs)} job(s)" in out, out
    assert all(population.is_done(j, verify=True) and population.has_score(j, _only_scorer(population, j)) for j in jobs)


def _only_scorer(population, job_id: str) -> str:
    return population.store.list_dir(population.job_rel(job_id, "scores"))[0].removesuffix(".json")


def test_every_single_bit_flip_of_a_sealed_record_is_caught():
    """Exhaustive over one record: all 8 bits of every byte, including the seal line itself."""
    from storage.seal import CorruptFile, seal, unseal

    record = {"job_id": "5aba283e512cf652", "population": "tiny-shapes", "committed_at": 1.5e9,
              "files": {"spec.json": {"sha256": "ab" * 32, "size": 812}}, "metrics": {"final_loss": 0.125}}
    data = seal(record)
    assert unseal(data) == record
    missed = []
    for at in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[at] ^= 1 << bit
            try:
                unseal(bytes(flipped))
                missed.append((at, bit))
            except CorruptFile:
                pass
    assert missed == [], f"{len(missed)} of {8 * len(data)} flips read back as a valid record"

"""The store fuzzed the way the red team attacked it (issue #20): on fresh copies of a real
store, random swaps of job folders, links (to other jobs, outside the store, over `.versions`,
the published link and the lock), files copied between jobs, unsealed edits, absurd claims,
and (from the second review) wrong file types — a job folder that is a file, bookkeeping files
that are folders or FIFOs — and 100,000-deep JSON.

For every case: `lol verify` names every damaged job (exit 1) or passes an undamaged store (exit
0), `lol status` and `lol publish` answer with an exit code (publish refuses damage by name),
no command raises (a traceback), and nothing outside the store is written or deleted. Some
cases also run `lol finetune`, which must repair every damaged job.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from .conftest import SHAPES, TRIALS, write_report

CASES = TRIALS or 200
FINETUNE_EVERY = 30  # every 30th case also runs `lol finetune` (training costs seconds)


def _digest(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (links not followed): path -> content hash, link target or '<dir>'."""
    found = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = "<dir>"
    return found


class Case:
    """One fuzz case: a store copy, an outside folder, and the jobs the mutations damaged."""

    def __init__(self, store: Path, outside: Path, rng: random.Random, population: str):
        self.store, self.outside, self.rng = store, outside, rng
        self.jobs_dir = store / "populations" / population / "jobs"
        self.claims_dir = store / "populations" / population / "claims"
        self.population = population
        self.jobs = sorted(p.name for p in self.jobs_dir.iterdir())
        self.damaged: set[str] = set()
        self.done: list[str] = []

    def healthy(self) -> list[str]:
        """Jobs whose folder is still a real folder (mutations act on those)."""
        return [j for j in self.jobs if (self.jobs_dir / j).is_dir() and not (self.jobs_dir / j).is_symlink()]

    def job(self) -> str:
        return self.rng.choice(self.healthy() or self.jobs)

    def two_jobs(self) -> tuple[str, str]:
        jobs = self.healthy()
        a, b = self.rng.sample(jobs if len(jobs) >= 2 else self.jobs, 2)
        return a, b

    def file_of(self, job: str) -> str | None:
        if not (self.jobs_dir / job).is_dir():
            return None
        files = sorted(p.relative_to(self.jobs_dir / job).as_posix() for p in (self.jobs_dir / job).rglob("*")
                       if p.is_file() and not p.is_symlink())
        return self.rng.choice(files) if files else None

    # ---------------------------------------------------------------- mutations

    def swap(self) -> None:
        a, b = self.two_jobs()
        if (self.jobs_dir / a).is_symlink() or (self.jobs_dir / b).is_symlink():
            return
        tmp = self.jobs_dir / "swap-tmp"
        os.rename(self.jobs_dir / a, tmp)
        os.rename(self.jobs_dir / b, self.jobs_dir / a)
        os.rename(tmp, self.jobs_dir / b)
        self.damaged |= {a, b}
        self.done.append(f"swap {a[:6]} {b[:6]}")

    def link_job_to_job(self) -> None:
        a, b = self.two_jobs()
        if (self.jobs_dir / a).is_symlink() or (self.jobs_dir / b).is_symlink():
            return
        shutil.rmtree(self.jobs_dir / a)
        os.symlink(self.jobs_dir / b, self.jobs_dir / a)
        self.damaged.add(a)
        self.done.append(f"link job {a[:6]} -> {b[:6]}")

    def link_job_outside(self) -> None:
        a = self.job()
        if (self.jobs_dir / a).is_symlink():
            return
        target = self.outside / f"job-{a}"
        if not target.exists():
            shutil.copytree(self.jobs_dir / a, target)
        shutil.rmtree(self.jobs_dir / a)
        os.symlink(target, self.jobs_dir / a)
        self.damaged.add(a)
        self.done.append(f"link job {a[:6]} outside")

    def link_file(self) -> None:
        a, b = self.two_jobs()
        if (self.jobs_dir / a).is_symlink() or (self.jobs_dir / b).is_symlink():
            return
        rel = self.file_of(a)
        if rel is None:
            return
        source = self.jobs_dir / b / rel
        target = source if source.is_file() and self.rng.random() < 0.5 else self.outside / "precious.txt"
        (self.jobs_dir / a / rel).unlink()
        os.symlink(target, self.jobs_dir / a / rel)
        self.damaged.add(a)
        self.done.append(f"link file {a[:6]}/{rel} -> {'job ' + b[:6] if target == source else 'outside'}")

    def copy_file(self) -> None:
        a, b = self.two_jobs()
        if (self.jobs_dir / a).is_symlink() or (self.jobs_dir / b).is_symlink():
            return
        rel = self.file_of(b)
        if rel is None or (self.jobs_dir / a / rel).is_symlink() or not (self.jobs_dir / a / rel).is_file():
            return
        if (self.jobs_dir / a / rel).read_bytes() == (self.jobs_dir / b / rel).read_bytes():
            return  # identical bytes in both jobs (e.g. a config): no damage
        shutil.copyfile(self.jobs_dir / b / rel, self.jobs_dir / a / rel)
        self.damaged.add(a)
        self.done.append(f"copy {b[:6]}/{rel} -> {a[:6]}")

    def unseal(self) -> None:
        a = self.job()
        if (self.jobs_dir / a).is_symlink() or not (self.jobs_dir / a).is_dir():
            return
        sealed = [p for p in [self.jobs_dir / a / "record.json", *(self.jobs_dir / a / "scores").glob("*.json")]
                  if p.is_file() and not p.is_symlink()]
        if not sealed:
            return
        path = self.rng.choice(sealed)
        try:
            value = json.loads(path.read_text())
        except (ValueError, RecursionError):  # already made deep by another mutation
            return
        if not isinstance(value, dict) or "_sha256" not in value:
            return
        value.pop("_sha256")
        if "labels" in value and self.rng.random() < 0.5:
            value["labels"] = {k: 99999 for k in value["labels"]}
        if path.name != "record.json":
            value.pop("population", None)  # as scores were written before seals
        path.write_text(json.dumps(value, indent=2, sort_keys=True))
        self.damaged.add(a)
        self.done.append(f"unseal {a[:6]}/{path.relative_to(self.jobs_dir / a)}")

    def absurd_claim(self) -> None:
        a = self.job()
        self.claims_dir.mkdir(exist_ok=True)
        expires = self.rng.choice([1e300, float(2**62), time.time() + 10 * 86400])
        (self.claims_dir / a).write_text(json.dumps({"job_id": a, "worker": "x", "token": "t", "expires": expires,
                                                     "lease_s": self.rng.choice([120, 1e300])}))
        self.done.append(f"claim {a[:6]} expires {expires:.3g}")

    def link_versions(self) -> None:
        versions = self.store / "published" / ".versions"
        if versions.is_symlink():
            return
        shutil.rmtree(versions, ignore_errors=True)
        os.symlink(self.outside, versions)
        self.done.append(".versions -> outside")

    def link_published(self) -> None:
        link = self.store / "published" / self.population
        if link.is_symlink() or link.exists():
            link.unlink() if link.is_symlink() else shutil.rmtree(link)
        os.symlink(self.outside, link)
        self.done.append("published link -> outside")

    def link_lock(self) -> None:
        lock = self.store / "published" / f".lock-{self.population}"
        lock.unlink(missing_ok=True)
        os.symlink(self.outside / "lock-target", lock)
        self.done.append("publish lock -> outside")

    def wrong_type(self) -> None:
        """A job folder replaced by a file, or a bookkeeping file by a folder or a FIFO (second review)."""
        a = self.job()
        if (self.jobs_dir / a).is_symlink():
            return
        how = self.rng.choice(["folder-is-file", "record-is-folder", "record-is-fifo", "spec-is-fifo"])
        if how == "folder-is-file":
            shutil.rmtree(self.jobs_dir / a)
            (self.jobs_dir / a).write_text("not a folder")
        else:
            path = self.jobs_dir / a / ("record.json" if how.startswith("record") else "spec.json")
            if not path.is_file() or path.is_symlink():
                return
            path.unlink()
            path.mkdir() if how.endswith("folder") else os.mkfifo(path)
        self.damaged.add(a)
        self.done.append(f"{how} {a[:6]}")

    def deep_json(self) -> None:
        """A bookkeeping file 100,000 brackets deep (second review: RecursionError)."""
        a = self.job()
        if (self.jobs_dir / a).is_symlink() or not (self.jobs_dir / a).is_dir():
            return
        name = self.rng.choice(["record.json", "spec.json"])
        if not (self.jobs_dir / a / name).is_file() or (self.jobs_dir / a / name).is_symlink():
            return
        (self.jobs_dir / a / name).write_text("[" * 100_000)
        self.damaged.add(a)
        self.done.append(f"deep {a[:6]}/{name}")

    def baseline_outside_refresh(self) -> None:
        self.outside_before = _digest(self.outside)

    MUTATIONS = ("swap", "link_job_to_job", "link_job_outside", "link_file", "copy_file", "unseal", "absurd_claim",
                 "link_versions", "link_published", "link_lock", "wrong_type", "deep_json")


@pytest.fixture(scope="module")
def cli():
    from pipeline.cli import main

    return main


def _run(cli, capsys, *args) -> tuple[int, str]:
    """(exit code, stdout + stderr); an exception escaping main() is a traceback: reported as code None."""
    try:
        code = cli([str(a) for a in args])
    except BaseException as exc:  # noqa: BLE001 - counted, then reported by the test
        captured = capsys.readouterr()
        return None, f"{type(exc).__name__}: {exc}\n{captured.out}{captured.err}"
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_the_fuzzed_store_never_hides_damage_writes_outside_or_raises(smoke_population, tmp_path, cli, capsys):
    folder, overrides = smoke_population
    population = "tiny-shapes"
    outcomes, failures = [], []
    for index in range(CASES):
        rng = random.Random(index)
        root = tmp_path / f"case-{index}"
        store, outside = root / "store", root / "outside"
        shutil.copytree(folder, store, symlinks=True)
        outside.mkdir()
        (outside / "precious.txt").write_text("do not touch")
        (outside / f"{population}-20200101T000000-0123abcd").mkdir()
        case = Case(store, outside, rng, population)
        for name in rng.sample(Case.MUTATIONS, rng.randint(1, 3)):
            getattr(case, name)()
        case.baseline_outside_refresh()
        common = [SHAPES, *overrides, "--store", str(store)]
        problems = []

        code, out = _run(cli, capsys, "verify", *common)
        named = {job for job in case.jobs if job in out}
        if code is None:
            problems.append(f"verify raised: {out[:300]}")
        elif case.damaged and (code != 1 or not case.damaged <= named):
            problems.append(f"verify exit {code}, named {sorted(j[:6] for j in named)} of damaged "
                            f"{sorted(j[:6] for j in case.damaged)}")
        elif not case.damaged and code != 0:
            problems.append(f"verify exit {code} on an undamaged store: {out[-300:]}")
        code, out = _run(cli, capsys, "status", *common)
        if code is None:
            problems.append(f"status raised: {out[:300]}")
        code, out = _run(cli, capsys, "publish", *common)
        if code is None:
            problems.append(f"publish raised: {out[:300]}")
        elif case.damaged and code != 2:
            problems.append(f"publish exit {code} with damaged jobs")
        if index % FINETUNE_EVERY == 0:
            code, out = _run(cli, capsys, "finetune", *common)
            if code is None:
                problems.append(f"finetune raised: {out[:300]}")
            code, out = _run(cli, capsys, "verify", *common)
            if code != 0:
                problems.append(f"after finetune, verify exit {code}: {out[-400:]}")
        if _digest(outside) != case.outside_before:
            problems.append("something outside the store was written or deleted")
        outcomes.append({"case": index, "mutations": case.done, "damaged": len(case.damaged), "problems": problems})
        if problems:
            failures.append(f"case {index} ({'; '.join(case.done)}): {'; '.join(problems)}")
        shutil.rmtree(root)
    write_report("store-fuzz", outcomes)
    assert sum(o["damaged"] > 0 for o in outcomes) >= CASES // 3  # the fuzzer does damage
    assert not failures, f"{len(failures)} of {CASES} cases broke a promise:\n" + "\n".join(failures[:20])

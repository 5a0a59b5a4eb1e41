"""An interrupted publish leaves a complete published version: the previous one, or the new one
once the link was swapped — never a mix. Failures are injected at every step of the install,
and real publishing processes are SIGKILLed at random moments."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import pipeline.publish as publish_module
from pipeline.publish import publish_population

from .conftest import ROOT, SHAPES, TRIALS, tree_digest, write_report

VOLATILE = ("state.json",)  # datasets' random fingerprint: the only bytes that differ between identical publishes


def content(folder) -> dict[str, str]:
    return {path: digest for path, digest in tree_digest(folder).items() if not path.endswith(VOLATILE)}


def check_complete(link, reference: dict[str, str], rows: dict[str, int]) -> None:
    """The published folder holds exactly the reference files (same bytes) and loads as tensors."""
    from lol_models.data import pull

    assert link.is_symlink() and link.resolve().parent.name == ".versions"
    assert content(link) == reference
    assert {split: len(pull(link, split)) for split in rows} == rows


def check_cleaned_by_next_publish(store, manifest, link, reference, rows) -> None:
    publish_population(manifest, store)
    check_complete(link, reference, rows)
    assert [p.name for p in (link.parent / ".versions").iterdir()] == [link.resolve().name]
    assert not list(link.parent.glob(".link-*"))


class Boom(RuntimeError):
    pass


@pytest.mark.slow
def test_injected_failures_at_each_install_step_keep_a_complete_version(smoke_copy, monkeypatch):
    store, manifest = smoke_copy
    link = store.local_path(f"published/{manifest.population.name}")
    reference, rows = content(link), {"train": 2, "validation": 1, "test": 1}
    files = len(tree_digest(link))  # what the install copies into .versions
    rng = random.Random(0)
    outcomes = []
    failing_copies = sorted(rng.sample(range(1, files + 1), k=min(TRIALS or 5, files)))
    cases = [("copy", k) for k in failing_copies] + [("swap", 0), ("cleanup", 0)]
    for step, k in cases:
        before = link.resolve()
        with monkeypatch.context() as patch:
            _inject(patch, step, k)
            with pytest.raises(Boom):
                publish_population(manifest, store)
        current = link.resolve()
        outcomes.append({"step": step, "after file": k, "version": "previous" if current == before else "new"})
        assert current == before if step != "cleanup" else current != before
        check_complete(link, reference, rows)
    check_cleaned_by_next_publish(store, manifest, link, reference, rows)
    write_report("injected-publish-failures", outcomes)


def _inject(patch, step: str, k: int) -> None:
    if step == "copy":
        calls = {"n": 0}
        real_copytree = shutil.copytree

        def copy_then_fail(src, dst, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == k:
                raise Boom(f"disk full after {k - 1} files")
            return shutil.copy2(src, dst, *args, **kwargs)

        def copytree(src, dst, *args, **kwargs):  # subfolders recurse with the top call's arguments
            return real_copytree(src, dst, *args, **kwargs) if args else real_copytree(src, dst, copy_function=copy_then_fail)

        patch.setattr(publish_module.shutil, "copytree", copytree)
    elif step == "swap":
        patch.setattr(publish_module.os, "replace", lambda *a: (_ for _ in ()).throw(Boom("crash at the swap")))
    else:
        patch.setattr(publish_module, "_remove_stale", lambda *a, **k: (_ for _ in ()).throw(Boom("crash cleaning up")))


CHILD = textwrap.dedent("""
    import sys
    from pipeline.manifest import Manifest
    from pipeline.publish import publish_population
    from storage import Store
    manifest = Manifest.from_yaml(sys.argv[1], overrides=sys.argv[3:])
    store = Store(sys.argv[2])
    n = 0
    while True:
        publish_population(manifest, store)
        n += 1
        print(f"published {n}", flush=True)
""")


@pytest.mark.slow
def test_publishing_processes_killed_at_random_moments_leave_a_complete_version(smoke_copy, smoke_population):
    """Each trial: a process republishes in a loop; after its first publish it is SIGKILLed at a
    random moment within one publish cycle (so kills land in assembling, writing, copying into
    .versions, swapping and cleaning up)."""
    store, manifest = smoke_copy
    overrides = smoke_population[1]
    link = store.local_path(f"published/{manifest.population.name}")
    reference, rows = content(link), {"train": 2, "validation": 1, "test": 1}
    outcomes = []
    for trial in range(TRIALS or 4):
        rng = random.Random(trial)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(SHAPES), store.url, *overrides], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 env={**os.environ, "LOL_TORCH_THREADS": "1"})
        try:
            started = time.monotonic()
            assert child.stdout.readline().startswith("published 1"), "the child never published"
            cycle = time.monotonic() - started
            time.sleep(rng.uniform(0, min(cycle, 1.5)))
            before = link.resolve()
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
        left = len(list((link.parent / ".versions").iterdir())) - 1
        swapped = link.resolve() != before  # the swap raced the kill signal
        outcomes.append({"trial": trial, "version": "new" if swapped else "previous",
                         "killed": "after the swap, before cleanup" if left and swapped else "copying into .versions"
                         if left else "assembling or writing the staging folder (outside the store)",
                         "temporary links left": len(list(link.parent.glob(".link-*")))})
        check_complete(link, reference, rows)
    check_cleaned_by_next_publish(store, manifest, link, reference, rows)
    write_report("killed-publishes", outcomes)

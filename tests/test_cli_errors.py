"""Bad input versus bugs at the front door (issue #18 item 6).

A `DomainError` (bad input the user can fix) is one line `error: …` and exit 2; any other exception
is a bug: its traceback on stderr and exit 1, even a plain ValueError or KeyError.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli.common import EXIT_BAD_INPUT, EXIT_BUG
from storage import DomainError

TINY = Path(__file__).resolve().parent.parent / "manifests" / "tiny-shapes.yaml"


def _domain_classes():
    from flows.commands import OrchestrationError
    from lol_models.common import SettingsError
    from lol_models.published import FormatError, PulledDataError
    from pipeline.artefacts import ArtefactUnavailableError
    from pipeline.bases import BaseModelError
    from pipeline.cohort import CohortError
    from pipeline.data.base import DataSourceError
    from pipeline.data.hub import DatasetUnavailableError
    from pipeline.jobs import ShardError
    from pipeline.manifest import ManifestError
    from pipeline.publish import PublishError
    from pipeline.safe_weights import UnsafeWeightsError
    from pipeline.score import ScorerError
    from pipeline.speed import SpeedError
    from pipeline.yaml_source import YamlDuplicateKeyError, YamlSyntaxError
    from storage import StoreError
    from storage.seal import CorruptFile

    return [OrchestrationError, SettingsError, FormatError, PulledDataError, ArtefactUnavailableError, BaseModelError,
            CohortError, DataSourceError, DatasetUnavailableError, ShardError, ManifestError, PublishError,
            UnsafeWeightsError, ScorerError, SpeedError, YamlSyntaxError, YamlDuplicateKeyError, StoreError, CorruptFile]


def test_every_domain_error_derives_from_the_one_base_and_stays_a_value_error():
    for cls in _domain_classes():
        assert issubclass(cls, DomainError) and issubclass(cls, ValueError), cls


@pytest.mark.parametrize("bug", [ValueError("an internal invariant broke"), KeyError("missing_key"), TypeError("bad call")],
                         ids=["ValueError", "KeyError", "TypeError"])
def test_a_bug_in_a_command_exits_1_with_its_traceback(run_cli, monkeypatch, bug):
    import pipeline.cli.population as population

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(population, "expand", broken)  # what `lol plan` calls after loading the manifest
    code, out, err = run_cli("plan", TINY)
    assert code == EXIT_BUG == 1
    assert "Traceback (most recent call last)" in err and "in broken" in err, err
    assert f"{type(bug).__name__}: " in err
    assert not any(line.startswith("error: ") for line in err.splitlines())  # not dressed up as bad input


def test_a_domain_error_raised_by_a_command_exits_2_on_one_line(run_cli, monkeypatch):
    import pipeline.cli.population as population
    from pipeline.data.base import DataSourceError

    def refuses(*args, **kwargs):
        raise DataSourceError("data source 'nowhere' is not installed; run `pip install nowhere`")

    monkeypatch.setattr(population, "expand", refuses)
    code, out, err = run_cli("plan", TINY)
    assert code == EXIT_BAD_INPUT == 2
    assert err.strip() == "error: data source 'nowhere' is not installed; run `pip install nowhere`"
    assert "Traceback" not in err


@pytest.mark.parametrize("args, names", [
    (("validate", "no-such-manifest.yaml"), "no such manifest file"),
    (("validate", TINY, "count=-1"), "count"),
    (("train", TINY, "--store", "/no/such/store/here"), "/no/such/store/here"),
    (("pull", "/no/such/published/folder"), "/no/such/published/folder"),
    (("plan", TINY, "--show", "many"), "--show"),  # a usage error of typer/click
], ids=["missing manifest", "bad value", "missing store", "missing published folder", "bad option"])
def test_bad_input_exits_2_without_a_traceback(run_cli, args, names):
    code, out, err = run_cli(*args)
    assert code == EXIT_BAD_INPUT, err
    assert names in err and "Traceback" not in err


def test_a_bad_thread_count_in_the_environment_is_bad_input(run_cli, monkeypatch):
    monkeypatch.setenv("LOL_TORCH_THREADS", "two")
    code, out, err = run_cli("plan", TINY)
    assert code == EXIT_BAD_INPUT and "LOL_TORCH_THREADS='two'" in err and "Traceback" not in err

"""A hub token in the environment never reaches anything the system writes or prints: the store,
the published folder and card, logs, CLI output, exception messages, Prefect's database."""

from __future__ import annotations

import logging
import secrets
import string
import traceback
from pathlib import Path

import pytest

from pipeline.hub import TOKEN_VARIABLES
from pipeline.manifest import Manifest
from pipeline.publish import PublishError, publish_population
from storage import Store

from .conftest import SHAPES, smoke_overrides

REPO = "lol-tests/leak-check"


@pytest.fixture
def token(monkeypatch) -> str:
    value = "hf_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(34))
    for name in TOKEN_VARIABLES:
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a push fails fast, as it would on a machine without the hub
    return value


def files_holding(folder: Path, secret: str) -> list[str]:
    """Every file under `folder` whose bytes contain `secret` (as text or in a database page)."""
    needle = secret.encode()
    return [str(p) for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def exception_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(getattr(exc, "__context__", ""))


def echoing_hub_error(token: str):
    """What a careless HTTP error looks like: it repeats the request's credentials."""

    def create_repo(*args, **kwargs):
        raise ConnectionError(f"401 Unauthorized for https://huggingface.co/api/repos/create "
                              f"(headers: {{'authorization': 'Bearer {token}'}}, token={token})")

    return create_repo


@pytest.mark.slow
def test_a_token_never_reaches_the_store_logs_or_errors(tmp_path, run_cli, random_sd, token, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    overrides = smoke_overrides(random_sd, "count=2", f"publish.repo_id={REPO}")
    store_dir = tmp_path / "store"
    printed = []
    for stage in ("finetune", "score"):
        code, out, err = run_cli(stage, SHAPES, *overrides, "--store", store_dir)
        assert code == 0, err
        printed += [out, err]
    code, out, err = run_cli("publish", SHAPES, *overrides, "--store", store_dir)
    printed += [out, err]
    assert code == 2 and f"pushing to {REPO} failed" in err and "rerun `lol publish`" in err, err
    assert "Traceback" not in err

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", echoing_hub_error(token))
    manifest = Manifest.from_yaml(SHAPES, overrides=overrides)
    with pytest.raises(PublishError) as info:
        publish_population(manifest, Store(str(store_dir)))
    assert "<redacted>" in str(info.value)  # the error was echoed, and scrubbed
    code, out, err = run_cli("publish", SHAPES, *overrides, "--store", store_dir)
    printed += [out, err, exception_text(info.value)]
    assert code == 2 and "<redacted>" in err

    assert (store_dir / "published" / "tiny-shapes" / "README.md").is_file()  # the run did write things
    assert files_holding(tmp_path, token) == []
    assert not [text for text in printed if token in text]
    assert token not in caplog.text


@pytest.mark.slow
def test_a_token_never_reaches_prefect_logs_artifacts_or_states(prefect_harness, tmp_path, random_sd, token):
    """Through the Prefect flows, with a push that fails: Prefect's whole database is searched."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME

    from flows.population import run_population

    overrides = smoke_overrides(random_sd, "count=2", f"publish.repo_id={REPO}")
    with pytest.raises(Exception) as info:
        run_population(str(SHAPES), overrides, str(tmp_path / "store"), retries=0, stages=["finetune", "score", "publish"])
    assert f"pushing to {REPO} failed" in str(info.value)
    assert token not in exception_text(info.value)
    database = PREFECT_API_DATABASE_CONNECTION_URL.value().split("///", 1)[-1]
    searched = [tmp_path, Path(PREFECT_HOME.value()), Path(database).parent]
    assert files_holding(Path(database).parent, f"pushing to {REPO} failed"), "the failure is in the database"
    assert [hit for folder in searched for hit in files_holding(folder, token)] == []

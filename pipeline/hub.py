"""Pushing a published folder to the Hugging Face hub: resumable, shard by shard.

The token comes from the environment (`HF_TOKEN` or `HUGGING_FACE_HUB_TOKEN`) and is never
printed, logged or written. Shards are named by their content hash, so `plan_push` adds only
the shards the repo lacks and deletes the ones no longer published; a push interrupted after
some shards resumes by uploading the rest.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
ALWAYS_UPLOADED = ("README.md", "layout.json", "labels.json", "manifest.yaml")
REDACTED = "<redacted>"
# Hub tokens (hf_…) and bearer credentials, wherever an error message or a log echoes them.
_CREDENTIAL = re.compile(r"\bhf_[A-Za-z0-9]{8,}|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}")


def token_from_env() -> str | None:
    for name in TOKEN_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def redact(text: str, token: str | None = None) -> str:
    """`text` with the token (and anything shaped like a hub token or bearer credential) removed."""
    if token:
        text = text.replace(token, REDACTED)
    return _CREDENTIAL.sub(REDACTED, text)


def local_files(folder: Path) -> list[str]:
    """Files of the published folder that belong in the hub repo (the parquet view, not arrow/)."""
    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return [f for f in files if f.startswith("data/") or f in ALWAYS_UPLOADED]


def plan_push(folder: Path, remote_files: list[str]) -> tuple[list[str], list[str]]:
    """(files to upload, remote files to delete) to make the repo match `folder`."""
    local = local_files(folder)
    remote = set(remote_files)
    upload = [f for f in local if f not in remote or f in ALWAYS_UPLOADED]
    delete = sorted(f for f in remote if f.startswith("data/") and f not in set(local))
    return upload, delete


def push_folder(folder: str | Path, repo_id: str, token: str, private: bool = False, shards_per_commit: int = 8) -> None:
    """Create the dataset repo if needed and commit the missing shards, a few per commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder = Path(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    upload, delete = plan_push(folder, api.list_repo_files(repo_id, repo_type="dataset"))
    shards = [f for f in upload if f.startswith("data/")]
    for start in range(0, len(shards), shards_per_commit):
        batch = shards[start:start + shards_per_commit]
        api.create_commit(repo_id, repo_type="dataset", commit_message=f"add {len(batch)} shard(s)",
                          operations=[CommitOperationAdd(f, str(folder / f)) for f in batch])
    final = [CommitOperationAdd(f, str(folder / f)) for f in upload if not f.startswith("data/")]
    final += [CommitOperationDelete(f) for f in delete]
    api.create_commit(repo_id, repo_type="dataset", commit_message="update card and remove stale shards", operations=final)

"""Pushing a published folder to the Hugging Face hub, with `HfApi.upload_folder`.

The token comes from the environment (`HF_TOKEN` or `HUGGING_FACE_HUB_TOKEN`) and is never
printed, logged or written. `push_folder` creates the dataset repo if needed (`private` applies
to a repo it creates), then one `upload_folder` call uploads the hub's view of the folder — the
card, `layout.json`, `labels.json`, `manifest.yaml` and the parquet shards under `data/`, not the
Arrow copy — and deletes the files under `data/` that are no longer published.

Shards are named by their content, so huggingface_hub skips the ones the repo already holds (it
compares each file with the remote's, and the Xet backend does not send chunks it has), and a push
that was interrupted resumes when it is rerun. A folder of a few hundred shards or fewer is one
commit, so the card and the shards it names change together; a larger one is committed in batches
(deletions ride the first), as huggingface_hub's upload pipeline sizes them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lol_models.published import LABELS_FILE, LAYOUT_FILE

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
HUB_FILES = ("README.md", LAYOUT_FILE, LABELS_FILE, "manifest.yaml", "data/*")  # upload_folder's allow_patterns
STALE_FILES = ("data/*",)  # upload_folder's delete_patterns: what the repo holds there and the folder does not
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


def push_folder(folder: str | Path, repo_id: str, token: str, private: bool = False):
    """Make the dataset repo `repo_id` hold the published `folder`'s hub files; returns the last
    commit's `CommitInfo`. The repo is created (private if `private`) when it does not exist."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder),
                             allow_patterns=list(HUB_FILES), delete_patterns=list(STALE_FILES),
                             commit_message="Publish the LoRA population (lol publish)")

"""Self-checking JSON files: the bookkeeping files (`record.json`, scores) carry their own sha256.

A record lists the checksums of a LoRA's files, but nothing checked the record itself, or a
score: a flipped byte in a label or a metric read back as a different, valid number. A sealed
file is ordinary JSON whose first key holds the sha256 of the exact bytes of the rest::

    {
      "_sha256": "9f86d081…",          <- sha256 of the file without this line
      "job_id": "…",
      …
    }

so any accidental change to its bytes is caught. A seal is a checksum, not a signature: whoever
can write the store can recompute it, so it guards against damage, not against a forger (keep
the store writable by its workers only). A file without a seal is refused: removing the seal line
must not turn an edited file into an "old" one. Files written before seals existed are sealed
once, after their identity and checksums are checked, by `PopulationStore.reseal`
(`lol verify --reseal`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from storage.errors import DomainError

SEAL_KEY = "_sha256"
_PREFIX = '{\n  "' + SEAL_KEY + '": "'
_DIGEST_LEN = 64
_AFTER_DIGEST = '",\n'


class CorruptFile(DomainError):
    """A sealed file whose bytes do not match its seal, or that is not the JSON it should be."""


def seal(value: dict[str, Any]) -> bytes:
    """The bytes of `value` as sealed JSON (sorted keys, two-space indent)."""
    assert isinstance(value, dict) and value and SEAL_KEY not in value, "seal() takes a non-empty dict"
    body = json.dumps(value, indent=2, sort_keys=True)
    digest = hashlib.sha256(body.encode()).hexdigest()
    return f"{_PREFIX}{digest}{_AFTER_DIGEST}{body[2:]}\n".encode()


def unseal(data: bytes) -> dict[str, Any]:
    """The value of a sealed file (without the seal key); `CorruptFile` if its bytes were changed."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFile(f"not UTF-8 at byte {exc.start}") from None
    if text.startswith(_PREFIX):
        digest = text[len(_PREFIX):len(_PREFIX) + _DIGEST_LEN]
        rest = text[len(_PREFIX) + _DIGEST_LEN:]
        if not rest.startswith(_AFTER_DIGEST) or not rest.endswith("\n"):
            raise CorruptFile("the seal line is damaged")
        body = "{\n" + rest[len(_AFTER_DIGEST):-1]
        if hashlib.sha256(body.encode()).hexdigest() != digest:
            raise CorruptFile(f"content does not match its seal {digest[:12]}…")
        return _as_dict(body)
    _as_dict(text)
    raise CorruptFile("no seal (an unsealed file is refused; `lol verify --reseal` migrates files written before seals)")


def _as_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CorruptFile(f"not JSON: {exc}") from None
    except RecursionError:
        raise CorruptFile("JSON nested too deep") from None
    if not isinstance(value, dict):
        raise CorruptFile(f"expected a JSON object, got {type(value).__name__}")
    return value

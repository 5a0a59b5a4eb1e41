"""The base of every domain error: bad input that the user can fix (issue #18 item 6).

A domain error says that what the user brought cannot be used — a manifest, a store, a data
source, a base model, an artefact, a published dataset, a CLI option, an orchestration setting —
and quotes the bad value and what would be valid. `lol` shows it as one line (`error: …`, a
hint) and exits 2. Anything else that escapes a command is a bug: `lol` prints its traceback and
exits 1. So raise a `DomainError` subclass where user input is refused, and a plain
`ValueError`/`RuntimeError` (or an `assert`) for an internal invariant.

It lives here, at the bottom layer, because every package must be able to raise it: `storage`
may import nothing of ours, and `lol_models` never imports `pipeline` or `flows` (the import
contracts in pyproject.toml), while all of them may import `storage`. This module imports
nothing at all. It subclasses `ValueError`, so existing `except ValueError` code keeps catching
the errors that now derive from it.
"""

from __future__ import annotations


class DomainError(ValueError):
    """Input the user can fix: `lol` prints one line and exits 2 (anything else is a bug: traceback, exit 1)."""

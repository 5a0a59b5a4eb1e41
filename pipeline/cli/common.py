"""What every `lol` command module shares: the consoles, the argument types, manifest loading, exit codes.

Command modules (pipeline/cli/*.py, and the tooling plugins registered under the `lol.commands`
entry points) parse, call one library function and render what it returns.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from pipeline.manifest import Manifest

out = Console(soft_wrap=True)  # a line is one line in logs and pipes, whatever the path lengths
err = Console(stderr=True, soft_wrap=True)

EXIT_PROBLEMS, EXIT_BAD_INPUT = 1, 2
EXIT_BUG = 1  # an exception that is not a DomainError: its traceback, then exit 1 (like a crashed Python program)

ManifestArg = Annotated[Path, typer.Argument(help="Manifest YAML file.", show_default=False)]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides, e.g. count=10 lora.rank=8.", show_default=False)]
StoreOpt = Annotated[Optional[str], typer.Option("--store", help="Store URL or path; default $LOL_STORE, else ./lol-store.")]


def load(manifest_path: Path, overrides: list[str] | None) -> Manifest:
    return Manifest.from_yaml(manifest_path, overrides=overrides or [])


def progress_bar() -> Progress:
    """A transient progress bar on stderr (stdout stays the command's result); none where stderr is not a
    terminal (a log file or a pipe gets no bar and no blank line where the bar was)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True, disable=not err.is_terminal)


@contextlib.contextmanager
def units_progress(description: str) -> Iterator[Callable[[str, str], None]]:
    """An `on_run(predictor, task)` callback for the learn commands: on a terminal a transient bar counting the
    finished predictor × task units; in a log or a pipe one timestamped line per unit, so a run in the
    background shows how far it is (a unit can take many minutes)."""
    started = time.monotonic()
    with progress_bar() as progress:
        task = progress.add_task(description, total=None)
        done = 0

        def on_run(predictor: str, name: str) -> None:
            nonlocal done
            done += 1
            progress.update(task, description=f"{predictor} on {name} done", advance=1)
            if not err.is_terminal:
                minutes = (time.monotonic() - started) / 60
                err.print(f"{time.strftime('%H:%M:%S')} {predictor} on {name} done ({done} unit(s), {minutes:.1f} min)",
                          highlight=False)

        yield on_run


def report_missing_artefacts(manifest: Manifest) -> bool:
    """Print one `error:` line per hub artefact the manifest needs that is neither cached nor reachable
    (`pipeline.fetch.missing_artefacts`); True if there was any (the command then exits 2)."""
    from pipeline.fetch import missing_artefacts

    missing = missing_artefacts(manifest)
    for line in missing:
        err.print(Text.assemble(("error: ", "bold red"), line), highlight=False)
    return bool(missing)

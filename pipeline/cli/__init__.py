"""`lol`: the front door. Every subcommand is a thin call into library functions.

`main(argv)` returns the exit code instead of exiting, so tests call it directly.
Exit codes: 0 ok, 1 the command ran and found problems (e.g. `verify`) or hit a bug, 2 bad input.
Bad input is a `DomainError` (storage/errors.py; ManifestError, StoreError, DataSourceError… derive
from it) or a usage error of click/typer: one line `error: …`, a hint, exit 2. Anything else is a
bug: its traceback on stderr, exit 1 — a plain ValueError or KeyError is never taken for bad input.

One module per command group: population.py (validate, fetch, plan, status, verify, run, deploy),
stages.py (finetune, score, publish, pull, train, evaluate, report), results.py (predict, export),
experiment.py. Tooling adds
its groups through the `lol.commands` entry points (`lol bench` from bench/, `lol bases` from
tinyworld/), so the library never imports it.
"""

from __future__ import annotations

import os
import sys
import traceback
from importlib.metadata import entry_points

import click
import typer
from rich.text import Text

from pipeline.cli import experiment, population, results, stages
from pipeline.cli.common import EXIT_BAD_INPUT, EXIT_BUG, err
from pipeline.manifest import ManifestError
from storage import DomainError, StoreError

PLUGIN_GROUP = "lol.commands"

app = typer.Typer(
    name="lol",
    help="Populations of finetuned LoRAs: finetune, score, publish, and learn on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(population.app)
app.add_typer(stages.app)
app.add_typer(results.app)
app.add_typer(experiment.experiment_app, name="experiment")


_plugged: set[str] = set()


def add_plugins(target: typer.Typer) -> None:
    """Add the command groups that tooling registers (entry point name = group name, value = its Typer).

    Called when a command line is parsed, not at import: the plugins import `pipeline.cli.common`,
    so importing them while this package initialises would be circular."""
    for plugin in sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name):
        if plugin.name not in _plugged:
            target.add_typer(plugin.load(), name=plugin.name)
            _plugged.add(plugin.name)

USER_ERRORS = (DomainError,)  # bad input the user can fix; every domain error class derives from DomainError


def _hint(exc: Exception) -> str | None:
    if isinstance(exc, ManifestError):
        return "fix the lines above; `lol validate FILE` re-checks without running anything"
    if isinstance(exc, StoreError):
        return "pass --store PATH_OR_URL or set LOL_STORE"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 problems found or a bug, 2 bad input)."""
    if threads := os.environ.get("LOL_TORCH_THREADS"):  # small models on shared CPUs run faster on one thread
        if not threads.strip().isdigit() or int(threads) < 1:
            err.print(Text.assemble(("error: ", "bold red"), f"LOL_TORCH_THREADS={threads!r}: give a whole number ≥ 1, or unset it"),
                      highlight=False)
            return EXIT_BAD_INPUT
        import torch

        torch.set_num_threads(int(threads))
    if not err.is_terminal:  # a log or a pipe: no progress bars of datasets / huggingface_hub either
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    add_plugins(app)
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="lol", standalone_mode=False)
    except (click.exceptions.Exit, typer.Exit) as exc:
        return exc.exit_code
    except (click.exceptions.Abort, typer.Abort):
        err.print("aborted")
        return 130
    except (click.ClickException, typer.TyperException) as exc:  # typer ≥ 0.2x raises its own copy of click's
        exc.show()
        return EXIT_BAD_INPUT
    except USER_ERRORS as exc:
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False)
        if (hint := _hint(exc)) is not None:
            err.print(f"hint: {hint}")
        return EXIT_BAD_INPUT
    except Exception:  # a bug, not bad input: show where it happened
        traceback.print_exc(file=sys.stderr)
        err.print("unexpected error: not one lol knows as bad input (a bug, or a failure outside its checks); "
                  "the traceback above shows where it happened")
        return EXIT_BUG
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

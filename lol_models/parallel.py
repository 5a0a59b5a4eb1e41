"""Independent (predictor, task) units in worker processes: what `lol train --workers` and the
experiments' `--workers` share.

Workers are spawned (no fork of a parent holding torch threads), each set up once by
`initializer(*initargs, threads)` with cores / workers torch threads, so a unit's data is loaded in
the worker rather than pickled per unit. Every unit is seeded, so results equal one process's up to
float rounding of the thread count.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

__all__ = ["run_units", "submission_order"]


def submission_order(costs: Sequence[float] | None, n: int) -> list[int]:
    """Unit indices, dearest first (ties, and `costs` None: as given)."""
    if costs is None:
        return list(range(n))
    if len(costs) != n:
        raise ValueError(f"{len(costs)} costs for {n} units")
    return sorted(range(n), key=lambda i: -costs[i])


def run_units(units: Sequence[tuple[Any, ...]], unit: Callable[..., Any], workers: int,
              initializer: Callable[..., None], initargs: tuple[Any, ...],
              finished: Callable[[int, Any], None], costs: Sequence[float] | None = None) -> None:
    """Call `unit(*units[i])` for every i in `workers` spawned processes; `finished(i, result)` as each ends.

    costs: each unit's expected relative time; the dearest start first (longest-processing-time order), so
    the last unit left running, alone on its share of the cores, is a cheap one (None: in the given order).

    `unit` and `initializer` must be module-level functions (spawned workers import them). The first
    failing unit cancels those not started and re-raises (units running on finish and are kept). An interrupt —
    KeyboardInterrupt, or SystemExit from SIGTERM (`pipeline.runtime.sigterm_exits`) — terminates the workers at
    once: a unit's files are written when it ends, so a stopped unit leaves nothing `lol train` would keep.
    """
    workers = max(1, min(workers, len(units)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer,
                             initargs=(*initargs, threads)) as pool:
        futures = {pool.submit(unit, *units[i]): i for i in submission_order(costs, len(units))}
        try:
            for future in as_completed(futures):
                finished(futures[future], future.result())
        except BaseException as exc:
            if not isinstance(exc, Exception):  # SIGTERM (as SystemExit) or Ctrl-C: stop now, not after the running units
                for process in list((getattr(pool, "_processes", None) or {}).values()):
                    process.terminate()
            pool.shutdown(cancel_futures=True)
            raise

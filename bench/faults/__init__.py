"""Fault injection: real workers on a smoke population, faults put in, promises checked.

Shared by the reliability tests (`tests/reliability/test_faults_*.py`) and `lol bench faults`:

- `scenarios`: the scenarios (kill -9, concurrent workers, faults in jobs, a scorer crash, a full
  disk, a flaky store), their promises, and `run_scenarios`;
- `lab`: the smoke population, fresh stores, worker settings, the reference run;
- `worker`: a worker process forked from a warm fork server (`zygote`), runnable and killable;
- `inject`: the faults (an injecting trainer, a crashing scorer, flaky and quota stores) and the
  event log that counts trainings;
- `disk`: a disk that fills up (a size-limited tmpfs, or a quota);
- `checks`: what a store holds afterwards; `report`: the table rows and the results file.
"""

# The scenario names, in the order they run (bench/faults/scenarios.py defines each): a light
# constant, so `lol bench faults --scenario` offers them without importing the harness.
SCENARIO_NAMES = ("kill", "concurrent-2", "concurrent-4", "job-exception", "non-finite-loss", "out-of-memory",
                  "scorer-crash", "full-disk", "flaky-store")

"""Settings of the Prefect server that a population of thousands of jobs needs.

The server records task runs from the events its clients send: each event goes through an in-memory
message queue (10,000 messages per subscriber) to the task-run recorder, which by default writes one
event per database transaction (`batch_size` 1). At 26 task runs per second (10,000 jobs, one task per job,
4 workers, PostgreSQL) the recorder fell behind, the queue filled, and the server dropped the rest with
"Subscription queue is full, dropping message": 44% of the task runs never appeared in the UI or the API,
though every LoRA was trained (bench/results/orchestration-postgres-10000-20261205T050458.json).
Writing the recorder's events in batches keeps it ahead of the clients.

These go into the environment of `prefect server start` (docker-compose.yml's prefect-server, the
orchestration bench's server); a worker or `lol` process does not read them. docs/cluster.md says why each.
"""

from __future__ import annotations

RECOMMENDED_SERVER_ENV: dict[str, str] = {
    # task-run events written per database transaction (Prefect's default: 1)
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    # ... or every this many seconds, whichever comes first: the UI lags by at most this (default 5)
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    # events written per transaction by the event persister (default 20)
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "200",
}

DROPPED_EVENTS_LOG = "Subscription queue is full, dropping message"  # the server's warning when it drops an event

__all__ = ["RECOMMENDED_SERVER_ENV", "DROPPED_EVENTS_LOG"]

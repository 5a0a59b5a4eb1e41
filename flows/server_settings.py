"""Settings of the Prefect server that a population of thousands of jobs needs.

The server records task runs from the events its clients send: each event goes through an in-memory
message broker to each subscriber (task-run recorder, event persister, triggers), whose queue holds
10,000 messages; when a subscriber has 10,000 events waiting, the broker drops the next ones ("Subscription
queue is full, dropping message"). The task-run recorder writes one event per database transaction by
default (`batch_size` 1), so it is the subscriber that falls behind: in a 10,000-job run with one task
per job (4 workers, PostgreSQL, ≈ 31 task runs/s) its backlog passed 10,000 and 13,757 events were dropped —
34% of the task runs never appeared in the UI or the API, though every LoRA was trained
(bench/results/orchestration-postgres-10000-20261205T080123.json; the run of ...T050458.json lost 44% the
same way). Writing the recorder's events in batches kept it within seconds of the clients: none dropped
(...T081103.json). It raises the rate the recorder keeps up with; it does not remove the limit: a backlog
of 10,000 events (a stalled database, a starved server) still drops them, so watch the server's log for
DROPPED_EVENTS_LOG. The cost: a batch whose write fails is retried whole, up to 5 times, and then dropped
whole (200 events, where one event at a time loses one).

These go into the environment of `prefect server start` (docker-compose.yml's prefect-server, the
orchestration bench's server); a worker or `lol` process does not read them. docs/cluster.md says why each.
"""

from __future__ import annotations

RECOMMENDED_SERVER_ENV: dict[str, str] = {
    # task-run events written per database transaction (Prefect's default: 1)
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    # ... or every this many seconds, whichever comes first (default 5; whole seconds: Prefect truncates it)
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    # events written per transaction by the event persister (default 20)
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "200",
}

# What the server logs when it drops events: the broker (a subscriber's queue full), the event persister
# (its own queue full) and the task-run recorder (a batch that failed every retry) — a regular expression.
DROPPED_EVENTS_LOG = (r"Subscription queue is full, dropping message|Event queue full \(\d+/\d+\), dropping"
                      r"|Dropping event \S+ after \d+ failed attempts")

__all__ = ["RECOMMENDED_SERVER_ENV", "DROPPED_EVENTS_LOG"]

"""Running a task or stage again when the Prefect API, not the work, failed it.

Under load a Prefect server on SQLite answers 503 while its write lock is held; once the client's
own retries are spent the call raises, and a flow run failed as a whole with 250 jobs untrained
(issue #19: 8 workers, one task per job). `with_api_retries` runs such a call again. Every call
given to it may be repeated — the store decides what is done, so a repeat only finishes what was
left — and stages are repeated only when their body never started (`repeat_if`).

The outage clock (`ApiOutage`) is shared by the units of one stage: the first refusal starts it, any
call that gets through stops it, and once the API has been unavailable for LOL_API_RETRY_S seconds
(default API_RETRY_S) in a row, refused calls fail at once instead of each waiting a budget of its own.

An error raised in a process-pool worker reaches the flow pickled: `PrefectHTTPStatusError` cannot be
rebuilt by pickle (its base class takes keyword-only arguments), so it is registered with copyreg to
travel as itself, status code included; exception chains do not travel, so a concurrency-slot
failure is recognised by its own type.
"""

from __future__ import annotations

import copyreg
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
from prefect.exceptions import PrefectHTTPStatusError

API_RETRY_S = 600.0
API_RETRY_FIRST_PAUSE_S = 5.0
API_RETRY_MAX_PAUSE_S = 60.0
RETRY_ENV = "LOL_API_RETRY_S"


class TaskDidNotRun(RuntimeError):
    """Prefect ended a task without calling it (it returned no result): seen under load on SQLite when
    its concurrency slot could not be acquired ('ConcurrencySlotAcquisitionWithLeaseService failed to
    process item', the task 'Finished in state Pending()')."""


def retry_budget_s() -> float:
    """LOL_API_RETRY_S as seconds (default API_RETRY_S); a clear error for anything but a finite number ≥ 0."""
    raw = os.environ.get(RETRY_ENV)
    if raw is None or not raw.strip():
        return API_RETRY_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{RETRY_ENV}={raw!r}: give the seconds a stage may wait for an unavailable Prefect API, "
                         f"a finite number ≥ 0 (default {API_RETRY_S:.0f}; 0 never waits)")
    return value


class ApiOutage:
    """How long the Prefect API has been unavailable to the calls sharing this object (thread-safe)."""

    def __init__(self, budget_s: float | None = None):
        self.budget_s = retry_budget_s() if budget_s is None else budget_s
        self._since: float | None = None
        self._lock = threading.Lock()

    def refused(self) -> float:
        """Record a refusal; the seconds left before refused calls fail (≤ 0: none)."""
        with self._lock:
            now = time.monotonic()
            if self._since is None:
                self._since = now
            return self.budget_s - (now - self._since)

    def got_through(self) -> None:
        with self._lock:
            self._since = None


def api_unavailable(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it arose from, is the orchestration failing rather than the work:
    the Prefect API answered 429 or 5xx, a request to it could not be sent, a concurrency slot could not
    be acquired, or Prefect ended the task without running it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, PrefectHTTPStatusError) and (current.response.status_code == 429
                                                            or current.response.status_code >= 500):
            return True
        if isinstance(current, (ConcurrencySlotAcquisitionError, TaskDidNotRun)):
            return True
        if isinstance(current, httpx.TransportError) and _to_prefect_api(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _to_prefect_api(exc: httpx.TransportError) -> bool:
    """Whether the failed request went to the Prefect API (not, say, a model hub the work downloads from)."""
    try:
        url = str(exc.request.url)
    except RuntimeError:  # no request attached
        return False
    from prefect.settings import get_current_settings

    api = get_current_settings().api.url or os.environ.get("PREFECT_API_URL")
    if api:
        return url.startswith(api.rstrip("/"))
    host = httpx.URL(url).host
    return host in ("127.0.0.1", "localhost", "::1") and httpx.URL(url).path.startswith("/api/")  # a temporary server


def with_api_retries(call: Callable[[], Any], what: str, outage: ApiOutage | None = None,
                     repeat_if: Callable[[], bool] | None = None) -> Any:
    """call(), made again while it fails because the orchestration failed (`api_unavailable`) and
    `repeat_if()` (default: always) allows it, after pauses of API_RETRY_FIRST_PAUSE_S doubling to
    API_RETRY_MAX_PAUSE_S, until `outage` (default: a clock of this call's own) has run its budget;
    then the last error is raised."""
    outage = outage or ApiOutage()
    pause = API_RETRY_FIRST_PAUSE_S
    while True:
        try:
            result = call()
        except Exception as exc:
            if not api_unavailable(exc):
                raise
            left = outage.refused()
            if left <= 0 or (repeat_if is not None and not repeat_if()):
                raise
            wait = min(pause, left)
            _logger().warning("%s: the Prefect API is unavailable (%s: %s); again in %.0f s (%.0f s of %s left)",
                              what, type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else "", wait,
                              left, RETRY_ENV)
            time.sleep(wait)
            pause = min(pause * 2, API_RETRY_MAX_PAUSE_S)
        else:
            outage.got_through()
            return result


def _logger():
    from prefect import get_run_logger

    try:
        return get_run_logger()
    except Exception:  # outside a flow or task run (MissingContextError)
        return logging.getLogger(__name__)


def _rebuild_http_status_error(message: str, method: str, url: str, status: int, body: bytes) -> PrefectHTTPStatusError:
    request = httpx.Request(method, url)
    return PrefectHTTPStatusError(message, request=request, response=httpx.Response(status, request=request, content=body))


def _reduce_http_status_error(exc: PrefectHTTPStatusError):
    request, response = exc.request, exc.response
    return _rebuild_http_status_error, (str(exc), request.method, str(request.url), response.status_code,
                                        response.content[:4096] if hasattr(response, "_content") else b"")


copyreg.pickle(PrefectHTTPStatusError, _reduce_http_status_error)

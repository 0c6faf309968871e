"""Transient infrastructure faults: which exceptions they are, and retrying them with backoff.

A PostgreSQL restart, an S3 connection reset or a pool timeout is not the user's fault
and not the job's: the same call succeeds a few seconds later. Stage code retries such
calls in place (``retry_transient``); when a fault outlasts the retries, the stage hands
its job back to the queue to run again later instead of failing it, and the API answers
503 with ``Retry-After`` instead of 500.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import cache
from typing import TypeVar

from afina.core.errors import AfinaError, ServiceUnavailable
from afina.core.logging import log_event

log = logging.getLogger("afina.transient")
T = TypeVar("T")

# SQLite raises OperationalError for a locked file as well as for a missing table: only these are passing
_SQLITE_TRANSIENT_MARKERS = ("database is locked", "database is busy", "unable to open database", "disk i/o error")


@cache
def _transient_types() -> tuple[type[BaseException], ...]:
    from sqlalchemy import exc as sa_exc

    types: list[type[BaseException]] = [ConnectionError, TimeoutError,
                                         sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
                                         sa_exc.TimeoutError]
    for module, names in (("urllib3.exceptions", ("HTTPError",)), ("kombu.exceptions", ("OperationalError",)),
                          ("redis.exceptions", ("ConnectionError", "TimeoutError")),
                          ("psycopg", ("OperationalError",))):
        try:
            imported = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        types.extend(getattr(imported, name) for name in names)
    return tuple(types)


def is_transient(exc: BaseException) -> bool:
    """True for faults of the infrastructure that go away by themselves (never for a user's mistake)."""
    if isinstance(exc, AfinaError):
        return isinstance(exc, ServiceUnavailable)
    if not isinstance(exc, _transient_types()):
        return False
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.OperationalError) and "sqlite" in type(exc.orig).__module__:
        return any(marker in str(exc.orig).lower() for marker in _SQLITE_TRANSIENT_MARKERS)
    return True


def backoff_delays(retries: int, first_s: float, cap_s: float = 30.0) -> list[float]:
    """Exponential delays: first_s, 2·first_s, … capped at ``cap_s``."""
    return [min(first_s * 2**attempt, cap_s) for attempt in range(retries)]


def retry_transient(call: Callable[[], T], *, what: str, retries: int, backoff_s: float,
                    sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, retried after each transient fault (``retries`` times, exponential backoff).

    A non-transient exception propagates at once; the last transient one propagates after the
    retries, for the caller to requeue the job or answer 503.
    """
    delays = backoff_delays(retries, backoff_s)
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc) or attempt == len(delays):
                raise
            log_event(log, "transient.retry", logging.WARNING, what=what, attempt=attempt + 1,
                      error=type(exc).__name__, delay_s=delays[attempt])
            sleep(delays[attempt])
    raise AssertionError("unreachable")

"""Which database errors mean "the database is unreachable right now" (retry later: 503 in the
API, wait-and-retry in the worker), as opposed to a bug or bad input."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import exc as sa_exc

log = logging.getLogger(__name__)
T = TypeVar("T")

# OperationalError: connection refused/lost, server shutting down, SQLite "database is locked";
# InterfaceError: a closed connection; TimeoutError: no pooled connection free in time.
UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
               sa_exc.TimeoutError)


def is_unavailable(exc: BaseException) -> bool:
    """True for errors that say the database cannot be reached (or is overloaded) now."""
    if isinstance(exc, UNAVAILABLE):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


def retry_while_unavailable(fn: Callable[[], T], *, tolerance_s: float, what: str,
                            first_wait_s: float = 0.5, max_wait_s: float = 10.0) -> T:
    """Call `fn()` until it succeeds; while it raises database-unavailable errors, wait with
    exponential backoff for at most `tolerance_s` seconds in all, then re-raise."""
    deadline = time.monotonic() + tolerance_s
    wait = first_wait_s
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_unavailable(exc) or time.monotonic() + wait > deadline:
                raise
            log.warning("%s: database unavailable (%s); retrying in %.1f s", what,
                        type(exc).__name__, wait)
            time.sleep(wait)
            wait = min(max_wait_s, wait * 2)

"""One bad message costs one skip, never a reconnect: what an exception raised on a message means.

Every event path handles each message it reads inside two ``try`` blocks, one around decoding
(and the typed check of monitor/boundary/hot.py), one around folding: the fast paths in
monitor/intake/decoder.py, the stock path in monitor/intake/event_receiver.py. A ``try`` that
raises nothing costs nothing in CPython 3.11, so this adds no work per event.

What decoding raises is the message's fault: ``too_deep`` when its nesting is beyond what the
JSON decoder takes, else ``undecodable``. What the check or the fold raises past the
boundary's own refusals is the sidecar's: counted as ``internal_error`` and logged with its
traceback, at most once a minute, so a flood of one bad shape cannot flood the log. Only
socket and protocol errors leave an event path, and the intake reconnects for those alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import orjson

from celery_sidecar.monitor.boundary.parse import INTERNAL_ERROR, TOO_DEEP, UNDECODABLE

log = logging.getLogger(__name__)

LOG_EVERY_SECONDS = 60.0  # at most one traceback a minute for internal errors
_CHAIN = 8  # how many wrapped exceptions to look through (kombu wraps decode errors in DecodeError)


def orjson_too_deep(exc: BaseException) -> bool:
    """Whether ``exc`` is orjson refusing a document nested past its 1,024 levels."""
    return isinstance(exc, orjson.JSONDecodeError) and "depth" in str(exc)


def decode_reason(exc: BaseException) -> str:
    """The skip reason of a message whose decoding raised ``exc``."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < _CHAIN:
        if isinstance(current, RecursionError):  # the stdlib json, msgspec, kombu's loads
            return TOO_DEEP
        if orjson_too_deep(current):
            return TOO_DEEP
        wrapped = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        current = current.__cause__ or current.__context__ or wrapped
        seen += 1
    return UNDECODABLE


class MessageFailures:
    """Counts what one message raised (through ``skip``) and says so in the log, rate-limited."""

    def __init__(self, skip: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._skip = skip
        self._clock = clock
        self._next_log = 0.0
        self._unlogged = 0

    def decoding(self, exc: BaseException) -> None:
        """Decoding the message raised ``exc``: the message is refused (the skip logs it)."""
        self._skip(decode_reason(exc))

    def folding(self, exc: BaseException) -> None:
        """Checking or folding a decoded message raised ``exc``: a bug of the sidecar's."""
        self._skip(INTERNAL_ERROR)
        now = self._clock()
        if now < self._next_log:
            self._unlogged += 1
            return
        self._next_log = now + LOG_EVERY_SECONDS
        also = f" ({self._unlogged} more since the last one)" if self._unlogged else ""
        self._unlogged = 0
        log.error("an event raised %s in the sidecar and was skipped (reason=internal_error)%s; "
                  "the stream goes on", type(exc).__name__, also, exc_info=exc)

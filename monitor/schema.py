"""The boundary check: what a Celery event must look like before the fold may touch state.

Every event path hands the pipeline decoded dicts, and anything on the event channel can
be in them: a buggy producer's numbers where strings belong, a ``"many"`` where a count
belongs, a 10 MB label, a timestamp from another decade. ``check`` looks at each field the
fold uses, once, before anything in state changes, and says why an event is refused.
After it, the fold and everything downstream trust the types: a label is a short str
that encodes as UTF-8, a count is an int, a number is finite.

Free text (exception messages, tracebacks, args) is not refused for its length: it is
cut when it is kept (``clip``), so a task with a 1 MB traceback still counts.

The envelope rule (``envelope_ok``) is the same for both Redis paths, so a message the
stock kombu path cannot build a Message from is refused by the fast path too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Skip reasons: the `reason` label of celery_sidecar_events_skipped_total. A fixed set.
UNDECODABLE = "undecodable"  # not JSON, not base64, a broken envelope, or a content type kombu would refuse
NOT_AN_EVENT = "not_an_event"  # body (or a list item) is not an event dict
MISSING_TYPE = "missing_type"  # an event dict without a str ``type``
UNKNOWN_TYPE = "unknown_type"  # a type the sidecar does not fold
MISSING_FIELD = "missing_field"  # a field the fold needs is absent
MALFORMED = "malformed"  # a field of the wrong type (a number where a string belongs...)
OUT_OF_BOUNDS = "out_of_bounds"  # a value outside its bounds (a 10 MB label, a timestamp years away)

MAX_LABEL = 256  # hostname, task name, queue: they become Prometheus label values
MAX_ID = 256  # task ids (uuid4 is 36)
MAX_TEXT = 16_384  # exception, traceback, args kept for alerts; longer text is cut, not refused
MAX_SKEW = 7 * 24 * 3600.0  # an event's timestamp vs when we received it (workers buffer while offline)
MAX_COUNT = 2**53  # processed, active, retries, pool size
MAX_RUNTIME = 365 * 24 * 3600.0

Check = Callable[[Any], str | None]


def _label(value: Any) -> str | None:
    if type(value) is not str:
        return MALFORMED
    if len(value) > MAX_LABEL:
        return OUT_OF_BOUNDS
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate: valid JSON escape, not valid UTF-8
            return MALFORMED
    return None


def _opt_label(value: Any) -> str | None:
    return None if value is None else _label(value)


def _task_id(value: Any) -> str | None:
    if type(value) is not str:
        return MALFORMED
    return OUT_OF_BOUNDS if not value or len(value) > MAX_ID else None


def _text(value: Any) -> str | None:
    return None if value is None or type(value) is str else MALFORMED


def _count(value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is not int:
        return MALFORMED
    return None if 0 <= value <= MAX_COUNT else OUT_OF_BOUNDS


def _number(low: float, high: float) -> Check:
    def check(value: Any) -> str | None:
        if value is None:
            return None
        kind = type(value)
        if kind is not float and kind is not int:
            return MALFORMED
        return None if low <= value <= high else OUT_OF_BOUNDS  # NaN compares false: out of bounds

    return check


def _eta(value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is not str:
        return MALFORMED
    return None if len(value) <= 64 else OUT_OF_BOUNDS


_freq = _number(0.0, 86_400.0)
_runtime = _number(0.0, MAX_RUNTIME)
_percent = _number(0.0, 100.0 * 1024)  # CPU % of one core can exceed 100 on a many-core host
_bytes = _number(0.0, 2.0**62)

_TASK = (("uuid", _task_id, True), ("hostname", _opt_label, False))
_TEXTS = (("exception", _text, False), ("traceback", _text, False))
_WORKER = (("hostname", _label, True), ("freq", _freq, False))

# type -> (field, check, required). Only fields the fold reads; the rest pass unseen.
FIELDS: dict[str, tuple[tuple[str, Check, bool], ...]] = {
    "task-sent": (*_TASK, ("name", _opt_label, False), ("queue", _opt_label, False),
                  ("routing_key", _opt_label, False), ("retries", _count, False), ("eta", _eta, False),
                  ("args", _text, False), ("kwargs", _text, False)),
    "task-received": (("uuid", _task_id, True), ("hostname", _label, True), ("name", _opt_label, False),
                      ("retries", _count, False), ("eta", _eta, False), ("args", _text, False),
                      ("kwargs", _text, False)),
    "task-started": _TASK,
    "task-succeeded": (*_TASK, ("runtime", _runtime, False)),
    "task-failed": (*_TASK, *_TEXTS),
    "task-retried": (*_TASK, *_TEXTS),
    "task-rejected": _TASK,
    "task-revoked": _TASK,
    "worker-online": _WORKER,
    "worker-offline": _WORKER,
    "worker-heartbeat": (*_WORKER, ("active", _count, False), ("processed", _count, False)),
    "worker-resources": (*_WORKER, ("cpu_percent", _percent, False), ("memory_percent", _percent, False),
                         ("rss_bytes", _bytes, False), ("pool_max", _count, False)),
}


def check(event: dict[str, Any]) -> str | None:
    """None if the fold may apply ``event``; else the reason it is skipped.

    ``event`` is a dict with a str ``type`` and ``local_received`` (our own receive time),
    as every event path produces it.
    """
    fields = FIELDS.get(event["type"])
    if fields is None:
        return UNKNOWN_TYPE
    ts = event.get("timestamp")
    kind = type(ts)
    if kind is not float and kind is not int:
        return MISSING_FIELD if ts is None else MALFORMED
    received = event["local_received"]
    # Comparisons, not a subtraction: exact for huge ints, and false for NaN.
    if not received - MAX_SKEW <= ts <= received + MAX_SKEW:
        return OUT_OF_BOUNDS
    if type(event.get("clock", 0)) is not int:
        return MALFORMED
    get = event.get
    for name, check_field, required in fields:
        value = get(name)
        if value is None:
            if required:
                return MISSING_FIELD
            continue
        reason = check_field(value)
        if reason is not None:
            return reason
    return None


def clip(text: str | None) -> str | None:
    """Free text as the sidecar keeps it: at most MAX_TEXT characters."""
    if text is None or len(text) <= MAX_TEXT:
        return text
    return text[: MAX_TEXT - 1] + "…"


def envelope_ok(envelope: Any) -> bool:
    """Whether kombu's virtual transports can build a Message from this envelope.

    The stock path (monitor/stock_stream.py) drops what fails here before kombu trips over
    it; the Redis fast path (monitor/redis_stream.py) refuses the same, so both count it.
    """
    if type(envelope) is not dict:
        return False
    properties = envelope.get("properties")
    if type(properties) is not dict or type(properties.get("delivery_tag")) not in (str, int):
        return False
    body = envelope.get("body")
    return not body or type(body) is str

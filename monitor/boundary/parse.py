"""The boundary: what a Celery event must look like before the fold may touch state.

Every event path hands the pipeline decoded dicts, and anything on the event channel can
be in them: a buggy producer's numbers where strings belong, ``"many"`` where a count
belongs, a 10 MB label, a timestamp from another decade. ``parse`` reads each field the
fold uses, once, checks it and returns the fields as a tuple, or raises ``Refused`` with
the reason the event is skipped. Nothing in state has changed at that point, and after
it the fold trusts the types: a label is a short str that encodes as UTF-8, a count is
an int, a number is finite and inside its bounds.

Free text (exception messages, tracebacks, args) is not refused for its length: it is cut
to ``MAX_TEXT``, so a task with a 1 MB traceback still counts.

``envelope_ok`` is the envelope rule of both Redis paths, so a message the stock kombu
path cannot build a Message from is refused by the fast path too.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

# Skip reasons: the `reason` label of celery_sidecar_events_skipped_total. A fixed set.
UNDECODABLE = "undecodable"  # not JSON, not base64, a broken envelope, or a content type kombu would refuse
NOT_AN_EVENT = "not_an_event"  # a body (or a list item) that is not an event dict
MISSING_TYPE = "missing_type"  # an event dict without a str ``type``
UNKNOWN_TYPE = "unknown_type"  # a type the sidecar does not fold
MISSING_FIELD = "missing_field"  # a field the fold needs is absent
MALFORMED = "malformed"  # a field of the wrong type (a number where a string belongs...)
OUT_OF_BOUNDS = "out_of_bounds"  # a value outside its bounds (a 10 MB label, a timestamp years away)
TOO_DEEP = "too_deep"  # JSON nested deeper than its decoder takes (monitor/intake/message_errors.py)
INTERNAL_ERROR = "internal_error"  # checking or folding it raised: a bug of the sidecar's, logged with its traceback
REASONS = (UNDECODABLE, NOT_AN_EVENT, MISSING_TYPE, UNKNOWN_TYPE, MISSING_FIELD, MALFORMED, OUT_OF_BOUNDS, TOO_DEEP,
           INTERNAL_ERROR)

MAX_LABEL = 256  # hostname, task name, queue: they become Prometheus label values
MAX_ID = 256  # task ids (uuid4 is 36)
MAX_TEXT = 16_384  # exception, traceback and args are cut to this, never refused for length
MAX_SKEW = 7 * 24 * 3600.0  # an event's timestamp vs its receipt (workers buffer while offline)
MAX_COUNT = 2**53  # processed, active, retries, pool size
MAX_SECONDS = 365 * 24 * 3600.0  # a runtime, a heartbeat interval

RESOURCE_EVENT = "worker-resources"  # sent by celery_sidecar.plugin.ResourceUsage


class Refused(Exception):
    """An event the fold must not apply; ``reason`` is one of REASONS."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- fields --------------------------------------------------------------------------------


def label(value: Any) -> str:
    if type(value) is not str:
        raise Refused(MISSING_FIELD if value is None else MALFORMED)
    if len(value) > MAX_LABEL:
        raise Refused(OUT_OF_BOUNDS)
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate: a valid JSON escape, not valid UTF-8
            raise Refused(MALFORMED) from None
    return value


def optional_label(value: Any) -> str | None:
    return None if value is None or value == "" else label(value)


def task_id(value: Any) -> str:
    if type(value) is not str:
        raise Refused(MISSING_FIELD if value is None else MALFORMED)
    if not value or len(value) > MAX_ID:
        raise Refused(OUT_OF_BOUNDS)
    return value


def text(value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is not str:
        raise Refused(MALFORMED)
    return value if len(value) <= MAX_TEXT else value[: MAX_TEXT - 1] + "…"


def tail_text(value: Any) -> str | None:
    """As ``text``, but a cut keeps the end: a traceback's last lines are where it failed."""
    if type(value) is not str:
        return text(value)  # None, or refused as text refuses it
    return value if len(value) <= MAX_TEXT else "…" + value[-(MAX_TEXT - 1):]


def count(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int:  # bool is not a count either
        raise Refused(MALFORMED)
    if not 0 <= value <= MAX_COUNT:
        raise Refused(OUT_OF_BOUNDS)
    return value


def number(value: Any, high: float) -> float | None:
    """A finite number in [0, high]; None when absent."""
    if value is None:
        return None
    kind = type(value)
    if kind is not float and kind is not int:
        raise Refused(MALFORMED)
    if not 0 <= value <= high:  # NaN compares false
        raise Refused(OUT_OF_BOUNDS)
    return value


def timestamp(event: dict[str, Any]) -> float:
    """The event's own timestamp, within MAX_SKEW of when we received it; the clock an int."""
    ts = event.get("timestamp")
    kind = type(ts)
    if kind is not float and kind is not int:
        raise Refused(MISSING_FIELD if ts is None else MALFORMED)
    received = event["local_received"]
    # Comparisons, not a subtraction: exact for huge ints, and false for NaN and infinities.
    if not received - MAX_SKEW <= ts <= received + MAX_SKEW:
        raise Refused(OUT_OF_BOUNDS)
    if type(event.get("clock", 0)) is not int:
        raise Refused(MALFORMED)
    return ts


def eta(value: Any) -> float | None:
    """An ISO 8601 eta as a timestamp; one we cannot read is no eta (the task still counts)."""
    if value is None or value == "":
        return None
    if type(value) is not str or len(value) > 64:
        raise Refused(MALFORMED if type(value) is not str else OUT_OF_BOUNDS)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# -- events ----------------------------------------------------------------------------------
# Each returns the fields its fold handler reads, in the order the handler unpacks them;
# the event's timestamp is always second (the pipeline reads the consumer lag from it).


def task_sent(e: dict[str, Any]) -> tuple:
    get = e.get
    return (task_id(get("uuid")), timestamp(e), optional_label(get("hostname")), optional_label(get("name")),
            optional_label(get("queue") or get("routing_key")), count(get("retries")), eta(get("eta")),
            text(get("args")), text(get("kwargs")))


def task_received(e: dict[str, Any]) -> tuple:
    get = e.get
    return (task_id(get("uuid")), timestamp(e), label(get("hostname")), optional_label(get("name")),
            count(get("retries")), eta(get("eta")), text(get("args")), text(get("kwargs")))


def task_progress(e: dict[str, Any]) -> tuple:
    """task-started, -rejected, -revoked."""
    get = e.get
    return task_id(get("uuid")), timestamp(e), optional_label(get("hostname"))


def task_succeeded(e: dict[str, Any]) -> tuple:
    get = e.get
    return (task_id(get("uuid")), timestamp(e), optional_label(get("hostname")),
            number(get("runtime"), MAX_SECONDS))


def task_trouble(e: dict[str, Any]) -> tuple:
    """task-failed and task-retried."""
    get = e.get
    return (task_id(get("uuid")), timestamp(e), optional_label(get("hostname")), text(get("exception")),
            tail_text(get("traceback")))


def worker(e: dict[str, Any]) -> tuple:
    """worker-online and worker-offline."""
    get = e.get
    return label(get("hostname")), timestamp(e), number(get("freq"), MAX_SECONDS), count(get("pid"))


def worker_heartbeat(e: dict[str, Any]) -> tuple:
    get = e.get
    return (label(get("hostname")), timestamp(e), number(get("freq"), MAX_SECONDS), count(get("active")),
            count(get("processed")), count(get("pid")))


def worker_resources(e: dict[str, Any]) -> tuple:
    get = e.get
    return (label(get("hostname")), timestamp(e), number(get("freq"), MAX_SECONDS),
            number(get("cpu_percent"), 100.0 * 1024), number(get("memory_percent"), 100.0 * 1024),
            number(get("rss_bytes"), 2.0**62), count(get("pool_max")))


PARSERS: dict[str, Callable[[dict[str, Any]], tuple]] = {
    "task-sent": task_sent,
    "task-received": task_received,
    "task-started": task_progress,
    "task-succeeded": task_succeeded,
    "task-failed": task_trouble,
    "task-retried": task_trouble,
    "task-rejected": task_progress,
    "task-revoked": task_progress,
    "worker-online": worker,
    "worker-offline": worker,
    "worker-heartbeat": worker_heartbeat,
    RESOURCE_EVENT: worker_resources,
}


def envelope_ok(envelope: Any) -> bool:
    """Whether kombu's virtual transports can build a Message from this envelope.

    The stock path (monitor/intake/event_receiver.py) drops what fails here before kombu trips over
    it; the Redis fast path (monitor/intake/redis_pubsub.py) refuses the same, so both count it.
    """
    try:  # indexing anything but a dict with a str raises TypeError: the type checks for free
        tag = envelope["properties"]["delivery_tag"]
        body = envelope.get("body")
    except (KeyError, TypeError):
        return False
    return (type(tag) is str or type(tag) is int) and (not body or type(body) is str)

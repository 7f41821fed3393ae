"""What a buggy or hostile producer can put on the event channel: Hypothesis strategies,
and the nastiest cases found, kept as explicit regression examples.

Shared by the property tests (tests/test_hostile_input.py) and the real-broker ones
(tests/test_hostile_e2e.py).
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import orjson
from hypothesis import strategies as st
from kombu.utils.json import dumps

from celery_sidecar.monitor.boundary import parse
from tests.bench.traffic import encode_message

KNOWN_TYPES = (
    "task-sent", "task-received", "task-started", "task-succeeded", "task-failed", "task-retried",
    "task-rejected", "task-revoked", "worker-online", "worker-heartbeat", "worker-offline", "worker-resources",
)
FIELDS = ("uuid", "hostname", "name", "queue", "routing_key", "retries", "eta", "args", "kwargs", "runtime",
          "exception", "traceback", "freq", "active", "processed", "cpu_percent", "memory_percent", "rss_bytes",
          "pool_max", "clock", "utcoffset", "timestamp", "pid")

NOW = time.time()
_DROP = object()
HUGE = "x" * (10 << 20)  # built once: a 10 MB label
DEEP: Any = []
for _ in range(500):
    DEEP = [DEEP]

# -- arbitrary JSON, and worse ----------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=2**80)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)  # lone surrogates
           | st.binary(max_size=8)  # bytes: not even JSON
           | st.sampled_from([HUGE, DEEP, "", " ", "\n", '"', "\\", "a\nb", "ø", "🐍"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def plausible(field: str, now: float) -> st.SearchStrategy:
    """A value the fold would accept for ``field`` (so that state and metrics fill up too)."""
    return {
        "uuid": st.sampled_from([f"task-{i}" for i in range(40)]),
        "hostname": st.sampled_from([f"w{i}@host" for i in range(12)]),
        "name": st.sampled_from([f"app.task_{i}" for i in range(12)]),
        "queue": st.sampled_from(["celery", "heavy", "io", "q3", "q4"]),
        "routing_key": st.sampled_from(["celery", "heavy"]),
        "retries": st.integers(0, 5),
        "eta": st.none() | st.just("2030-01-01T00:00:00+00:00") | st.just("not a date"),
        "args": st.just("(1, 2)"), "kwargs": st.just("{}"),
        "runtime": st.floats(0, 100), "exception": st.just("ValueError('bad')"), "traceback": st.just("Tb"),
        "freq": st.floats(0.5, 10), "active": st.integers(0, 8), "processed": st.integers(0, 1000),
        "cpu_percent": st.floats(0, 100), "memory_percent": st.floats(0, 100),
        "rss_bytes": st.integers(0, 2**30), "pool_max": st.integers(1, 16),
        "clock": st.integers(0, 10**6), "utcoffset": st.just(0), "pid": st.integers(1, 99999),
        "timestamp": st.floats(now - 60, now + 60),
    }[field]


@st.composite
def events(draw: st.DrawFn) -> Any:
    """An event as the fold gets it, received at NOW: mostly shaped like one, with any
    field any value. (Times are relative to NOW, fixed at import: Hypothesis replays draws.)"""
    now = NOW
    if draw(st.integers(0, 19)) == 0:
        return draw(json_values)  # not even a dict
    event: dict[str, Any] = {"type": draw(st.sampled_from(KNOWN_TYPES) | json_values)}
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=12, unique=True)):
        event[field] = draw(json_values) if draw(st.integers(0, 3)) == 0 else draw(plausible(field, now))
    if draw(st.booleans()):
        event.update(draw(st.dictionaries(st.text(max_size=6), json_values, max_size=2)))
    event["local_received"] = now
    return event


# -- valid events, and messages that must be refused ---------------------------------------------


def valid_event(kind: str, n: int, now: float | None = None) -> dict[str, Any]:
    """An event the boundary accepts, shaped as celery's EventDispatcher sends it."""
    now = time.time() if now is None else now
    base = {"hostname": f"fuzz-worker-{n % 3}@host", "utcoffset": 0, "pid": 4242, "clock": n, "timestamp": now}
    if kind.startswith("worker-"):
        return {**base, "freq": 2.0, "active": 0, "processed": n, "type": kind}
    task = {"uuid": f"fuzz-{uuid.uuid4()}", "name": f"fuzz.task_{n % 4}"}
    if kind == "task-sent":
        task.update(queue="celery", hostname="fuzz-producer@host", retries=0, args="()", kwargs="{}")
    return {**base, **task, "type": kind}


VALID_KINDS = ("task-sent", "task-received", "task-started", "task-succeeded", "worker-heartbeat")


def envelope(event_body: Any, *, raw: bytes | None = None, content_type: str = "application/json",
             routing_key: str = "task.multi", **changes: Any) -> bytes:
    """A kombu Redis envelope around ``event_body`` (or ``raw`` body bytes), then ``changes``
    to its keys (``_DROP`` removes one)."""
    data = raw if raw is not None else dumps(event_body).encode()
    env = orjson.loads(encode_message({}, routing_key, "fuzz@host", "tag-1"))
    env["body"] = base64.b64encode(data).decode()
    env["content-type"] = content_type
    for key, value in changes.items():
        if value is _DROP:
            env.pop(key, None)
        else:
            env[key] = value
    return dumps(env).encode()


def _bad(kind: str, **fields: Any) -> dict[str, Any]:
    return {**valid_event(kind, 1, NOW), **fields}


# Events every path must refuse (the fold's boundary), with the reason.
BAD_EVENTS: list[tuple[dict[str, Any], str]] = [
    # A number or a boolean as a label once took /metrics down.
    (_bad("task-received", hostname=12345), "malformed"),
    (_bad("task-received", name=True), "malformed"),
    (_bad("task-sent", queue=["celery"]), "malformed"),
    # The third: a phantom worker whose heartbeat has fields of the wrong type.
    (_bad("worker-heartbeat", hostname="fuzzphantom1@host", freq="often"), "malformed"),
    (_bad("worker-heartbeat", hostname="fuzzphantom2@host", active="many"), "malformed"),
    (_bad("worker-heartbeat", hostname="x" * 300), "out_of_bounds"),
    (_bad("task-started", hostname=HUGE), "out_of_bounds"),
    (_bad("task-started", hostname="\ud800"), "malformed"),
    (_bad("task-succeeded", runtime=-1.0), "out_of_bounds"),
    (_bad("task-succeeded", runtime="fast"), "malformed"),
    (_bad("task-started", timestamp=NOW - 5 * 365 * 86400), "out_of_bounds"),
    (_bad("task-started", timestamp="yesterday"), "malformed"),
    (_bad("task-started", uuid=None), "missing_field"),
    (_bad("task-started", uuid={"id": 1}), "malformed"),
    (_bad("task-failed", exception=["ValueError"]), "malformed"),
    (_bad("worker-resources", cpu_percent=float("inf")), "out_of_bounds"),
    (_bad("worker-resources", pool_max=2.5), "malformed"),
    (_bad("task-started", clock=1.5), "malformed"),
    ({"type": "fuzz-unknown", "hostname": "w@h", "timestamp": NOW}, "unknown_type"),
    ({"hostname": "w@h", "timestamp": NOW}, "missing_type"),
]

# Whole messages every Redis path must count and skip without a reconnect: envelopes kombu
# trips over, which would cost the stock path a reconnect each.
BAD_ENVELOPES: list[tuple[bytes, str]] = [
    (b"{not json", "undecodable"),
    (b"\xff\xfe\x00 not utf-8", "undecodable"),
    (dumps("an envelope that is a JSON string").encode(), "undecodable"),
    (dumps([1, 2, 3]).encode(), "undecodable"),
    (envelope({}, properties=_DROP), "undecodable"),
    (envelope({}, properties={"body_encoding": "base64"}), "undecodable"),  # no delivery_tag
    (envelope({}, properties={"delivery_tag": ["a"], "body_encoding": "base64"}), "undecodable"),
    (envelope({}, body={"a": "dict, not a string"}), "undecodable"),
    (envelope({}, body="%%% not base64"), "undecodable"),
    (envelope({}, raw=b"\x00\xffnot json{{"), "undecodable"),
    (envelope({"type": "task-started"}, content_type="application/x-python-serialize"), "undecodable"),
    (envelope("just a string"), "not_an_event"),
    (envelope([42]), "not_an_event"),  # a list body: each item that is not an event is one skip
]


# -- real events, and values at the boundary's edges -------------------------------------------

HOST, PRODUCER, NAME, QUEUE = "celery@worker-1", "producer@web-1", "proj.tasks.add", "celery"


def real(kind: str) -> dict[str, Any]:
    """An event as celery 5's EventDispatcher sends it (every field, as the wire has it)."""
    event: dict[str, Any] = {"hostname": HOST, "utcoffset": 0, "pid": 17, "clock": 42,
                             "uuid": "0b9f1c7e-8f55-4f4e-9a43-3c1f2f3c6a01", "timestamp": NOW - 0.25,
                             "type": kind, "local_received": NOW}
    if kind == "task-sent":
        event.update(hostname=PRODUCER, root_id=event["uuid"], parent_id=None, name=NAME, args="(1, 2)",
                     kwargs="{}", retries=0, eta=None, expires=None, queue=QUEUE, exchange="",
                     routing_key=QUEUE)
    elif kind == "task-received":
        event.update(name=NAME, args="(1, 2)", kwargs="{}", root_id=event["uuid"], parent_id=None, retries=0,
                     eta=None, expires=None)
    elif kind == "task-succeeded":
        event.update(result="3", runtime=0.0123)
    return event


# Values near each bound the boundary checks (monitor/boundary/parse.py), for every field.
EDGE_VALUES = [
    -1, -1.0, -0.0, 0, 0.0, 1e-300, parse.MAX_SECONDS, parse.MAX_SECONDS * 2, parse.MAX_COUNT,
    parse.MAX_COUNT + 1, True, False, None, "", " ", "é", "\ud800", "x" * parse.MAX_LABEL,
    "x" * (parse.MAX_LABEL + 1), "x" * (parse.MAX_TEXT + 1), "2030-01-01T00:00:00+00:00", "2030-01-01",
    NOW - parse.MAX_SKEW - 1, NOW + parse.MAX_SKEW - 1, int(NOW), float("nan"), float("inf"), [], {},
    # orjson reads ints from -2**63 to 2**64 - 1 as ints, beyond as floats; the typed clock stops at 2**63 - 1.
    -(2**63) - 1, 2**63, 2**64,
]

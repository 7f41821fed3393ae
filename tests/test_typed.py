"""The typed decode (monitor/boundary/hot.py) folds exactly what the ordinary decode does.

A body of hot task events in their usual shape is decoded and checked in one msgspec step;
anything else goes the ordinary way (orjson, EventDecoder._emit, parse.PARSERS). The
property: for any body, on each path (the fast paths' EventDecoder, the stock path's
EventReceiver), the path with the typed step and without it hand the pipeline the same
folds (type and fields) and the same skips, in the same order, and end on the same
Lamport clock. Bodies start from real ones and are then broken, field by field.
"""

from __future__ import annotations

import base64
import threading
from typing import Any
from unittest import mock

import pytest
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Message
from kombu.utils.json import dumps

from celery_sidecar.monitor.boundary import clock, hot, parse
from celery_sidecar.monitor.config.settings import Config, LiveConfig
from celery_sidecar.monitor.fold.pipeline import Pipeline
from celery_sidecar.monitor.fold.state import State
from celery_sidecar.monitor.fold.status import Status
from celery_sidecar.monitor.intake.decoder import EventDecoder
from celery_sidecar.monitor.intake.event_receiver import _GuardedReceiver
from tests.hostile import EDGE_VALUES, NOW, json_values, plausible, real

KINDS = ("task-sent", "task-received", "task-started", "task-rejected", "task-revoked", "task-succeeded",
         "task-failed", "task-retried")
# Every field the typed structs read, and the ones the ordinary path adjusts or dispatches on.
READ = ("type", "uuid", "timestamp", "utcoffset", "clock", "hostname", "name", "queue", "routing_key", "retries",
        "eta", "args", "kwargs", "runtime", "exception", "traceback")


def real_event(kind: str) -> dict[str, Any]:
    event = real(kind)
    del event["local_received"]  # set on receipt, never on the wire
    if kind in ("task-failed", "task-retried"):
        event.update(exception="ValueError('boom')", traceback="Traceback (most recent call last):\n...")
    return event


class Recording(Pipeline):
    """The real pipeline's entry, recording what it would fold or skip instead of folding."""

    def __init__(self) -> None:
        super().__init__(State(LiveConfig(Config())), Status())
        self.seen: list[tuple] = []

    def fold_checked(self, etype: str, fields: tuple, received: float) -> None:
        self.seen.append(("fold", etype, fields, received))

    def skip(self, reason: str) -> None:
        self.seen.append(("skip", reason))


def run(payloads: list[bytes], *, with_typed: bool, redis: bool) -> tuple[list[tuple], int]:
    pipeline = Recording()
    decoder = EventDecoder(pipeline.handle, pipeline.skip, now=lambda: NOW,
                           on_checked=pipeline.fold_checked if with_typed else None)
    for payload in payloads:
        if redis:
            decoder.feed(payload)
        else:
            decoder.feed_body(payload)
    return pipeline.seen, decoder.clock


def run_stock(bodies: list[bytes], *, with_typed: bool) -> tuple[list[tuple], int]:
    """The stock path's receiver, handed each body as kombu hands it a message."""
    pipeline = Recording()
    app = Celery(broker="memory://", set_as_current=False)
    receiver = _GuardedReceiver(app.connection_for_read(), app=app, pipeline=pipeline, stop=threading.Event(),
                                on_ready=lambda: None, event_queue=None, on_backlog=lambda _n: None)
    with mock.patch.object(hot, "decode", hot.decode if with_typed else lambda *_args: None):
        for body in bodies:
            receiver._on_message(Message(body=body, content_type="application/json", content_encoding="utf-8"))
    # EventReceiver stamps each event with its own receipt time: compare without it.
    return [entry[:3] for entry in pipeline.seen], receiver.clock.value


def redis_envelope(body: bytes, base64_body: bool) -> bytes:
    properties: dict[str, Any] = {"delivery_tag": "tag-1", "delivery_info": {"exchange": "celeryev"}}
    if base64_body:
        properties["body_encoding"] = "base64"
    return dumps({"body": base64.b64encode(body).decode() if base64_body else body.decode("utf-8", "replace"),
                       "content-type": "application/json", "properties": properties, "headers": {}}).encode()


def both_agree(bodies: list[bytes]) -> None:
    for redis in (False, True):
        payloads = [redis_envelope(b, base64_body=n % 2 == 0) for n, b in enumerate(bodies)] if redis else bodies
        assert run(payloads, with_typed=True, redis=redis) == run(payloads, with_typed=False, redis=redis)
    assert run_stock(bodies, with_typed=True) == run_stock(bodies, with_typed=False)


def test_real_bodies_take_the_typed_path(monkeypatch):
    """Not a formality: if real traffic fell through to the ordinary decode, it would buy nothing."""
    single = [dumps(real_event(kind)).encode() for kind in KINDS]
    batch = dumps([real_event(kind) for kind in KINDS]).encode()
    ordinary, clock = run([*single, batch], with_typed=False, redis=False)

    def no_dicts(_event):
        raise AssertionError("a real body went the ordinary way")

    stock = run_stock([*single, batch], with_typed=False)
    monkeypatch.setattr(Recording, "handle", no_dicts)
    assert run([*single, batch], with_typed=True, redis=False) == (ordinary, clock)
    assert run_stock([*single, batch], with_typed=True) == stock
    assert [entry[:2] for entry in ordinary] == [("fold", kind) for kind in (*KINDS, *KINDS)]


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_at_every_edge_is_folded_alike(kind):
    """Each field absent, or at each edge value, alone and inside a batch of real events."""
    bodies = []
    for field in READ:
        for value in ["absent", *EDGE_VALUES]:
            event = real_event(kind)
            if value == "absent":
                event.pop(field, None)
            else:
                event[field] = value
            bodies.append(dumps(event).encode())
            bodies.append(dumps([real_event("task-started"), event, real_event("task-succeeded")]).encode())
    both_agree(bodies)


def test_duplicate_keys_are_folded_alike():
    """JSON lets a key repeat; kombu's json and orjson keep the last. A body whose keys repeat
    (the type tag, a field with two types, two values) must not fold differently typed."""
    start = dumps(real_event("task-started")).encode()[:-1]
    bodies = [start + b', "type": "task-revoked"}', start + b', "clock": "x"}', start + b', "uuid": "other"}',
              start + b', "timestamp": "late"}', b'{"type": "task-failed", ' + start[1:] + b"}"]
    both_agree([*bodies, b"[" + b", ".join(bodies) + b"]"])


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """One real event or a batch of them, with a field or two of some events dropped, set to
    a value near a bound, a plausible one or anything at all; serialised as kombu does."""
    events = [real_event(draw(st.sampled_from(KINDS))) for _ in range(draw(st.integers(1, 4)))]
    for event in events:
        for field in draw(st.lists(st.sampled_from(READ), max_size=2, unique=True)):
            how = draw(st.integers(0, 3))
            if how == 0:
                event.pop(field, None)
            else:
                likely = st.sampled_from((*KINDS, "worker-heartbeat")) if field == "type" else plausible(field, NOW)
                event[field] = draw((st.sampled_from(EDGE_VALUES), likely, json_values)[how - 1])
    body: Any = events if len(events) > 1 or draw(st.booleans()) else events[0]
    return dumps(body).encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(bodies(), min_size=1, max_size=4))
def test_any_broken_body_is_folded_alike(batch):
    both_agree(batch)


def test_the_struct_tags_are_the_types_the_boundary_parses():
    assert set(hot._TAGS.values()) == set(KINDS) <= set(parse.PARSERS)


@given(st.integers(0, 2**40), st.lists(st.tuples(st.sampled_from((*KINDS, "worker-heartbeat")),
                                                 st.none(), st.none() | st.integers(0, 2**40)), max_size=30))
def test_a_bodys_clock_in_one_call_is_lamports_rule_event_by_event(mine, events):
    after = mine
    for etype, _, event_clock in events:
        _, after = clock.lamport(after, etype, event_clock)
    assert clock.advance(mine, events) == after

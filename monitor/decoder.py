"""Decoded message bodies → the event dicts ``EventReceiver.event_from_message`` produces.

Both fast paths (monitor/redis_stream.py, monitor/amqp_stream.py) turn what they read into
events here, so the pipeline cannot tell which path fed it: timestamps adjusted with
``utcoffset``, the Lamport ``clock`` kept as celery keeps it, ``local_received`` set, list
bodies (a worker's buffered task events) split. tests/test_fast_path.py and
tests/test_amqp_fast_path.py hold both to the stock path.
"""

from __future__ import annotations

import binascii
import time
from collections.abc import Callable

import orjson
from celery.utils.time import utcoffset

from celery_sidecar.monitor import typed
from celery_sidecar.monitor.schema import MALFORMED, MISSING_TYPE, NOT_AN_EVENT, UNDECODABLE, envelope_ok

# Matches EventReceiver: clients never sync their clock, so task-sent gets ours minus one.
_CLIENT_CLOCK_SKEW = -1


class EventDecoder:
    """Turns one message (a Redis envelope or an AMQP body) into event dicts, as ``EventReceiver`` would.

    Never raises on bad input: every message or event it cannot use goes to ``on_skip``
    with a reason, and decoding carries on.

    With ``on_checked`` (``Pipeline.fold_checked``), a body of hot task events in their
    usual shape skips the dicts: monitor/typed.py decodes and checks it in one step, and
    its events go to ``on_checked`` as (type, fields, received). Any other body goes the
    ordinary way, event dicts to ``on_event``.
    """

    def __init__(self, on_event: Callable[[dict], None], on_skip: Callable[[str], None],
                 now: Callable[[], float] = time.time,
                 on_checked: Callable[[str, tuple, float], None] | None = None) -> None:
        self._on_event = on_event
        self._on_skip = on_skip
        self._on_checked = on_checked
        self._now = now
        # A private Lamport clock with the same arithmetic as app.clock in
        # event_from_message; one thread owns it, so no mutex.
        self.clock = 0
        # utcoffset() calls localtime(); refresh() once per socket read instead of per event.
        self._here = utcoffset()

    def refresh(self) -> None:
        """Re-read the local UTC offset (called once per chunk read from the socket)."""
        self._here = utcoffset()

    def feed(self, payload: bytes) -> None:
        """Decode one Redis pub/sub message (a kombu JSON envelope) and emit its events."""
        try:
            envelope = orjson.loads(payload)
            if not envelope_ok(envelope):  # what kombu could not build a Message from
                self._on_skip(UNDECODABLE)
                return
            # kombu accepts only the event serializer, json; anything else is a decode error.
            if envelope.get("content-type", "application/json") != "application/json":
                self._on_skip(UNDECODABLE)
                return
            body = envelope.get("body")
            if not body:  # kombu hands an empty body on undecoded: it is not an event
                self._on_skip(NOT_AN_EVENT)
                return
            if envelope["properties"].get("body_encoding") == "base64":
                body = binascii.a2b_base64(body)
            if self._on_checked is not None and self._checked(body):
                return
            body = orjson.loads(body)
        except (orjson.JSONDecodeError, binascii.Error, TypeError, ValueError):
            self._on_skip(UNDECODABLE)
            return
        self._body(body)

    def feed_body(self, body: bytes | memoryview) -> None:
        """Decode one message body (JSON, as an AMQP delivery carries it) and emit its events."""
        if not len(body):  # as kombu: an empty body is not decoded, and is not an event
            self._on_skip(NOT_AN_EVENT)
            return
        if self._on_checked is not None and self._checked(body):
            return
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError:
            self._on_skip(UNDECODABLE)
            return
        self._body(body)

    def _checked(self, body: bytes | memoryview | str) -> bool:
        """Whether the body was hot events in their usual shape, now folded (monitor/typed.py)."""
        now = self._now()
        events = typed.decode(body, now, self._here)
        if events is None:
            return False
        on_checked = self._on_checked
        for etype, fields, clock in events:
            mine = self.clock
            # _emit's clock arithmetic, written out again rather than shared: this loop runs
            # once per hot event, and a helper call would add a Python frame to each.
            if etype == "task-sent":  # as _emit: a client's clock is ignored
                sent = (mine or 1) + _CLIENT_CLOCK_SKEW
                self.clock = (mine if mine > sent else sent) + 1
            else:
                self.clock = (mine if mine > clock else clock) + 1
            on_checked(etype, fields, now)
        return True

    def _body(self, body: object) -> None:
        now = self._now()  # one receipt time per message: a batch arrives at once
        if type(body) is dict:
            self._emit(body, now)
        elif type(body) is list:  # celery 4+: a worker's buffered task events, up to 24
            for event in body:
                if type(event) is dict:
                    self._emit(event, now)
                else:
                    self._on_skip(NOT_AN_EVENT)
        else:
            self._on_skip(NOT_AN_EVENT)

    def _emit(self, event: dict, now: float) -> None:
        # Mirrors EventReceiver.event_from_message step by step, including where it would
        # raise: those become skips, exactly as monitor/stock_stream.py's receiver does.
        # Every event passes here: no builtin calls (max, a second dict walk) on the way.
        etype = event.get("type")
        if etype is None and "type" not in event:
            self._on_skip(MISSING_TYPE)
            return
        clock = event.get("clock")
        mine = self.clock
        try:
            if etype == "task-sent":
                # Clients never sync their clock, so EventReceiver ignores theirs.
                sent = event["clock"] = (mine or 1) + _CLIENT_CLOCK_SKEW
                self.clock = (mine if mine > sent else sent) + 1
            elif type(clock) is int:
                self.clock = (mine if mine > clock else clock) + 1
            elif clock is None and "clock" not in event:
                self.clock = event["clock"] = mine + 1
            else:
                # Refused before it reaches our Lamport clock: a float or a string there would
                # make every later event's clock wrong too (stock_stream.py refuses the same).
                self._on_skip(MALFORMED)
                return
            if "utcoffset" in event and "timestamp" in event:
                event["timestamp"] = event["timestamp"] - (event["utcoffset"] - self._here) * 3600
        except (TypeError, OverflowError):
            self._on_skip(MALFORMED)
            return
        event["local_received"] = now
        self._on_event(event)

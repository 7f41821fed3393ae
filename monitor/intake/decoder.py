"""Decoded message bodies → the event dicts ``EventReceiver.event_from_message`` produces.

Both fast paths (monitor/intake/redis_pubsub.py, monitor/intake/amqp_socket.py) turn what they read into
events here, so the pipeline cannot tell which path fed it: timestamps adjusted with
``utcoffset``, the Lamport ``clock`` kept as celery keeps it, ``local_received`` set, list
bodies (a worker's buffered task events) split. tests/test_fast_path.py and
tests/test_amqp_fast_path.py hold both to the stock path.
"""

from __future__ import annotations

import binascii
import codecs
import json
import time
from collections.abc import Callable
from typing import Any

import orjson
import pybase64
from celery.utils.time import utcoffset
from kombu.compression import decompress

from celery_sidecar.monitor.boundary import hot
from celery_sidecar.monitor.boundary.clock import advance, lamport
from celery_sidecar.monitor.boundary.parse import MALFORMED, MISSING_TYPE, NOT_AN_EVENT, UNDECODABLE, envelope_ok
from celery_sidecar.monitor.intake.message_errors import MessageFailures, orjson_too_deep

# Content types kombu hands over undecoded (its TRUSTED_CONTENT): the text itself, never an event.
_RAW_CONTENT = ("application/data", "application/text")
_UNDECODED_ENCODINGS = ("binary", "ascii-8bit")  # kombu's SKIP_DECODE: the bytes are handed over as they are


def loads(data: bytes | memoryview | str) -> Any:
    """JSON as the stock path reads it: orjson, and where orjson refuses what the stdlib json
    (kombu's decoder) takes (a lone surrogate, NaN, an integer past 64 bits), the stdlib json,
    so both paths count the same messages. Nesting past orjson's depth is refused as it is."""
    try:
        return _orjson_loads(data)
    except orjson.JSONDecodeError as exc:
        return _stdlib_loads(data, exc)


_orjson_loads = orjson.loads


def _stdlib_loads(data: bytes | memoryview | str, refused: orjson.JSONDecodeError) -> Any:
    """What orjson refused, read by the stdlib json; nesting past orjson's depth stays refused."""
    if orjson_too_deep(refused):
        raise refused
    return json.loads(bytes(data) if type(data) is memoryview else data)


def base64_decode(text: str) -> bytes:
    """The bytes kombu's ``base64.b64decode`` gives (binascii, lenient: anything outside the
    alphabet is dropped). Valid base64, as kombu writes it, goes through pybase64's strict
    decoder: the same bytes, several times faster; anything else the lenient way."""
    try:
        return _strict_base64(text, validate=True)
    except ValueError:  # binascii.Error too
        pass
    try:
        return binascii.a2b_base64(text)
    except ValueError:  # non-ASCII in it: kombu encodes the text first, and the base64
        return binascii.a2b_base64(text.encode())  # decoder drops those bytes as noise


_strict_base64 = pybase64.b64decode


class EventDecoder:
    """Turns one message (a Redis envelope or an AMQP body) into event dicts, as ``EventReceiver`` would.

    Never raises: every message or event it cannot use goes to ``on_skip`` with a reason, and
    decoding carries on. Each message is handled inside two ``try`` blocks (decoding, then
    folding; monitor/intake/message_errors.py), so whatever one message raises costs that
    message alone, never the connection.

    With ``on_checked`` (``Pipeline.fold_checked``), a body of hot task events in their
    usual shape skips the dicts: monitor/boundary/hot.py decodes and checks it in one step, and
    its events go to ``on_checked`` as (type, fields, received). Any other body goes the
    ordinary way, event dicts to ``on_event``.
    """

    def __init__(self, on_event: Callable[[dict], None], on_skip: Callable[[str], None],
                 now: Callable[[], float] = time.time,
                 on_checked: Callable[[str, tuple, float], None] | None = None) -> None:
        self._on_event = on_event
        self._on_skip = on_skip
        self._on_checked = on_checked
        self._failures = MessageFailures(on_skip)
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
            try:  # loads(), written out: this runs once per message
                envelope = _orjson_loads(payload)
            except orjson.JSONDecodeError as exc:
                envelope = _stdlib_loads(payload, exc)
            if not envelope_ok(envelope):  # what kombu could not build a Message from
                self._on_skip(UNDECODABLE)
                return
            body = envelope.get("body")
            headers = envelope.get("headers")
            encoding = envelope.get("content-encoding")
            # How celery's EventDispatcher sends every event: base64, JSON, uncompressed.
            if (body and envelope["properties"].get("body_encoding") == "base64"
                    and envelope.get("content-type") == "application/json"
                    and ((type(headers) is dict and "compression" not in headers) or not headers)
                    and (encoding is None or type(encoding) is str)):
                body = base64_decode(body)
            else:
                body, reason = _unusual_envelope(envelope)
                if reason is not None:
                    self._on_skip(reason)
                    return
        except Exception as exc:  # noqa: BLE001 - whatever one message's envelope raises, it is that message's
            self._failures.decoding(exc)
            return
        if not body:  # as kombu: an empty body is not decoded, and is not an event
            self._on_skip(NOT_AN_EVENT)
            return
        self._decode_body(body)

    def feed_body(self, body: bytes | memoryview | str) -> None:
        """Decode one message body (JSON, as an AMQP delivery carries it, or a Redis envelope's
        decoded body) and emit its events."""
        if not len(body):  # as kombu: an empty body is not decoded, and is not an event
            self._on_skip(NOT_AN_EVENT)
            return
        self._decode_body(body)

    def _decode_body(self, body: bytes | memoryview | str) -> None:
        try:
            now = self._now()
            events = hot.decode(body, now, self._here) if self._on_checked is not None else None
            if events is None:
                body = loads(body)
        except Exception as exc:  # noqa: BLE001 - whatever one message's decoding raises, it is that message's
            self._failures.decoding(exc)
            return
        try:
            if events is None:
                self._body(body, now)
            else:  # hot events, decoded and checked: straight to the fold (inline: once per message)
                self.clock = advance(self.clock, events)
                on_checked = self._on_checked
                for etype, fields, _ in events:
                    on_checked(etype, fields, now)  # type: ignore[misc] - set whenever hot.decode ran
        except Exception as exc:  # noqa: BLE001 - a fold error is counted and logged; the stream goes on
            self._failures.folding(exc)

    def _body(self, body: object, now: float) -> None:
        # One receipt time per message: a batch arrives at once.
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
        # raise: those become skips, exactly as monitor/intake/event_receiver.py's receiver does.
        # Every event passes here: no builtin calls (max, a second dict walk) on the way.
        etype = event.get("type")
        if etype is None and "type" not in event:
            self._on_skip(MISSING_TYPE)
            return
        clock = event.get("clock")
        try:
            if type(clock) is not int and etype != "task-sent" and (clock is not None or "clock" in event):
                # Refused before it reaches our Lamport clock: a float or a string there would
                # make every later event's clock wrong too (event_receiver.py refuses the same).
                self._on_skip(MALFORMED)
                return
            event["clock"], self.clock = lamport(self.clock, etype, clock)
            if "utcoffset" in event and "timestamp" in event:
                event["timestamp"] = event["timestamp"] - (event["utcoffset"] - self._here) * 3600
        except (TypeError, OverflowError):
            self._on_skip(MALFORMED)
            return
        event["local_received"] = now
        self._on_event(event)


def _unusual_envelope(envelope: dict[str, Any]) -> tuple[Any, str | None]:
    """(the body to decode, None), or (None, the skip reason), for an envelope that is not shaped
    as celery sends events: kombu's Message and its ``loads``, step by step, so that the stock
    path (monitor/intake/event_receiver.py) and this one take or refuse the same envelopes. Raises
    where kombu raises; the caller counts that as the message's fault."""
    body = envelope.get("body")
    if body:  # kombu's virtual Channel.decode_body
        codec = envelope["properties"].get("body_encoding")
        if codec == "base64":
            body = binascii.a2b_base64(body.encode())  # kombu encodes first: any non-ASCII is dropped as noise
        elif codec and not (type(codec) is str and codec.lower() == "utf-8"):
            return None, UNDECODABLE  # kombu has no such codec
    headers = envelope.get("headers")
    if headers:
        if type(headers) is not dict:
            return None, UNDECODABLE  # kombu's Message reads headers.get('compression')
        if headers.get("compression"):
            body = decompress(body, headers["compression"])
    if type(body) is str:
        body = body.encode()  # kombu's postencode; a lone surrogate raises here as there
    content_type, encoding = envelope.get("content-type"), envelope.get("content-encoding")
    if content_type and content_type not in _RAW_CONTENT and content_type != "application/json":
        return None, UNDECODABLE  # refused by the receiver's accept list
    if encoding and type(encoding) is not str:
        return None, UNDECODABLE  # kombu lowercases it before looking at the body
    if not body or content_type == "application/json":
        return body, None
    return None, undecoded_body_reason(body, encoding)


def undecoded_body_reason(body: bytes, encoding: str | None) -> str:
    """Why a body of a content type kombu trusts (none, application/data or /text) is skipped: kombu
    hands it over as text, which is no event, unless the text cannot be decoded."""
    encoding = (encoding or "utf-8").lower()
    if body and encoding not in _UNDECODED_ENCODINGS:
        try:
            codecs.decode(body, encoding)  # kombu's call, with whatever codec the message names
        except Exception:  # noqa: BLE001 - kombu wraps anything it raises in DecodeError
            return UNDECODABLE
    return NOT_AN_EVENT

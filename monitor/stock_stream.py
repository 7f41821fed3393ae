"""The stock path: ``celery.events.EventReceiver`` over kombu, for every transport and URL form.

It hands the pipeline the same event dicts as the fast paths, and like them folds a body of
hot task events in their usual shape without any dicts (monitor/typed.py). What kombu or
EventReceiver cannot decode is counted and skipped here instead of ending the consumer
(which would cost a reconnect and every event published meanwhile).
"""

from __future__ import annotations

import binascii
import threading
import time
from collections.abc import Callable
from queue import Empty
from typing import Any

from celery import Celery
from celery.events.receiver import CLIENT_CLOCK_SKEW, EventReceiver
from celery.utils.time import utcoffset
from kombu import Queue

from celery_sidecar.monitor import typed
from celery_sidecar.monitor.event_queue import EventQueue
from celery_sidecar.monitor.pipeline import Pipeline
from celery_sidecar.monitor.schema import MALFORMED, MISSING_TYPE, NOT_AN_EVENT, UNDECODABLE, envelope_ok


def _guard_envelopes(channel: Any, skip: Callable[[str], None]) -> None:
    """Count the envelopes kombu's virtual transports trip over, instead of losing them.

    Unguarded, kombu raises out of ``drain_events`` for an envelope that is a JSON string,
    one without ``properties`` or ``delivery_tag``, or a body that is not a string or not
    base64: the consumer reconnects and misses whatever is published meanwhile. Such an
    envelope is now refused before kombu builds a Message from it (schema.envelope_ok, the
    rule the fast path applies too), and a body that does not decode goes to
    ``on_decode_error``. An envelope that is not JSON at all is logged and dropped by the
    Redis channel; it is counted too. The hooks are on this channel and its transport only,
    and are skipped where a transport lacks them (AMQP, whose framing kombu does not parse).
    """
    transport = getattr(channel, "connection", None)
    deliver = getattr(transport, "_deliver", None)  # kombu.transport.virtual.Transport
    if deliver is not None:
        def checked_deliver(message: Any, queue: str) -> None:
            if not envelope_ok(message):
                skip(UNDECODABLE)
                return
            deliver(message, queue)

        transport._deliver = checked_deliver
    decode_body = getattr(channel, "decode_body", None)
    if decode_body is not None:
        def guarded_decode_body(body: Any, encoding: str | None = None) -> Any:
            try:
                return decode_body(body, encoding)
            except (binascii.Error, ValueError, TypeError):
                return _UNDECODABLE_BODY

        channel.decode_body = guarded_decode_body
    receive_one = getattr(channel, "_receive_one", None)  # kombu.transport.redis.Channel
    if receive_one is not None:
        def counted_receive_one(client: Any) -> Any:
            try:
                return receive_one(client)
            except Empty:  # raised there only for an envelope that is not JSON
                skip(UNDECODABLE)
                # Not re-raised: inside kombu's read loop it would stop reading, and the
                # messages redis-py already buffered would wait for the next packet on
                # the socket. None is what a reply that is not a message returns.
                return None

        channel._receive_one = counted_receive_one


BACKLOG_SECONDS = 5.0  # how often the event queue's depth is read (AMQP)
# Not UTF-8, so not JSON: kombu's decode fails and routes the message to on_decode_error.
_UNDECODABLE_BODY = b"\xff"


class _GuardedReceiver(EventReceiver):
    """EventReceiver that counts and skips what it cannot decode instead of dying, and on
    AMQP consumes the sidecar's own event queue (monitor/event_queue.py)."""

    def __init__(self, *args: Any, pipeline: Pipeline, stop: threading.Event, on_ready,
                 event_queue: EventQueue, on_backlog: Callable[[int], None], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._pipeline = pipeline
        self._stop = stop
        self._on_ready = on_ready
        self._on_backlog = on_backlog
        self._channel: Any = None
        self._next_backlog = 0.0
        # Our loop owns reconnecting (with status and backoff); kombu must not retry forever.
        self.connect_max_retries = 1
        if self.connection.transport.driver_type == "amqp":
            args = event_queue.arguments()
            self.queue = Queue(
                event_queue.name, exchange=self.exchange, routing_key=self.routing_key, durable=False,
                auto_delete=False, exclusive=False, message_ttl=event_queue.ttl_seconds,
                expires=event_queue.expires_seconds,
                queue_arguments={k: args[k] for k in ("x-max-length-bytes", "x-overflow")},
            )
            self._backlog_of = event_queue.name
        else:
            self._backlog_of = None

    def get_consumers(self, Consumer: Any, channel: Any) -> list:
        consumers = super().get_consumers(Consumer, channel)
        for consumer in consumers:  # the raw message first, before kombu builds dicts from it
            consumer.on_message = self._on_message
        return consumers

    def _on_message(self, message: Any) -> None:
        """A body of hot task events in their usual shape is decoded and checked in one step
        (monitor/typed.py), as on the fast paths; anything else is decoded as kombu would."""
        if (message.content_type == "application/json" and message.content_encoding in ("utf-8", None)
                and "compression" not in message.headers):
            now = time.time()
            events = typed.decode(message.body, now, utcoffset())
            if events is not None:
                value, adjust, fold = self.clock, self.adjust_clock, self._pipeline.fold_checked
                for etype, fields, clock in events:
                    # As event_from_message: a client's clock is ignored for task-sent.
                    adjust((value.value or 1) + CLIENT_CLOCK_SKEW if etype == "task-sent" else clock)
                    fold(etype, fields, now)
                return
        try:
            body = message.decode()
        except Exception as exc:  # noqa: BLE001 - what kombu's consumer does without on_message
            self.on_decode_error(message, exc)
            return
        self._receive(body, message)

    def _receive(self, body: Any, message: Any, list=list, isinstance=isinstance) -> None:
        handle, skip = self._pipeline.handle, self._pipeline.skip
        for item in body if isinstance(body, list) else (body,):
            if not isinstance(item, dict):
                skip(NOT_AN_EVENT)
                continue
            if "clock" in item and type(item["clock"]) is not int and item.get("type") != "task-sent":
                # Refused before it reaches the Lamport clock, as the fast path does.
                skip(MALFORMED if "type" in item else MISSING_TYPE)
                continue
            try:
                _, event = self.event_from_message(item)
            except KeyError:
                skip(MISSING_TYPE)
                continue
            except (TypeError, ValueError, OverflowError):
                skip(MALFORMED)
                continue
            handle(event)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._pipeline.skip(UNDECODABLE)

    def on_iteration(self) -> None:
        if self._stop.is_set():
            self.should_stop = True
        if self._backlog_of is not None and self._channel is not None and time.monotonic() >= self._next_backlog:
            # On the consuming connection: celery's event queues may be exclusive to it.
            _, messages, _ = self._channel.queue_declare(self._backlog_of, passive=True)
            self._on_backlog(messages)
            self._next_backlog = time.monotonic() + BACKLOG_SECONDS

    def on_consume_ready(self, connection, channel, consumers, wakeup=True, **kwargs) -> None:
        _guard_envelopes(channel, self._pipeline.skip)
        self._channel = channel
        self._on_ready()
        super().on_consume_ready(connection, channel, consumers, wakeup=wakeup, **kwargs)

    def on_connection_error(self, exc: Exception, interval: float) -> None:
        raise exc


def consume(app: Celery, pipeline: Pipeline, stop: threading.Event, on_ready: Callable[[], None],
            event_queue: EventQueue, on_backlog: Callable[[int], None]) -> None:
    """Consume until ``stop`` is set; a broker failure raises out (the intake reconnects)."""
    with app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1)
        receiver = _GuardedReceiver(
            conn, handlers={"*": pipeline.handle}, app=app, pipeline=pipeline, stop=stop, on_ready=on_ready,
            event_queue=event_queue, on_backlog=on_backlog,
        )
        for _ in receiver.consume(limit=None, timeout=None, safety_interval=1, wakeup=True):
            pass

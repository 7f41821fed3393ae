"""The stock path: ``celery.events.EventReceiver`` over kombu, for every transport and URL form.

It hands the pipeline the same event dicts as the fast paths, and like them folds a body of
hot task events in their usual shape without any dicts (monitor/boundary/hot.py). Each message
is handled inside a ``try`` of its own (monitor/intake/message_errors.py): what kombu or
EventReceiver cannot decode, and whatever the fold raises, is counted and skipped instead of
ending the consumer, which would cost a reconnect and every event published meanwhile.

kombu offers a public hook for part of that only (``Consumer.on_message`` and
``on_decode_error``); a virtual transport (Redis) builds each Message, and the Redis channel
parses each envelope, before either. For those the stock path replaces two private kombu
methods on its own objects, after checking they are what it expects
(monitor/intake/kombu_hooks.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from queue import Empty
from typing import Any

from celery import Celery
from celery.events.receiver import EventReceiver
from celery.utils.time import utcoffset
from kombu import Queue

from celery_sidecar.monitor.boundary import hot
from celery_sidecar.monitor.boundary.clock import lamport
from celery_sidecar.monitor.boundary.parse import MALFORMED, MISSING_TYPE, NOT_AN_EVENT, UNDECODABLE, envelope_ok
from celery_sidecar.monitor.fold.pipeline import Pipeline
from celery_sidecar.monitor.intake import kombu_hooks
from celery_sidecar.monitor.intake.event_queue import EventQueue
from celery_sidecar.monitor.intake.message_errors import MessageFailures

log = logging.getLogger(__name__)

BACKLOG_SECONDS = 5.0  # how often the event queue's depth is read (AMQP)
# Redis: how long the receiver waits for the server to confirm its subscription before it says
# it is consuming all the same (with a warning): a sidecar that never says so is worse.
SUBSCRIBE_GRACE_SECONDS = 10.0
# kombu's Redis channel logs each envelope that is not JSON, payload and traceback included; the
# sidecar counts those (undecodable) and logs the count, rate-limited, instead.
_KOMBU_REDIS_LOG = "kombu.transport.redis"
_KOMBU_SAYS_NOT_JSON = "Cannot process event on channel"


class _NotJsonFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_KOMBU_SAYS_NOT_JSON)


_NOT_JSON_FILTER = _NotJsonFilter()


def guard_messages(channel: Any, failures: MessageFailures, skip: Callable[[str], None]) -> None:
    """Put each message of a virtual transport inside a ``try`` before kombu touches it.

    Unguarded, kombu raises out of ``drain_events`` for an envelope that is a JSON string, one
    without ``properties`` or ``delivery_tag``, headers or a body encoding of the wrong type, a
    body that is not base64, or JSON nested past the recursion limit: the consumer reconnects
    and misses whatever is published meanwhile. Such an envelope is refused (schema.envelope_ok,
    the rule the fast path applies too) or counted here instead. The replacements are on this
    channel and its transport only; monitor/intake/kombu_hooks.py checked them first.
    """
    hooks = kombu_hooks.needed_by(channel.connection)
    if kombu_hooks.DELIVER in hooks:
        guard_deliver(channel.connection, failures, skip)
    if kombu_hooks.RECEIVE_ONE in hooks:
        guard_receive_one(channel, failures, skip)


def guard_deliver(transport: Any, failures: MessageFailures, skip: Callable[[str], None]) -> None:
    """Each raw message of a virtual transport, before kombu builds a Message from it."""
    deliver = transport._deliver

    def guarded_deliver(message: Any, queue: str) -> None:
        if not envelope_ok(message):
            skip(UNDECODABLE)
            return
        try:
            deliver(message, queue)  # the Message, then the consumer's on_message (guarded itself)
        except Exception as exc:  # noqa: BLE001 - whatever kombu raises building one message
            failures.decoding(exc)

    transport._deliver = guarded_deliver


def guard_receive_one(channel: Any, failures: MessageFailures, skip: Callable[[str], None]) -> None:
    """Each pub/sub reply of a Redis channel, whose envelope kombu parses before ``_deliver``."""
    receive_one = channel._receive_one
    transport = channel.connection
    passed = transport.connection_errors + transport.channel_errors  # the socket's and the protocol's

    def guarded_receive_one(client: Any) -> Any:
        try:
            return receive_one(client)
        except Empty:  # raised there only for an envelope that is not JSON
            skip(UNDECODABLE)
        except passed:
            raise
        except Exception as exc:  # noqa: BLE001 - parsing one envelope (JSON nested too deep...)
            failures.decoding(exc)
        # Not re-raised: inside kombu's read loop it would stop reading, and the messages
        # redis-py already buffered would wait for the next packet on the socket. None is what
        # a reply that is not a message returns.
        return None

    channel._receive_one = guarded_receive_one
    logging.getLogger(_KOMBU_REDIS_LOG).addFilter(_NOT_JSON_FILTER)  # once: a filter is added once


def when_subscribed(channel: Any, on_subscribed: Callable[[], None]) -> bool:
    """On a Redis channel, run ``on_subscribed`` once the server confirms the event subscription.

    kombu sends PSUBSCRIBE at its first poll, after ``on_consume_ready``: said there, "consuming"
    would come before Redis delivers anything, and the events published in between (a
    producer's first task-sent events, right after /health said connected) would be missed
    without a trace. The confirmation is a reply on the subscriber connection, read by
    redis-py's ``PubSub.parse_response``, which kombu's ``_receive_one`` calls: it is wrapped
    on this channel's own subscriber until every pattern it subscribed is confirmed.
    Returns False for a channel that is not kombu's Redis channel (nothing to wait for), or
    when redis-py's ``parse_response`` is not what it expects (monitor/intake/kombu_hooks.py)."""
    if not kombu_hooks.confirms_subscription(channel.connection):
        return False
    pubsub = channel.subclient
    parse = pubsub.parse_response

    def parse_response(*args: Any, **kwargs: Any) -> Any:
        response = parse(*args, **kwargs)
        # [b"psubscribe", pattern, how many channels and patterns this connection now has]; a list
        # subclass with hiredis 3 (PushNotification), as kombu's own isinstance check allows.
        if (isinstance(response, (list, tuple)) and len(response) == 3 and response[0] == b"psubscribe"
                and response[2] >= len(pubsub.patterns)):
            del pubsub.parse_response  # confirmed: redis-py's own from here on
            on_subscribed()
        return response

    pubsub.parse_response = parse_response
    return True


class _GuardedReceiver(EventReceiver):
    """EventReceiver that counts and skips what it cannot decode instead of dying, and on
    AMQP consumes the sidecar's own event queue (monitor/intake/event_queue.py)."""

    def __init__(self, *args: Any, pipeline: Pipeline, stop: threading.Event, on_ready,
                 event_queue: EventQueue, on_backlog: Callable[[int], None], patch: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._pipeline = pipeline
        self._failures = MessageFailures(pipeline.skip)
        self._patch = patch
        self._stop = stop
        self._on_ready = on_ready
        self._on_backlog = on_backlog
        self._channel: Any = None
        self._next_backlog = 0.0
        self._ready_by: float | None = None  # Redis: waiting for the subscription until then
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
        (monitor/boundary/hot.py), as on the fast paths; anything else is decoded as kombu would.
        Decoding and folding each sit in a ``try``: one message's error is that message's skip."""
        try:
            body, events, now = message.body, None, time.time()
            if (body and message.content_type == "application/json"
                    and message.content_encoding in ("utf-8", None) and "compression" not in message.headers):
                events = hot.decode(body, now, utcoffset())
            if events is None:
                decoded = message.decode()
                if not body:  # kombu hands an empty body over as it is: not an event
                    self._pipeline.skip(NOT_AN_EVENT)
                    return
        except Exception as exc:  # noqa: BLE001 - whatever one message's decoding raises, it is that message's
            self._failures.decoding(exc)
            return
        try:
            if events is None:
                self._receive(decoded, message)
                return
            value, adjust, fold = self.clock, self.adjust_clock, self._pipeline.fold_checked
            for etype, fields, clock in events:
                adjust(lamport(value.value, etype, clock)[0])
                fold(etype, fields, now)
        except Exception as exc:  # noqa: BLE001 - a fold error is counted and logged; the stream goes on
            self._failures.folding(exc)

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
        """kombu's Consumer calls this for a message it could not build (ConsumerMixin passes it)."""
        self._failures.decoding(exc)

    def on_iteration(self) -> None:
        if self._stop.is_set():
            self.should_stop = True
        if self._ready_by is not None and time.monotonic() >= self._ready_by:
            log.warning("Redis did not confirm the event subscription within %gs; consuming all the same",
                        SUBSCRIBE_GRACE_SECONDS)
            self._subscribed()
        if self._backlog_of is not None and self._channel is not None and time.monotonic() >= self._next_backlog:
            # On the consuming connection: celery's event queues may be exclusive to it.
            _, messages, _ = self._channel.queue_declare(self._backlog_of, passive=True)
            self._on_backlog(messages)
            self._next_backlog = time.monotonic() + BACKLOG_SECONDS

    def on_consume_ready(self, connection, channel, consumers, wakeup=True, **kwargs) -> None:
        if self._patch:
            guard_messages(channel, self._failures, self._pipeline.skip)
        self._channel = channel
        if self._patch and when_subscribed(channel, self._subscribed):
            self._ready_by = time.monotonic() + SUBSCRIBE_GRACE_SECONDS
        else:
            self._on_ready()
        super().on_consume_ready(connection, channel, consumers, wakeup=wakeup, **kwargs)

    def _subscribed(self) -> None:
        if self._ready_by is not None:
            self._ready_by = None
            self._on_ready()

    def on_connection_error(self, exc: Exception, interval: float) -> None:
        raise exc


def unpatched_reason(app: Celery) -> str | None:
    """None when the stock path can put every message of ``app``'s broker in its own ``try``;
    else one line saying which kombu hook is gone or changed (monitor/intake/kombu_hooks.py)."""
    with app.connection_for_read() as conn:  # not connected: the transport object alone
        return kombu_hooks.unpatched_reason(conn.transport)


def consume(app: Celery, pipeline: Pipeline, stop: threading.Event, on_ready: Callable[[], None],
            event_queue: EventQueue, on_backlog: Callable[[int], None], patch: bool = True) -> None:
    """Consume until ``stop`` is set; a broker failure raises out (the intake reconnects).

    ``patch``: whether to replace the private kombu hooks (``unpatched_reason`` found them as
    expected); without, the receiver runs as celery's own does, all or nothing."""
    with app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1)
        receiver = _GuardedReceiver(
            conn, handlers={"*": pipeline.handle}, app=app, pipeline=pipeline, stop=stop, on_ready=on_ready,
            event_queue=event_queue, on_backlog=on_backlog, patch=patch,
        )
        for _ in receiver.consume(limit=None, timeout=None, safety_interval=1, wakeup=True):
            pass

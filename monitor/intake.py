"""Consume the Celery event stream and hand each event to the pipeline, reconnecting forever.

Two paths deliver the same event dicts (``EventReceiver.event_from_message`` shape:
timestamps adjusted with ``utcoffset``, ``local_received`` set):

- the stock path: ``celery.events.EventReceiver`` over kombu, for every transport;
- the Redis fast path (monitor/redis_stream.py): reads pub/sub in bulk, for redis:// URLs.

A lost connection is logged, shown on /health and retried with capped exponential
backoff; metrics resume after a broker restart without restarting the sidecar.
"""

from __future__ import annotations

import binascii
import logging
import threading
from collections.abc import Callable
from queue import Empty
from typing import Any
from urllib.parse import urlparse

from celery import Celery
from celery.events.receiver import EventReceiver

from monitor.pipeline import Pipeline
from monitor.redis_stream import endpoint_for, stream_events
from monitor.status import Status

log = logging.getLogger(__name__)

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0


def redact(url: str) -> str:
    """The broker URL without its password, for logs and /health."""
    parsed = urlparse(url)
    if parsed.password:
        netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
        return parsed._replace(netloc=netloc).geturl()
    return url


def _guard_envelopes(channel: Any, skip: Callable[[str], None]) -> None:
    """Count the two envelopes kombu's virtual transports trip over, instead of losing them.

    A body that is not valid base64 raises out of ``drain_events`` (the consumer would
    reconnect and miss whatever is published meanwhile): its decode now yields bytes that
    fail JSON decoding, so kombu calls ``on_decode_error`` and it is counted. An envelope that
    is not JSON is logged and dropped by the Redis channel; it is now counted too. Both hooks
    are on this channel instance only, and are skipped where a transport lacks them (AMQP).
    """
    decode_body = getattr(channel, "decode_body", None)
    if decode_body is not None:
        def guarded_decode_body(body: Any, encoding: str | None = None) -> Any:
            try:
                return decode_body(body, encoding)
            except (binascii.Error, ValueError):
                return _UNDECODABLE_BODY

        channel.decode_body = guarded_decode_body
    receive_one = getattr(channel, "_receive_one", None)  # kombu.transport.redis.Channel
    if receive_one is not None:
        def counted_receive_one(client: Any) -> Any:
            try:
                return receive_one(client)
            except Empty:  # raised there only for an envelope that is not JSON
                skip("undecodable")
                raise

        channel._receive_one = counted_receive_one


# Not UTF-8, so not JSON: kombu's decode fails and routes the message to on_decode_error.
_UNDECODABLE_BODY = b"\xff"


def make_app(broker_url: str, transport_options: dict[str, Any]) -> Celery:
    app = Celery("celery-sidecar", broker=broker_url, set_as_current=False)
    app.conf.broker_transport_options = transport_options
    app.conf.broker_connection_retry_on_startup = False
    return app


class _GuardedReceiver(EventReceiver):
    """EventReceiver that counts and skips what it cannot decode instead of dying."""

    def __init__(self, *args: Any, pipeline: Pipeline, stop: threading.Event, on_ready, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._pipeline = pipeline
        self._stop = stop
        self._on_ready = on_ready
        # Our loop owns reconnecting (with status and backoff); kombu must not retry forever.
        self.connect_max_retries = 1

    def _receive(self, body: Any, message: Any, list=list, isinstance=isinstance) -> None:
        handle, skip = self._pipeline.handle, self._pipeline.skip
        for item in body if isinstance(body, list) else (body,):
            if not isinstance(item, dict):
                skip("not_an_event")
                continue
            try:
                _, event = self.event_from_message(item)
            except KeyError:
                skip("missing_type")
                continue
            except (TypeError, ValueError):
                skip("malformed")
                continue
            handle(event)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._pipeline.skip("undecodable")

    def on_iteration(self) -> None:
        if self._stop.is_set():
            self.should_stop = True

    def on_consume_ready(self, connection, channel, consumers, wakeup=True, **kwargs) -> None:
        _guard_envelopes(channel, self._pipeline.skip)
        self._on_ready()
        super().on_consume_ready(connection, channel, consumers, wakeup=wakeup, **kwargs)

    def on_connection_error(self, exc: Exception, interval: float) -> None:
        raise exc


class Intake:
    def __init__(
        self,
        broker_url: str,
        transport_options: dict[str, Any],
        pipeline: Pipeline,
        status: Status,
        *,
        fast_path: bool = True,
    ) -> None:
        self.broker_url = broker_url
        self.transport_options = transport_options
        self.pipeline = pipeline
        self.status = status
        self.app = make_app(broker_url, transport_options)
        # The fast path serves plain redis:// URLs; TLS, sentinel and sockets use kombu.
        self.use_fast_path = fast_path and endpoint_for(broker_url, transport_options) is not None
        status.intake = "redis-fast" if self.use_fast_path else "stock"
        status.broker = redact(broker_url)

    def run(self, stop: threading.Event) -> None:
        delay = BACKOFF_START
        while not stop.is_set():
            try:
                if self.use_fast_path:
                    self._consume_fast(stop)
                else:
                    self._consume_stock(stop)
            except Exception as exc:  # noqa: BLE001 - any broker failure: report, back off, retry
                was_connected = self.status.connected
                self._disconnected(exc)
                if was_connected:
                    delay = BACKOFF_START
                log.warning(
                    "broker %s: %s; reconnecting in %.1fs", self.status.broker, self.status.last_error, delay
                )
                stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        self._disconnected(None)

    def _connected(self) -> None:
        if not self.status.connected:
            if self.status.last_error is not None:
                self.status.reconnects += 1
                log.info("broker %s: reconnected", self.status.broker)
            else:
                log.info("broker %s: connected, consuming events (%s path)", self.status.broker, self.status.intake)
            self.status.connected = True
            self.status.last_error = None
            self.pipeline.set_connected(True)

    def _disconnected(self, exc: Exception | None) -> None:
        if exc is not None:
            self.status.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
        self.status.connected = False
        self.pipeline.set_connected(False)

    def _consume_stock(self, stop: threading.Event) -> None:
        with self.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)
            receiver = _GuardedReceiver(
                conn, handlers={"*": self.pipeline.handle}, app=self.app,
                pipeline=self.pipeline, stop=stop, on_ready=self._connected,
            )
            for _ in receiver.consume(limit=None, timeout=None, safety_interval=1, wakeup=True):
                pass

    def _consume_fast(self, stop: threading.Event) -> None:
        def ready() -> None:
            self._connected()
            self.wakeup_workers()

        stream_events(
            self.broker_url, self.transport_options, on_event=self.pipeline.handle,
            on_skip=self.pipeline.skip, stop=stop, on_connected=ready,
        )

    def wakeup_workers(self) -> None:
        """Ask workers for a heartbeat now, so they show up without waiting a beat."""
        try:
            self.app.control.broadcast("heartbeat")
        except Exception as exc:  # noqa: BLE001 - best effort: heartbeats come anyway
            log.debug("heartbeat broadcast failed: %s", exc)

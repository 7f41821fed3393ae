"""Consume the Celery event stream and hand each event to the pipeline, reconnecting forever.

Three paths deliver the same event dicts (``EventReceiver.event_from_message`` shape:
timestamps adjusted with ``utcoffset``, ``local_received`` set):

- the Redis fast path (monitor/redis_stream.py): reads pub/sub in bulk, for redis:// URLs;
- the AMQP fast path (monitor/amqp_stream.py): reads RabbitMQ deliveries off the socket,
  for amqp://, amqps:// and pyamqp:// URLs with one broker;
- the stock path (monitor/stock_stream.py): ``celery.events.EventReceiver`` over kombu,
  for everything else, and for every URL with ``--no-fast-path``.

On AMQP brokers both paths consume the sidecar's own event queue (monitor/event_queue.py).

A lost connection is logged, shown on /health and retried with capped exponential
backoff; metrics resume after a broker restart without restarting the sidecar.
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from urllib.parse import urlparse

from celery import Celery

from celery_sidecar.monitor import amqp_stream, redis_stream, stock_stream
from celery_sidecar.monitor.event_queue import EventQueue
from celery_sidecar.monitor.pipeline import Pipeline

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


def choose_path(broker_url: str, transport_options: dict[str, Any], fast_path: bool) -> tuple[str, str]:
    """(path, why): which event path serves ``broker_url``."""
    if not fast_path:
        return "stock", "--no-fast-path"
    if redis_stream.endpoint_for(broker_url, transport_options) is not None:
        return "redis-fast", "redis:// URL"
    if amqp_stream.fast_path_serves(broker_url, transport_options):
        return "amqp-fast", "AMQP URL with one broker"
    return "stock", "the fast paths serve redis://, amqp://, amqps:// and pyamqp:// URLs with one broker"


def make_app(broker_url: str, transport_options: dict[str, Any]) -> Celery:
    app = Celery("celery-sidecar", broker=broker_url, set_as_current=False)
    app.conf.broker_transport_options = transport_options
    app.conf.broker_connection_retry_on_startup = False
    return app


class Intake:
    def __init__(
        self,
        broker_url: str,
        transport_options: dict[str, Any],
        pipeline: Pipeline,
        *,
        fast_path: bool = True,
        event_queue: EventQueue | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.transport_options = transport_options
        self.pipeline = pipeline
        self.status = status = pipeline.status
        self.app = make_app(broker_url, transport_options)
        self.event_queue = event_queue or EventQueue()
        status.broker = redact(broker_url)
        status.intake, why = choose_path(broker_url, transport_options, fast_path)
        self._consume = {"redis-fast": self._consume_redis, "amqp-fast": self._consume_amqp,
                         "stock": self._consume_stock}[status.intake]
        log.info("event path: %s (%s)", status.intake, why)

    def run(self, stop: threading.Event) -> None:
        delay = BACKOFF_START
        while not stop.is_set():
            try:
                self._consume(stop)
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
        status = self.status
        if not status.connected:
            if status.last_error is not None:
                log.info("broker %s: reconnected", status.broker)
            else:
                log.info("broker %s: connected, consuming events (%s path)", status.broker, status.intake)
            self.pipeline.set_connected(True)

    def _disconnected(self, exc: Exception | None) -> None:
        error = None if exc is None else f"{type(exc).__name__}: {str(exc)[:300]}"
        self.pipeline.set_connected(False, error)

    def _consume_stock(self, stop: threading.Event) -> None:
        stock_stream.consume(self.app, self.pipeline, stop, self._connected, self.event_queue, self._backlog)

    def _consume_redis(self, stop: threading.Event) -> None:
        redis_stream.stream_events(
            self.broker_url, self.transport_options, on_event=self.pipeline.handle,
            on_skip=self.pipeline.skip, stop=stop, on_connected=self._ready,
            on_checked=self.pipeline.fold_checked,
        )

    def _consume_amqp(self, stop: threading.Event) -> None:
        amqp_stream.stream_events(
            self.broker_url, self.transport_options, self.event_queue, on_event=self.pipeline.handle,
            on_skip=self.pipeline.skip, stop=stop, on_connected=self._ready, on_backlog=self._backlog,
            on_checked=self.pipeline.fold_checked,
        )

    def _ready(self) -> None:
        self._connected()
        self.wakeup_workers()

    def _backlog(self, messages: int) -> None:
        self.status.event_queue_messages = messages

    def wakeup_workers(self) -> None:
        """Ask workers for a heartbeat now, so they show up without waiting a beat."""
        try:
            self.app.control.broadcast("heartbeat")
        except Exception as exc:  # noqa: BLE001 - best effort: heartbeats come anyway
            log.debug("heartbeat broadcast failed: %s", exc)

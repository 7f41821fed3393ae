"""Consume the Celery event stream and hand each event to the pipeline, reconnecting forever.

Three paths deliver the same event dicts (``EventReceiver.event_from_message`` shape:
timestamps adjusted with ``utcoffset``, ``local_received`` set):

- the Redis fast path (monitor/intake/redis_pubsub.py): reads pub/sub in bulk, for every Redis
  URL form (TCP, TLS, unix socket, Sentinel) but a credential provider's;
- the AMQP fast path (monitor/intake/amqp_socket.py): reads RabbitMQ deliveries off the socket,
  for amqp://, amqps:// and pyamqp:// URLs with one broker;
- the stock path (monitor/intake/event_receiver.py): ``celery.events.EventReceiver`` over kombu,
  for everything else, and for every URL with ``--no-fast-path``.

On AMQP brokers both paths consume the sidecar's own event queue (monitor/intake/event_queue.py).
The broker's TLS options (celery's ``broker_use_ssl``, monitor/intake/broker_ssl.py) reach
every connection: both paths and the sidecar's own app (worker inspection, remote control).

A failed or lost connection is retried with capped exponential backoff; metrics resume
after a broker restart without restarting the sidecar. The log says it once, in plain words
(authentication refused, connection refused, name not found: monitor/intake/broker_url.py),
then retries quietly: at debug level, and a reminder every few minutes. /health shows the
failed attempts since the last connection and the last error.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery

from celery_sidecar.monitor.fold.pipeline import Pipeline
from celery_sidecar.monitor.intake import amqp_socket, broker_ssl, event_receiver, redis_endpoint, redis_pubsub
from celery_sidecar.monitor.intake import broker_url as broker_url_mod
from celery_sidecar.monitor.intake.broker_url import redact
from celery_sidecar.monitor.intake.event_queue import EventQueue

log = logging.getLogger(__name__)

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
REMIND_SECONDS = 300.0  # while retrying quietly, say it is still failing this often


def choose_path(broker_url: str, transport_options: dict[str, Any], fast_path: bool,
                ssl_options: Any = None) -> tuple[str, str]:
    """(path, why): which event path serves ``broker_url``."""
    if not fast_path:
        return "stock", "--no-fast-path"
    redis = redis_endpoint.resolve(broker_url, transport_options, ssl_options)
    if isinstance(redis, redis_endpoint.RedisEndpoint):
        return "redis-fast", redis.describe()
    if redis != "not a Redis URL":
        return "stock", f"the Redis fast path cannot serve {redis}"
    if amqp_socket.fast_path_serves(broker_url, transport_options):
        return "amqp-fast", "AMQP URL with one broker"
    return "stock", "the AMQP fast path serves amqp://, amqps:// and pyamqp:// URLs with one broker"


class _SidecarApp(Celery):
    """Celery reads CELERY_BROKER_URL (and its _READ_/_WRITE_ twins) from the environment ahead
    of the broker it was given: every connection of the sidecar's own app (control, inspect,
    the stock path) goes to the URL the sidecar was started with, whatever else is set."""

    sidecar_broker_url: str = ""

    def _connection(self, url: str, *args: Any, **kwargs: Any) -> Any:
        return super()._connection(self.sidecar_broker_url, *args, **kwargs)


def make_app(broker_url: str, transport_options: dict[str, Any], ssl_options: Any = None) -> Celery:
    app = _SidecarApp("celery-sidecar", broker=broker_url, set_as_current=False)
    app.sidecar_broker_url = broker_url
    app.conf.broker_transport_options = transport_options
    if ssl_options:
        app.conf.broker_use_ssl = ssl_options
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
        ssl_options: Any = None,
    ) -> None:
        self.broker_url = broker_url = broker_url_mod.normalize(broker_url)
        self.transport_options = transport_options
        self.ssl_options = ssl_options = broker_ssl.normalize(ssl_options)
        self.pipeline = pipeline
        self.status = status = pipeline.status
        self.app = make_app(broker_url, transport_options, ssl_options)
        self.event_queue = event_queue or EventQueue()
        self.failed_attempts = 0  # since the last connection; /health shows it
        self._said: str | None = None  # the kind of failure the log last named
        self._said_at = 0.0
        status.broker = redact(broker_url)
        status.intake, why = choose_path(broker_url, transport_options, fast_path, ssl_options)
        self._consume = {"redis-fast": self._consume_redis, "amqp-fast": self._consume_amqp,
                         "stock": self._consume_stock}[status.intake]
        unpatched = event_receiver.unpatched_reason(self.app) if status.intake == "stock" else None
        self._patch = unpatched is None
        # Why this path serves the broker, for the log and /health (broker.intake_reason).
        self.path_reason = why if unpatched is None else f"{why}; {unpatched}"
        (log.info if unpatched is None else log.warning)("event path: %s (%s)", status.intake, self.path_reason)

    def run(self, stop: threading.Event) -> None:
        delay = BACKOFF_START
        while not stop.is_set():
            try:
                self._consume(stop)
            except Exception as exc:  # noqa: BLE001 - any broker failure: report, back off, retry
                was_connected = self.status.connected
                if was_connected:
                    delay = BACKOFF_START
                self.failed_attempts += 1
                cause = broker_url_mod.explain(exc, self.broker_url)
                error = broker_url_mod.scrub(f"{type(exc).__name__}: {str(exc)[:300]}", self.broker_url)
                self.pipeline.set_connected(False, f"{cause} ({error})" if cause else error)
                # An unexplained error's text may differ on every attempt: its type is what repeats.
                self._say_failure(cause or error, cause or type(exc).__name__, was_connected, delay)
                stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        self.pipeline.set_connected(False, None)

    def _say_failure(self, cause: str, kind: str, was_connected: bool, delay: float) -> None:
        """One clear line for a new failure (the first, a lost connection, a different kind);
        then quiet retries, with a reminder every REMIND_SECONDS."""
        broker, attempts, now = self.status.broker, self.failed_attempts, time.monotonic()
        if was_connected or kind != self._said:
            self._said, self._said_at = kind, now
            if was_connected:
                log.warning("broker %s: connection lost: %s; reconnecting", broker, cause)
            else:
                log.error("broker %s: %s; retrying every %gs at most (attempts and the last error are on "
                          "/health)", broker, cause, BACKOFF_MAX)
        elif now - self._said_at >= REMIND_SECONDS:
            self._said_at = now
            log.warning("broker %s: still not connected after %d attempts: %s", broker, attempts, cause)
        else:
            log.debug("broker %s: attempt %d failed: %s; next in %.1fs", broker, attempts, cause, delay)

    def _connected(self) -> None:
        status = self.status
        if not status.connected:
            if status.last_error is not None:
                log.info("broker %s: connected after %d failed attempts", status.broker, self.failed_attempts)
            else:
                log.info("broker %s: connected, consuming events (%s path)", status.broker, status.intake)
            self.failed_attempts, self._said = 0, None
            self.pipeline.set_connected(True)

    def _consume_stock(self, stop: threading.Event) -> None:
        event_receiver.consume(self.app, self.pipeline, stop, self._connected, self.event_queue, self._backlog,
                               patch=self._patch)

    def _consume_redis(self, stop: threading.Event) -> None:
        redis_pubsub.stream_events(
            self.broker_url, self.transport_options, on_event=self.pipeline.handle,
            on_skip=self.pipeline.skip, stop=stop, on_connected=self._ready,
            on_checked=self.pipeline.fold_checked, ssl_options=self.ssl_options,
        )

    def _consume_amqp(self, stop: threading.Event) -> None:
        amqp_socket.stream_events(
            self.broker_url, self.transport_options, self.event_queue, on_event=self.pipeline.handle,
            on_skip=self.pipeline.skip, stop=stop, on_connected=self._ready, on_backlog=self._backlog,
            on_checked=self.pipeline.fold_checked, ssl_options=self.ssl_options,
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

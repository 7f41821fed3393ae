"""The application side of a test: a Celery client that sends tasks by name, and sends
events the way a worker's or producer's EventDispatcher does."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery import Celery

from tests.support.tier import require_e2e


def producer(broker_url: str, *, sent_events: bool = True, **conf: Any) -> Celery:
    """Sends tasks by name, with task-sent events by default (so latency counts from sent)."""
    require_e2e("a broker connection")
    app = Celery("producer", broker=broker_url, set_as_current=False)
    app.conf.update(task_send_sent_event=sent_events, broker_connection_retry_on_startup=True, **conf)
    return app


def dispatch(broker_url: str, events: Iterable[tuple[str, dict[str, Any]]], hostname: str = "prod@test",
             **conf: Any) -> None:
    """Send events with celery's own EventDispatcher (it sets timestamp, utcoffset, clock, pid)."""
    app = producer(broker_url, **conf)
    with app.connection_for_write() as conn, app.events.Dispatcher(
        conn, hostname=hostname, enabled=True, buffer_while_offline=False
    ) as dispatcher:
        for etype, fields in events:
            dispatcher.send(etype, **fields)

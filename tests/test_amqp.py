"""The sidecar on RabbitMQ: task counters from a real worker, queue length by passive declare.

Each test session gets a private vhost (conftest.amqp_url); queue and worker names are
still unique per test, and the queues are deleted after it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest
from celery.events.event import get_exchange
from kombu import Connection

from tests.support.clients import producer
from tests.support.configs import write_config


@pytest.fixture
def queues(amqp_url) -> Iterator[list[str]]:
    """Unique queue names; each is deleted from the broker after the test."""
    names: list[str] = []
    yield names
    with Connection(amqp_url, connect_timeout=5) as conn:
        for name in names:
            with contextlib.suppress(Exception):  # never declared, or already gone
                conn.channel().queue_delete(name)


def unique(prefix: str, names: list[str]) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    names.append(name)
    return name


@pytest.mark.parametrize(("flag", "intake"), [("--fast-path", "amqp-fast"), ("--no-fast-path", "stock")])
def test_tasks_on_rabbitmq_are_counted_per_queue_and_the_worker_is_a_consumer(
        amqp_url, queues, sidecar, worker, flag, intake):
    queue = unique("t", queues)
    proc = sidecar(amqp_url, flag)
    assert proc.health()[1]["broker"]["intake"] == intake
    name = f"amqp-{uuid.uuid4().hex[:6]}"
    worker(amqp_url, name=name, queues=queue)

    app = producer(amqp_url)
    for _ in range(3):
        app.send_task("demo.ok", kwargs={"x": 2, "y": 3}, queue=queue)
    app.send_task("demo.fail", kwargs={"reason": "amqp says no"}, queue=queue)

    proc.wait_metric("celery_task_succeeded_total", lambda v: v == 3, timeout=45, name="demo.ok", queue_name=queue)
    proc.wait_metric("celery_task_failed_total", lambda v: v == 1, timeout=30, name="demo.fail", queue_name=queue)
    # task-sent comes from the producer, not the worker: it can arrive after the worker's events.
    proc.wait_metric("celery_task_sent_total", lambda v: v == 4, queue_name=queue)
    metrics = proc.metrics()
    assert metrics.sum("celery_task_started_total", queue_name=queue) == 4
    failed = metrics.all("celery_task_failed_total", queue_name=queue)
    assert {dict(labels)["exception"] for labels in failed} == {"", "DemoError"}  # "": the zero series
    hosts = {dict(labels)["hostname"] for labels in metrics.all("celery_task_succeeded_total", queue_name=queue)}
    assert len(hosts) == 1 and hosts.pop().startswith(f"{name}@")

    # The queue was discovered from task-sent routing info and probed by passive declare:
    # drained, with the worker as its one consumer.
    proc.wait_metric("celery_active_consumer_count", lambda v: v == 1, timeout=15, queue_name=queue)
    assert proc.metrics().get("celery_queue_length", queue_name=queue) == 0


def test_queue_length_and_consumers_of_an_unconsumed_queue_and_a_missing_one(amqp_url, queues, sidecar, tmp_path):
    waiting, missing = unique("q", queues), unique("missing", queues)
    app = producer(amqp_url)
    for i in range(7):
        app.send_task("demo.ok", kwargs={"x": i}, queue=waiting)  # declares the queue; nobody consumes it

    config = write_config(tmp_path / "sidecar.yml", queues=[waiting, missing])
    proc = sidecar(amqp_url, config=config)

    proc.wait_metric("celery_queue_length", lambda v: v == 7, timeout=15, queue_name=waiting)
    proc.wait_metric("celery_queue_length", lambda v: v == 0, timeout=15, queue_name=missing)
    # Several more probe rounds (0.5 s apart), each asking about the missing queue again.
    proc.wait_probe_rounds(3)

    metrics = proc.metrics()
    assert metrics.get("celery_queue_length", queue_name=waiting) == 7
    assert metrics.get("celery_active_consumer_count", queue_name=waiting) == 0
    assert metrics.get("celery_queue_length", queue_name=missing) == 0
    assert metrics.get("celery_active_consumer_count", queue_name=missing) == 0
    assert metrics.get("celery_sidecar_probe_errors_total", probe="queue_length") == 0
    # Reading a queue is passive: the missing one was not created by probing it.
    with Connection(amqp_url, connect_timeout=5) as conn, pytest.raises(conn.channel_errors):
        conn.channel().queue_declare(missing, passive=True)
    assert proc.health()[0] == 200


def test_an_undecodable_event_message_on_rabbitmq_is_skipped_without_dropping_the_connection(amqp_url, sidecar):
    """The stock EventReceiver path: bytes that are not JSON are counted and skipped.

    They must not be treated as a broker failure: a reconnect re-declares the event
    queue under a new name, so every event published during the backoff is lost.
    """
    proc = sidecar(amqp_url)
    app = producer(amqp_url)
    marker = f"amqp.after_{uuid.uuid4().hex[:8]}"
    with app.connection_for_write() as conn:
        exchange = get_exchange(conn)
        raw = conn.Producer()
        raw.publish(b"\x00\xffnot json{{", exchange=exchange, routing_key="task.sent",
                    content_type="application/json", content_encoding="utf-8", declare=[exchange])
        raw.publish(b"\x80\x04K\x01.", exchange=exchange, routing_key="task.sent",
                    content_type="application/x-python-serialize", content_encoding="binary")
        with app.events.Dispatcher(conn, hostname="prod@amqp", enabled=True, buffer_while_offline=False) as d:
            d.send("task-sent", uuid=str(uuid.uuid4()), name=marker, queue="celery")

    proc.wait_metric("celery_task_sent_total", lambda v: v == 1, timeout=20, name=marker)
    metrics = proc.metrics()
    assert metrics.get("celery_sidecar_events_skipped_total", reason="undecodable") == 2
    assert metrics.get("celery_sidecar_reconnects_total") == 0
    assert proc.health()[0] == 200

"""Edge cases of the event stream on Redis, observed on the real sidecar's /metrics.

Every event here travels the real path: published to the ``celeryev`` exchange of a
private redis-server (by celery's own EventDispatcher, a kombu Producer, or a raw
PUBLISH for bytes no client would send), consumed by ``python -m celery_sidecar run``.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterable

import pytest
from celery.events.event import get_exchange
from celery.utils.time import adjust_timestamp, utcoffset

from tests.support.clients import dispatch as send_events
from tests.support.clients import producer
from tests.support.configs import write_config
from tests.support.procs import SidecarProcess
from tests.support.servers import wait_for

PRODUCER = "prod@edge"


# -- publishing helpers ----------------------------------------------------------------


def dispatch(url: str, events: Iterable[tuple[str, dict]], hostname: str = PRODUCER) -> None:
    """Send events with celery's EventDispatcher (sets timestamp, utcoffset, clock, pid)."""
    send_events(url, events, hostname)


def publish_body(url: str, body: object, routing_key: str = "task.sent") -> None:
    """Publish any JSON body to the event exchange, as the dispatcher would route it."""
    app = producer(url)
    with app.connection_for_write() as conn:
        exchange = get_exchange(conn)
        conn.Producer().publish(
            body, exchange=exchange, routing_key=routing_key, serializer="json", declare=[exchange]
        )


def event(etype: str, *, hostname: str = PRODUCER, timestamp: float | None = None,
          offset: float | None = None, **fields) -> dict:
    """An event dict with the fields EventDispatcher adds (``Event`` + ``utcoffset``/``pid``/``clock``)."""
    return {"type": etype, "hostname": hostname, "timestamp": time.time() if timestamp is None else timestamp,
            "utcoffset": utcoffset() if offset is None else offset, "pid": os.getpid(), "clock": 1, **fields}


def event_channel(server) -> bytes:
    """The pub/sub channel events travel on: watch every channel while one real event is sent."""
    pubsub = server.client().pubsub()
    pubsub.psubscribe("*")
    try:
        wait_for(lambda: pubsub.get_message(timeout=0.1), timeout=5, what="psubscribe confirmation")
        dispatch(server.url, [("worker-heartbeat", {"freq": 2.0, "active": 0, "processed": 0})],
                 hostname="probe@edge")

        def channel():
            message = pubsub.get_message(timeout=0.1)
            if message and message["type"] == "pmessage" and b"celeryev" in message["channel"]:
                return message["channel"]
            return None

        return wait_for(channel, timeout=5, what="an event on some celeryev channel")
    finally:
        pubsub.close()


def absent(proc: SidecarProcess, name: str, **labels: str) -> bool:
    return not proc.metrics().all(name, **labels)


# -- malformed and batched messages -------------------------------------------------------


def test_malformed_events_are_counted_by_reason_and_the_stream_goes_on(redis_srv, sidecar):
    proc = sidecar(redis_srv.url)
    channel = event_channel(redis_srv)

    publish_body(redis_srv.url, {"uuid": "no-type", "hostname": PRODUCER, "timestamp": time.time()})
    proc.wait_metric("celery_sidecar_events_skipped_total", lambda v: v == 1, reason="missing_type")

    publish_body(redis_srv.url, "just a string, not an event")
    proc.wait_metric("celery_sidecar_events_skipped_total", lambda v: v == 1, reason="not_an_event")

    redis_srv.client().publish(channel, b"\x00\xffgarbage that is not JSON{{")
    proc.wait_metric("celery_sidecar_events_skipped_total", lambda v: v == 1, reason="undecodable")

    dispatch(redis_srv.url, [("task-sent", {"name": "edge.no_uuid", "queue": "celery"})])
    proc.wait_metric("celery_sidecar_events_skipped_total", lambda v: v == 1, reason="missing_field")

    # Still alive, still healthy, and the next valid event is counted.
    assert proc.proc.poll() is None
    dispatch(redis_srv.url, [("task-sent", {"uuid": str(uuid.uuid4()), "name": "edge.after", "queue": "celery"})])
    proc.wait_metric("celery_task_sent_total", lambda v: v == 1, name="edge.after")
    assert proc.health()[0] == 200
    metrics = proc.metrics()
    assert metrics.sum("celery_sidecar_events_skipped_total") == 4
    assert metrics.all("celery_task_sent_total", name="edge.no_uuid") == {}


def test_a_batched_list_body_counts_every_event_in_it(redis_srv, sidecar):
    proc = sidecar(redis_srv.url)

    # 24 task-sent events in one message (celery's buffer_limit for batched task events).
    batch = [event("task-sent", uuid=str(uuid.uuid4()), name="edge.batch", queue="celery") for _ in range(24)]
    publish_body(redis_srv.url, batch, routing_key="task.multi")
    proc.wait_metric("celery_task_sent_total", lambda v: v == 24, name="edge.batch")

    # What a prefork worker sends: received/started/succeeded of 8 tasks in one list body.
    ids = [e["uuid"] for e in batch[:8]]
    now = time.time()
    worker_batch = [
        event(kind, hostname="batcher@edge", timestamp=now + step, uuid=task_id, runtime=0.25)
        for task_id in ids
        for step, kind in enumerate(("task-received", "task-started", "task-succeeded"))
    ]
    publish_body(redis_srv.url, worker_batch, routing_key="task.multi")
    proc.wait_metric("celery_task_succeeded_total", lambda v: v == 8, name="edge.batch", hostname="batcher@edge")
    metrics = proc.metrics()
    assert metrics.sum("celery_task_received_total", name="edge.batch") == 8
    assert metrics.sum("celery_task_started_total", name="edge.batch") == 8
    assert metrics.sum("celery_task_runtime_count", name="edge.batch") == 8
    assert metrics.sum("celery_task_runtime_sum", name="edge.batch") == pytest.approx(8 * 0.25)
    assert metrics.get("celery_sidecar_events_total", type="task-sent") == 24
    assert metrics.sum("celery_sidecar_events_skipped_total") == 0


def test_timestamps_are_adjusted_with_utcoffset_like_celery_does(redis_srv, sidecar):
    """A worker whose clock runs 2 h off: queue wait is 0.5 s, not 7200 s.

    Celery's convention (celery.utils.time.utcoffset): hours *west* of UTC, and
    ``adjust_timestamp(ts, offset) = ts - (offset - here) * 3600``. So a timestamp 2 h
    ahead is undone by ``utcoffset = here + 2``, one 2 h behind by ``here - 2``.
    """
    proc = sidecar(redis_srv.url)
    here = utcoffset()
    sent_at = time.time()
    cases = [(sent_at + 7200 + 0.5, here + 2), (sent_at - 7200 + 0.5, here - 2)]
    for started_ts, offset in cases:
        # What celery's own EventReceiver makes of these stamps: the oracle for the sidecar.
        assert adjust_timestamp(started_ts, offset) - adjust_timestamp(sent_at, here) == pytest.approx(0.5)

    for started_ts, offset in cases:
        task_id = str(uuid.uuid4())
        publish_body(redis_srv.url, event("task-sent", timestamp=sent_at, offset=here, uuid=task_id,
                                          name="edge.skew", queue="celery"))
        publish_body(redis_srv.url, event("task-started", hostname="skewed@edge", timestamp=started_ts,
                                          offset=offset, uuid=task_id), routing_key="task.started")

    proc.wait_metric("celery_task_queue_wait_time_count", lambda v: v == 2, name="edge.skew")
    metrics = proc.metrics()
    assert metrics.sum("celery_task_queue_wait_time_sum", name="edge.skew") == pytest.approx(1.0, abs=0.01)
    # Both fall in the 0.5 s bucket, none near 7200 s.
    assert metrics.sum("celery_task_queue_wait_time_bucket", name="edge.skew", le="0.5") == 2


def test_10000_distinct_task_names_are_capped_without_losing_a_count(redis_srv, sidecar, tmp_path):
    config = write_config(tmp_path / "sidecar.yml", cardinality={"max_task_names": 50})
    proc = sidecar(redis_srv.url, config=config)

    dispatch(redis_srv.url, (
        ("task-sent", {"uuid": f"card-{i}", "name": f"edge.generated_{i}", "queue": "celery"})
        for i in range(10_000)
    ))
    proc.wait_metric("celery_task_sent_total", lambda v: v == 10_000, timeout=60)

    series = proc.metrics().all("celery_task_sent_total")
    names = {dict(labels)["name"] for labels in series}
    assert "other" in names
    assert len(names - {"other"}) <= 50
    assert sum(series.values()) == 10_000
    assert proc.metrics().get("celery_sidecar_events_total", type="task-sent") == 10_000


# -- with real workers -----------------------------------------------------------------------


def test_failed_task_is_labelled_with_the_exception_class_and_a_generic_hostname(
    redis_srv, sidecar, worker, tmp_path
):
    config = write_config(tmp_path / "sidecar.yml", cardinality={"generic_hostname": True})
    proc = sidecar(redis_srv.url, config=config)
    name = f"exc-{uuid.uuid4().hex[:6]}"
    worker(redis_srv.url, name=name)
    host = proc.wait_worker_up(name)

    client = producer(redis_srv.url)
    client.send_task("demo.fail", kwargs={"reason": "disk 93% full on /dev/sda1"})
    client.send_task("demo.ok")
    proc.wait_metric("celery_task_failed_total", lambda v: v == 1, timeout=30, name="demo.fail")
    proc.wait_metric("celery_task_succeeded_total", lambda v: v == 1, timeout=30, name="demo.ok")

    failed = proc.metrics().all("celery_task_failed_total")
    # exception="": the zero series every label set gets from its first event on a worker.
    assert sorted(dict(labels)["exception"] for labels in failed) == ["", "", "DemoError"]
    metrics = proc.metrics()
    task_hosts = {
        dict(labels)["hostname"]
        for kind in ("received", "started", "succeeded", "failed")
        for labels in metrics.all(f"celery_task_{kind}_total")
    }
    assert task_hosts == {"generic"}
    assert metrics.sum("celery_task_runtime_count", hostname="generic") == 1  # task-failed has no runtime
    # Worker series keep the real hostname (bounded by the worker cap, and needed to tell who is down).
    assert metrics.get("celery_worker_up", hostname=host) == 1


def test_a_dead_workers_series_go_to_zero_then_disappear(redis_srv, sidecar, worker, tmp_path):
    config = write_config(tmp_path / "sidecar.yml", state={"worker_forget_seconds": 3, "heartbeat_grace_seconds": 1})
    proc = sidecar(redis_srv.url, config=config)
    name = f"gone-{uuid.uuid4().hex[:6]}"
    victim = worker(redis_srv.url, name=name)
    host = proc.wait_worker_up(name)
    producer(redis_srv.url).send_task("demo.ok")
    proc.wait_metric("celery_task_succeeded_total", lambda v: v == 1, timeout=30, hostname=host)

    victim.kill(signal.SIGKILL)  # no worker-offline: only the heartbeats stop
    killed_at = time.monotonic()
    proc.wait_metric("celery_worker_up", lambda v: v == 0, timeout=15, hostname=host)
    down_after = time.monotonic() - killed_at
    assert proc.metrics().get("celery_worker_tasks_active", hostname=host) == 0

    wait_for(lambda: absent(proc, "celery_worker_up", hostname=host), timeout=15,
             what=f"{host}'s celery_worker_up series to be removed")
    gone_after = time.monotonic() - killed_at
    assert gone_after - down_after >= 2, "removed before worker_forget_seconds (3 s) had passed"
    metrics = proc.metrics()
    for series in ("celery_task_succeeded_total", "celery_task_runtime_count", "celery_worker_tasks_active"):
        assert metrics.all(series, hostname=host) == {}, series
    assert host not in proc.health()[1]["workers"]


def test_latency_source_is_received_without_task_sent_events_and_sent_with_them(redis_srv, sidecar, worker):
    proc = sidecar(redis_srv.url)
    worker(redis_srv.url, name=f"lat-{uuid.uuid4().hex[:6]}")

    # An app with celery's default task_send_sent_event=False.
    producer(redis_srv.url, sent_events=False).send_task("demo.ok")
    proc.wait_metric("celery_task_succeeded_total", lambda v: v == 1, timeout=30, name="demo.ok")
    metrics = proc.metrics()
    assert metrics.get("celery_sidecar_latency_source", source="received") == 1
    assert metrics.get("celery_sidecar_latency_source", source="sent") == 0
    assert metrics.sum("celery_task_sent_total") == 0
    assert metrics.sum("celery_task_queue_wait_time_count", name="demo.ok") == 1  # measured from received
    assert proc.health()[1]["latency_source"] == "received"

    producer(redis_srv.url).send_task("demo.ok")
    proc.wait_metric("celery_task_succeeded_total", lambda v: v == 2, timeout=30, name="demo.ok")
    # task-sent comes from the producer, not the worker: it can arrive after the worker's events.
    proc.wait_metric("celery_task_sent_total", lambda v: v == 1, name="demo.ok")
    metrics = proc.metrics()
    assert metrics.get("celery_sidecar_latency_source", source="sent") == 1
    assert metrics.get("celery_sidecar_latency_source", source="received") == 0
    assert proc.health()[1]["latency_source"] == "sent"


def test_a_gracefully_stopped_worker_is_down_at_once_not_after_heartbeats_time_out(
    redis_srv, sidecar, worker, tmp_path
):
    # Heartbeat loss would take 2 x 2 s + 60 s here: only worker-offline can explain a prompt 0.
    config = write_config(tmp_path / "sidecar.yml", state={"heartbeat_grace_seconds": 60})
    proc = sidecar(redis_srv.url, config=config)
    name = f"bye-{uuid.uuid4().hex[:6]}"
    leaving = worker(redis_srv.url, name=name)
    host = proc.wait_worker_up(name)
    proc.wait_metric("celery_worker_up", lambda v: v == 1, hostname=host)

    os.kill(leaving.pid, signal.SIGTERM)  # warm shutdown of the main process, as systemd/k8s do
    stopped_at = time.monotonic()
    proc.wait_metric("celery_worker_up", lambda v: v == 0, timeout=15, hostname=host)
    assert time.monotonic() - stopped_at < 15
    assert leaving.proc.wait(15) == 0
    assert proc.health()[1]["workers"][host] == "down"
    assert proc.metrics().get("celery_sidecar_events_total", type="worker-offline") == 1

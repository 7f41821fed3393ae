"""Queue pressure with real parts: prefetch that hides the backlog from the broker's list, a
fleet that grows and shrinks, and a worker that heartbeats but consumes nothing.

Three prefork workers (``-c 2``) with ``acks_late`` and a prefetch multiplier of 64 take 300
half-second tasks off the broker's list at once: the list reads 0 while nearly all of them
wait. The sidecar's demand (reserved + running) must still be every task not yet finished,
and its formula's output must be what the test computes from the inputs it exports.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.support.configs import write_config
from tests.support.procs import Metrics, SidecarProcess
from tests.support.servers import redis_server, wait_for

pytestmark = pytest.mark.e2e

APP = "tests.support.pressure_app"
TASKS, NAP, WORKERS, SLOTS = 300, 0.5, 3, 2
CONFIG = {"state": {"pressure_window_seconds": 20}, "thresholds": {"not_consuming_seconds": 5}}


@pytest.fixture
def results() -> Iterator[str]:
    with redis_server() as server:
        yield server.url.rsplit("/", 1)[0] + "/1"


def client(broker_url: str, backend: str) -> Celery:
    app = Celery("producer", broker=broker_url, backend=backend, set_as_current=False)
    app.conf.update(task_send_sent_event=True, broker_connection_retry_on_startup=True)
    return app


def finished(sent: list) -> int:
    return sum(1 for r in sent if r.ready())


def desired_from(m: Metrics, queue: str) -> int:
    """The formula of monitor/load.py, recomputed from the series it exports (docs/autoscaling.md)."""
    q = {"queue_name": queue}
    r = m.get("celery_queue_task_runtime_median_seconds", **q)
    running = m.get("celery_queue_tasks_running", **q)
    backlog = m.get("celery_queue_length", **q) + m.get("celery_queue_tasks_reserved", **q)
    slots = max(m.get("celery_queue_arrival_rate", **q) * r, running) + backlog * r / m.get(
        "celery_queue_latency_threshold_seconds", **q)
    return math.ceil(slots / m.get("celery_queue_pool_size", **q) - 1e-9) if slots > 0 else 0


def check_prefetched_demand(side: SidecarProcess, sent: list) -> None:
    """While the broker's list reads 0, reserved + running is every task not yet finished.

    Checked once every task-received has been folded: prefork workers buffer their task events
    and send them in batches, so the list can read 0 a second before the sidecar hears of the
    tasks. A prefork child stores its result before the parent sends task-succeeded, so each
    slot may hold one task the backend calls finished and whose end event is still on its way:
    the upper bound allows one per slot. The lower bound allows two tasks received before
    their task-sent (celery publishes it after the task message) and so not yet on a queue.
    """
    checked = 0
    in_flight = WORKERS * SLOTS

    def once() -> bool:
        nonlocal checked
        before = finished(sent)
        m = side.metrics()
        after = finished(sent)
        if m.get("celery_queue_length", queue_name="celery") != 0 or after > TASKS - 40:
            return checked >= 3
        if m.sum("celery_task_received_total") < TASKS:
            return False  # the workers' buffered task-received events are still on their way
        held = m.get("celery_queue_tasks_reserved", queue_name="celery") + m.get(
            "celery_queue_tasks_running", queue_name="celery")
        assert TASKS - after - 2 <= held <= TASKS - before + in_flight, (held, before, after)
        assert m.get("celery_queue_capacity", queue_name="celery") == WORKERS * SLOTS
        pressure = m.get("celery_queue_pressure", queue_name="celery")
        slots = WORKERS * SLOTS
        assert (TASKS - after - 2) / slots <= pressure <= (TASKS - before + in_flight) / slots, (
            pressure, before, after)
        if m.get("celery_queue_task_runtime_median_seconds", queue_name="celery") is not None:
            assert NAP <= m.get("celery_queue_task_runtime_median_seconds", queue_name="celery") < NAP + 0.3
            desired = m.get("celery_queue_workers_desired", queue_name="celery")
            assert desired == desired_from(m, "celery") and desired > WORKERS, desired
            assert m.get("celery_queue_pool_size", queue_name="celery") == SLOTS
            checked += 1
        return checked >= 3

    wait_for(once, timeout=40, interval=0.5, what="three scrapes with the list at 0 and the formula's inputs")


def check_all_back_to_zero(side: SidecarProcess, sent: list) -> None:
    wait_for(lambda: finished(sent) == TASKS, timeout=60, what="every task to finish")
    for family in ("celery_queue_tasks_reserved", "celery_queue_tasks_running", "celery_queue_pressure"):
        side.wait_metric(family, lambda v: v == 0, queue_name="celery")
    # Past the window, nothing arrives: no worker is needed any more.
    side.wait_metric("celery_queue_workers_desired", lambda v: v == 0, timeout=40, queue_name="celery")


def prefetch_story(broker_url: str, results: str, sidecar, worker, tmp_path: Path) -> SidecarProcess:
    config = write_config(tmp_path / "sidecar.yml", **CONFIG)
    env = {"PRESSURE_RESULT_BACKEND": results}
    for n in range(WORKERS):
        worker(broker_url, name=f"w{n}", app=APP, concurrency=SLOTS, queues="celery", env=env)
    side = sidecar(broker_url, config=config)
    for n in range(WORKERS):
        side.wait_worker_up(f"w{n}")
    side.wait_metric("celery_queue_capacity", lambda v: v == WORKERS * SLOTS, queue_name="celery")
    producer = client(broker_url, results)
    sent = [producer.send_task("pressure.nap", args=(NAP,)) for _ in range(TASKS)]
    check_prefetched_demand(side, sent)
    check_all_back_to_zero(side, sent)
    return side


def test_prefetch_on_redis_hides_nothing_and_capacity_follows_the_fleet(
        redis_srv, results, sidecar, worker, tmp_path: Path):
    side = prefetch_story(redis_srv.url, results, sidecar, worker, tmp_path)
    env = {"PRESSURE_RESULT_BACKEND": results}
    # A fourth worker: capacity grows within one inspect interval.
    fourth = worker(redis_srv.url, name="w3", app=APP, concurrency=SLOTS, queues="celery", env=env)
    side.wait_metric("celery_queue_capacity", lambda v: v == 4 * SLOTS, timeout=15, queue_name="celery")
    # One SIGKILLed: gone within the liveness window (2 x heartbeat + grace).
    fourth.kill(signal.SIGKILL)
    side.wait_metric("celery_queue_capacity", lambda v: v == 3 * SLOTS, timeout=15, queue_name="celery")
    # A worker consuming two queues counts its whole pool in each.
    worker(redis_srv.url, name="both", app=APP, concurrency=3, queues="celery,batch", env=env)
    side.wait_metric("celery_queue_capacity", lambda v: v == 3 * SLOTS + 3, timeout=15, queue_name="celery")
    side.wait_metric("celery_queue_capacity", lambda v: v == 3, timeout=15, queue_name="batch")


def test_prefetch_on_rabbitmq_unacked_is_demand_too(amqp_url, results, sidecar, worker, tmp_path: Path):
    prefetch_story(amqp_url, results, sidecar, worker, tmp_path)


def test_a_worker_that_heartbeats_but_consumes_nothing_pages_and_resolves(
        redis_srv, results, sidecar, worker, slack, tmp_path: Path):
    config = write_config(tmp_path / "sidecar.yml", **CONFIG)
    env = {"PRESSURE_RESULT_BACKEND": results}
    worker(redis_srv.url, name="zombie", app=APP, concurrency=2, queues="orders", env=env)
    worker(redis_srv.url, name="busy", app=APP, concurrency=1, queues="reports", env=env)
    worker(redis_srv.url, name="idle", app=APP, concurrency=2, queues="quiet", env=env)
    side = sidecar(redis_srv.url, config=config, env={"SLACK_WEBHOOK_URL": slack.webhook_url})
    hosts = {name: side.wait_worker_up(name) for name in ("zombie", "busy", "idle")}
    producer = client(redis_srv.url, results)
    # The busy worker runs one long task with more waiting behind it: busy, not a zombie.
    producer.send_task("pressure.nap", args=(40,), queue="reports")
    reports = [producer.send_task("pressure.nap", args=(0.1,), queue="reports") for _ in range(3)]
    assert producer.control.broadcast("zombie", destination=[hosts["zombie"]], reply=True, timeout=5)
    orders = [producer.send_task("pressure.nap", args=(0.1,), queue="orders") for _ in range(5)]
    # Its heartbeats go on and inspection still lists the queue, yet it takes nothing.
    [page] = slack.wait_messages("Worker not consuming", timeout=30, side=side)
    assert hosts["zombie"] in page.headline and "orders" in page.headline
    assert "received nothing from it" in page.body["text"] and "oldest task waited" in page.body["text"]
    m = side.metrics()
    assert m.get("celery_worker_consuming", hostname=hosts["zombie"], queue_name="orders") == 0
    assert m.get("celery_worker_consuming", hostname=hosts["busy"], queue_name="reports") == 1
    assert m.get("celery_worker_consuming", hostname=hosts["idle"], queue_name="quiet") == 1
    assert all(not r.ready() for r in orders)
    # Consuming again: it receives, the page resolves, the tasks run.
    assert producer.control.broadcast("revive", destination=[hosts["zombie"]], reply=True, timeout=5)
    slack.wait_message("Resolved: worker not consuming", timeout=30, side=side)
    wait_for(lambda: all(r.ready() for r in orders), timeout=30, what="the zombie's tasks to run once revived")
    side.wait_metric("celery_worker_consuming", lambda v: v == 1, hostname=hosts["zombie"], queue_name="orders")
    assert len(slack.messages("Worker not consuming")) == 1
    assert not any(hosts["busy"] in h or hosts["idle"] in h for h in slack.headlines()), slack.headlines()
    assert not all(r.ready() for r in reports)  # the busy worker is still on its long task

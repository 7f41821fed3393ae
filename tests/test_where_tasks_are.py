"""Where are my tasks: queue age, stuck tasks, lost and redelivered tasks, with real parts.

A private redis-server, real Celery workers, the `celery-sidecar run` process and the fake
Slack it posts to. The in-process tests at the end pin the indexes behind the metrics.
"""

from __future__ import annotations

import time
import uuid

import pytest

from celery_sidecar.monitor.fold.inflight import Running, Waiting
from tests.support.clients import producer
from tests.support.configs import write_config
from tests.support.inproc import DataPath

pytestmark = pytest.mark.timeout(180)

SLOW_APP = "tests.support.slow_apps"
QUICK = {"rate_limit_per_second": 20}  # the tests' few alerts come out at once


# -- queue age ---------------------------------------------------------------------------------


def test_a_stalled_queue_pages_on_latency_though_no_task_starts_and_resolves_once_consumed(
        redis_srv, sidecar, worker, slack, tmp_path):
    path = write_config(tmp_path / "sidecar.yml",
                        {**QUICK, "rules": {"latency": {"for_seconds": 1, "resolve_after_seconds": 2}}},
                        queues=["stalled"])
    side = sidecar(redis_srv.url, config=path, env={"SLACK_WEBHOOK_URL": slack.webhook_url})
    app = producer(redis_srv.url)
    for _ in range(3):
        app.send_task("demo.ok", queue="stalled")  # nothing consumes "stalled"

    side.wait_metric("celery_queue_oldest_task_age_seconds", lambda v: v > 5, timeout=20, queue_name="stalled")
    fired = slack.wait_message("Task latency above threshold: queue stalled", side=side)
    assert "the oldest task in queue stalled (normal) has waited" in fired.body["text"]
    assert side.metrics().sum("celery_task_started_total") == 0, "the alert came before any task started"
    assert side.metrics().get("celery_queue_oldest_task_age_lower_bound", queue_name="stalled") == 0

    worker(redis_srv.url, name="drainer", queues="stalled")
    side.wait_metric("celery_queue_oldest_task_age_seconds", lambda v: v == 0, timeout=30, queue_name="stalled")
    slack.wait_message("Resolved: task latency above threshold: queue stalled", side=side)


def test_tasks_sent_before_the_sidecar_started_are_aged_from_the_list(redis_srv, sidecar, tmp_path):
    app = producer(redis_srv.url)
    for _ in range(5):
        app.send_task("demo.ok", queue="old")
    path = write_config(tmp_path / "sidecar.yml", queues=["old"])
    side = sidecar(redis_srv.url, config=path)

    # The sidecar never saw them sent; the task at the list's end is the oldest, and its age
    # counts from when the probe first saw it there: a lower bound, growing, not 0.
    side.wait_metric("celery_queue_oldest_task_age_seconds", lambda v: v >= 2, timeout=20, queue_name="old")
    metrics = side.metrics()
    assert metrics.get("celery_queue_oldest_task_age_lower_bound", queue_name="old") == 1
    assert metrics.get("celery_queue_length", queue_name="old") == 5


def test_a_countdown_task_does_not_wait_before_it_is_due(redis_srv, sidecar, worker, tmp_path):
    path = write_config(tmp_path / "sidecar.yml", queues=["later", "now"])
    side = sidecar(redis_srv.url, config=path)
    worker(redis_srv.url, name="holder", queues="later")
    app = producer(redis_srv.url)
    app.send_task("demo.ok", queue="later", countdown=30)
    app.send_task("demo.ok", queue="now")  # no worker: this one waits, the control

    side.wait_metric("celery_task_received_total", lambda v: v == 1, timeout=30, queue_name="later")
    side.wait_metric("celery_queue_oldest_task_age_seconds", lambda v: v >= 3, timeout=20, queue_name="now")
    # The held countdown task was received long enough ago to have counted, and it does not.
    assert side.metrics().get("celery_queue_oldest_task_age_seconds", queue_name="later") == 0


# -- stuck and lost tasks ------------------------------------------------------------------------


def test_a_task_past_its_limit_is_stuck_once_and_resolves_when_it_finishes(
        redis_srv, sidecar, worker, slack, tmp_path):
    path = write_config(tmp_path / "sidecar.yml", QUICK,
                        thresholds={"task_runtime_seconds": {"default": 3600, "overrides": {"demo.slo*": 3}}})
    side = sidecar(redis_srv.url, config=path, env={"SLACK_WEBHOOK_URL": slack.webhook_url})
    worker(redis_srv.url, name="sleepy")
    host = side.wait_worker_up("sleepy")
    # 7 s past the 3 s limit: time for the stuck check and the worker's confirmation (inspect
    # active) on a busy machine, before the task ends.
    result = producer(redis_srv.url).send_task("demo.slow", kwargs={"seconds": 10})

    side.wait_metric("celery_task_stuck", lambda v: v == 1, timeout=20, name="demo.slow")
    stuck = slack.wait_message("Task stuck: demo.slow", side=side)
    text = stuck.body["text"]
    assert result.id in text and host in text and "Limit: 3 s" in text and "Started:" in text
    resolved = slack.wait_message("Task no longer stuck: demo.slow", timeout=20, side=side)
    assert f"Task {result.id} succeeded" in resolved.body["text"]
    side.settled()
    assert len(slack.messages("Task stuck")) == 1
    assert side.metrics().get("celery_task_stuck", name="demo.slow") in (None, 0)


def test_a_killed_worker_reports_its_running_tasks_lost_and_their_redelivery(
        redis_srv, sidecar, worker, slack):
    side = sidecar(redis_srv.url, env={"SLACK_WEBHOOK_URL": slack.webhook_url})
    victim = worker(redis_srv.url, name="victim", app=SLOW_APP, concurrency=2)
    host = side.wait_worker_up("victim")
    app = producer(redis_srv.url)
    ids = [app.send_task("slow.sleep", args=[60]).id for _ in range(2)]
    side.wait_metric("celery_task_running", lambda v: v == 2, timeout=30, name="slow.sleep")

    victim.kill()  # SIGKILL, prefork pool included: no worker-offline, no task-failed
    killed_at = time.monotonic()
    lost = slack.wait_message(f"2 tasks lost on {host}", timeout=15, side=side)
    assert time.monotonic() - killed_at <= 2 * 2.0 + 2.0 + 1.0 + 1.0  # the worker-down time, and delivery
    assert all(task_id in lost.body["text"] for task_id in ids)
    assert side.metrics().get("celery_task_lost_total", name="slow.sleep", queue_name="celery") == 2

    # acks_late and a 5 s visibility timeout: a new worker gets them again.
    worker(redis_srv.url, name=f"rescuer-{uuid.uuid4().hex[:4]}", app=SLOW_APP, concurrency=2)
    side.wait_metric("celery_task_redelivered_total", lambda v: v == 2, timeout=60, name="slow.sleep")
    slack.wait_message("Lost task came back: slow.sleep", timeout=20, side=side)


# -- the indexes, in-process ---------------------------------------------------------------------


def test_waiting_orders_by_age_and_holds_eta_tasks_until_due():
    waiting = Waiting()
    waiting.add("a", "q", since=100.0, eta=None)
    waiting.add("b", "q", since=101.0, eta=None)
    waiting.add("later", "q", since=100.0, eta=200.0)
    assert waiting.oldest("q", 110.0) == (10.0, "a")
    waiting.remove("a")
    assert waiting.oldest("q", 110.0) == (9.0, "b")  # "later" is not due: it does not count
    waiting.remove("b")
    assert waiting.oldest("q", 150.0) == (0.0, None)
    assert waiting.oldest("q", 250.0) == (50.0, "later")  # due at 200: it waits from then
    waiting.remove("later")
    assert waiting.oldest("q", 250.0) == (0.0, None) and len(waiting) == 0


def test_running_knows_the_oldest_the_stuck_and_what_each_worker_runs():
    running = Running()
    running.start("t1", "app.slow", "w1", at=100.0)
    running.start("t2", "app.slow", "w2", at=150.0)
    running.start("t3", "app.fast", "w1", at=190.0)
    rows = {name: rest for name, *rest in running.by_name(200.0, lambda name: 60.0)}
    assert rows == {"app.slow": [2, 100.0, 1], "app.fast": [1, 10.0, 0]}
    assert list(running.stuck(200.0, lambda name: 60.0, most=10)) == [("t1", "app.slow", "w1", 100.0)]
    assert running.on_host("w1") == ["t1", "t3"]
    assert running.finish("t1") and not running.finish("t1")
    assert running.on_host("w1") == ["t3"]


def test_the_lru_evicting_a_task_takes_it_out_of_the_indexes():
    now = time.time()
    path = DataPath.build({"state": {"max_tasks": 100}}, now=now)
    for i in range(150):
        path.handle({"type": "task-sent", "uuid": f"t{i}", "name": "app.x", "queue": "q", "timestamp": now,
                     "local_received": now})
    assert len(path.state.tasks) == 100 and len(path.state.task_fold.waiting) == 100
    assert path.state.task_fold.waiting.oldest("q", now + 1)[1] == "t50"


def test_a_heavy_queue_makes_its_tasks_heavy_though_no_task_sent_named_their_queue():
    """With task_send_sent_event off (celery's default) the queue is inferred (from other
    task-sent events of the name, or the app's routes); heavy_queues applies to that queue."""
    now = time.time()
    path = DataPath.build({"heavy_queues": ["bulk"]}, now=now)
    path.handle({"type": "task-sent", "uuid": "seen", "name": "app.export", "queue": "bulk", "timestamp": now,
                 "local_received": now})
    for kind in ("task-received", "task-started"):
        path.handle({"type": kind, "uuid": "unsent", "name": "app.export", "hostname": "w1", "timestamp": now + 1,
                     "local_received": now + 1})
    assert set(path.metrics.latency.series) == {("bulk", "heavy")}


def test_a_task_sent_naming_no_queue_leaves_a_waiting_task_where_and_since_when_it_waits():
    now = time.time()
    path = DataPath.build({}, now=now)
    learn = {"uuid": "earlier", "name": "app.x", "hostname": "w1", "timestamp": now, "local_received": now}
    path.handle({**learn, "type": "task-sent", "queue": "q"}, {**learn, "type": "task-started"})
    path.handle({"type": "task-received", "uuid": "t1", "name": "app.x", "hostname": "w1", "timestamp": now + 1,
                 "local_received": now + 1})
    path.handle({"type": "task-sent", "uuid": "t1", "name": "app.x", "timestamp": now + 2, "local_received": now + 2})
    assert path.state.task_fold.waiting.oldest("q", now + 3) == (2.0, "t1")

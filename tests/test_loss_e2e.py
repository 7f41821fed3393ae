"""Honest under loss, with real parts: real workers, real brokers, events really lost.

The test knows the truth (every task it sent, and each one's result from a result backend);
the sidecar knows only its stream, and the workers' own counts. A sidecar that is paused long
enough loses events for real: Redis drops a pub/sub subscriber that falls behind
(``client-output-buffer-limit pubsub``), and RabbitMQ drops the oldest events of the
sidecar's event queue once it is full (``--event-queue-max-bytes``). The missed estimate must
come within 5 % of what was lost, the "event stream incomplete" alert must fire once and
resolve, and the tasks whose end events were lost must not page as stuck.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from tests.support.configs import write_config
from tests.support.fake_slack import FakeSlack
from tests.support.procs import Process, SidecarProcess, start_worker
from tests.support.servers import redis_server, wait_for

pytestmark = pytest.mark.e2e

APP = "tests.support.loss_app"
PAD = "x" * 1000  # each task's events then carry ~6 KB: a paused sidecar's buffers fill in seconds
MISSED = "celery_sidecar_task_events_missed_fleet_total"
CONFIG = {
    "thresholds": {"task_runtime_seconds": {"default": 8}},  # a lost end event would page fast
    "state": {"stream_window_seconds": 20},
    "alerts": {"rules": {"events_missed": {"resolve_after_seconds": 2}}},
}


class Load:
    """Sends ``loss.quick`` at a steady rate on its own thread, and keeps every result."""

    def __init__(self, broker_url: str, backend: str, per_second: float = 100.0) -> None:
        self.app = Celery("producer", broker=broker_url, backend=backend, set_as_current=False)
        self.app.conf.update(task_send_sent_event=True, broker_connection_retry_on_startup=True)
        self.interval = 1.0 / per_second
        self.results: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):
            self.results.append(self.app.send_task("loss.quick", args=(n, PAD)))
            n += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def wait_all_finished(self, timeout: float = 60) -> int:
        wait_for(lambda: all(r.ready() for r in self.results), timeout=timeout, what="every task sent to finish")
        return len(self.results)


@pytest.fixture
def results() -> Iterator[str]:
    """A result backend of the test's own: the truth about every task, beside the stream."""
    with redis_server() as server:
        yield server.url.rsplit("/", 1)[0] + "/1"


def pause(side: SidecarProcess, until, what: str) -> None:
    """SIGSTOP the sidecar until ``until()`` holds (the broker gave up on it), then SIGCONT."""
    os.kill(side.pid, signal.SIGSTOP)
    try:
        wait_for(until, timeout=90, what=what)
    finally:
        os.kill(side.pid, signal.SIGCONT)


def counted(side: SidecarProcess) -> float:
    return side.metrics().sum("celery_task_succeeded_total")


def settle(side: SidecarProcess) -> None:
    """Every heartbeat period of the run compared: past the last heartbeat's settling time."""
    side.decided(time.time() + 8, timeout=30)


def check_the_estimate(side: SidecarProcess, slack: FakeSlack, sent: int) -> int:
    settle(side)
    lost = sent - counted(side)  # tasks that finished, whose end event the sidecar never folded
    assert lost >= 100, f"the scenario lost too little to measure ({lost} of {sent})"
    missed = side.metrics().get(MISSED)
    assert abs(missed - lost) <= 0.05 * lost, f"estimated {missed} missed, {lost} really lost"
    [incomplete] = slack.wait_messages("Event stream incomplete", side=side)
    assert "likely cause" in incomplete.body["text"]
    slack.wait_message("Resolved: event stream incomplete", timeout=60, side=side)
    assert len(slack.messages("Event stream incomplete")) == 1, "the alert fired more than once"
    assert slack.messages("Task stuck") == [], "a task whose end event was lost paged as stuck"
    return lost


def test_redis_drops_a_paused_sidecar_and_the_estimate_says_how_much_was_lost(
        results, slack, sidecar, worker, tmp_path: Path):
    with redis_server("--client-output-buffer-limit", "pubsub", "128kb", "64kb", "1") as broker:
        config = write_config(tmp_path / "sidecar.yml", **CONFIG)
        worker(broker.url, name="w", app=APP, concurrency=4, env={"LOSS_RESULT_BACKEND": results})
        side = sidecar(broker.url, config=config, env={"SLACK_WEBHOOK_URL": slack.webhook_url})
        side.wait_worker_up("w")
        client = redis.Redis.from_url(broker.url)
        subscribers = lambda: [c for c in client.client_list() if int(c.get("psub", 0)) > 0]  # noqa: E731
        baseline = len(subscribers())
        with Load(broker.url, results) as load:
            side.wait_metric("celery_task_succeeded_total", lambda v: v >= 100, timeout=30)
            dropped_at: list[int] = []

            def dropped_a_while_ago() -> bool:
                """Redis dropped it, and 300 more tasks went by: everything since is gone."""
                if not dropped_at and len(subscribers()) < baseline:
                    dropped_at.append(len(load.results))
                return bool(dropped_at) and len(load.results) >= dropped_at[0] + 300

            pause(side, dropped_a_while_ago, "Redis to drop the paused sidecar")
            side.wait_metric("celery_sidecar_reconnects_total", lambda v: v >= 1, timeout=30)
            before = counted(side)
            side.wait_metric("celery_task_succeeded_total", lambda v: v >= before + 100, timeout=30)
        sent = load.wait_all_finished()
        lost = check_the_estimate(side, slack, sent)
        assert "reconnected" in slack.messages("Event stream incomplete")[0].body["text"], lost


def test_rabbitmq_drops_the_head_of_a_full_event_queue_and_the_estimate_says_how_much(
        amqp_url, results, slack, sidecar, worker, tmp_path: Path):
    config = write_config(tmp_path / "sidecar.yml", **CONFIG)
    worker(amqp_url, name="w", app=APP, concurrency=4, env={"LOSS_RESULT_BACKEND": results})
    side = sidecar(amqp_url, "--event-queue-max-bytes", "1048576", config=config,
                   env={"SLACK_WEBHOOK_URL": slack.webhook_url})
    side.wait_worker_up("w")
    with Load(amqp_url, results) as load:
        side.wait_metric("celery_task_succeeded_total", lambda v: v >= 100, timeout=30)
        paused_at = len(load.results)
        # Paused while 1,500 tasks (~9 MB of events) are sent: more than the 1 MiB queue and the
        # socket's buffers hold between them.
        pause(side, lambda: len(load.results) >= paused_at + 1500, "1500 tasks sent while the sidecar is paused")
        before = counted(side)
        side.wait_metric("celery_task_succeeded_total", lambda v: v >= before + 100, timeout=30)
    sent = load.wait_all_finished()
    check_the_estimate(side, slack, sent)
    assert side.metrics().get("celery_sidecar_reconnects_total") == 0


def test_restarts_recycling_retries_and_a_second_sidecar_mid_load_estimate_nothing_missed(
        results, redis_srv, slack, sidecar, procs, tmp_path: Path):
    """Everything a healthy fleet does, none of it a loss."""
    config = write_config(tmp_path / "sidecar.yml", **CONFIG)
    env = {"LOSS_RESULT_BACKEND": results, "LOSS_MAX_TASKS_PER_CHILD": "3"}
    first = start_worker(redis_srv.url, name="w", app=APP, concurrency=2, env=env)
    procs.append(first)
    one = sidecar(redis_srv.url, config=config, env={"SLACK_WEBHOOK_URL": slack.webhook_url})
    one.wait_worker_up("w")
    with Load(redis_srv.url, results, per_second=30) as load:
        flaky = [load.app.send_task("loss.flaky", args=(n,)) for n in range(20)]  # each retried once
        one.wait_metric("celery_task_succeeded_total", lambda v: v >= 60, timeout=30)
        two = sidecar(redis_srv.url, config=config)  # started mid-load
        two.wait_worker_up("w")
        first.stop()  # SIGTERM: a warm shutdown, then the same worker again
        second: Process = start_worker(redis_srv.url, name="w", app=APP, concurrency=2, env=env)
        procs.append(second)
        before = counted(one)
        one.wait_metric("celery_task_succeeded_total", lambda v: v >= before + 60, timeout=60)
    load.wait_all_finished()
    wait_for(lambda: all(r.ready() for r in flaky), timeout=30, what="the retried tasks")
    for side in (one, two):
        settle(side)
        metrics = side.metrics()
        assert metrics.get(MISSED) == 0, side.log()[-3000:]
        assert metrics.get("celery_sidecar_task_events_expected_fleet_total") > 100
    assert one.metrics().sum("celery_task_retried_total") >= 20
    assert slack.messages("Event stream incomplete") == []


def test_an_event_after_a_tasks_final_one_keeps_its_task(redis_srv, results, sidecar, worker):
    """Reject sends task-failed then task-rejected: the rejection is counted under the task."""
    worker(redis_srv.url, name="w", app=APP, concurrency=1, env={"LOSS_RESULT_BACKEND": results})
    side = sidecar(redis_srv.url)
    side.wait_worker_up("w")
    app = Celery("producer", broker=redis_srv.url, set_as_current=False)
    app.conf.update(task_send_sent_event=True, broker_connection_retry_on_startup=True)
    app.send_task("loss.refuse")
    side.wait_metric("celery_task_rejected_total", lambda v: v == 1, name="loss.refuse", queue_name="celery")
    assert side.metrics().sum("celery_task_rejected_total", name="unknown") == 0

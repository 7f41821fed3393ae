"""The stream is evidence, not truth: the workers' own counts against the events, in-process.

Every story feeds the data path what a worker sends (heartbeats with ``processed`` and
``active``, task events) on a fake clock, then reads what /metrics and the alert engine read:
the missed estimate, end events never seen, and which stuck tasks are confirmed. The same
rules against real workers and brokers are tests/test_loss_e2e.py.
"""

from __future__ import annotations

from itertools import count
from typing import Any

import pytest

from tests.support.inproc import DataPath

HOST = "celery@w1"
T0 = 1_000_000.0
_ids = count()


class Worker:
    """What one Celery worker sends: its clock, its pid, its processed count."""

    def __init__(self, path: DataPath, host: str = HOST, pid: int = 100) -> None:
        self.path, self.host, self.pid = path, host, pid
        self.processed = 0

    def send(self, etype: str, at: float, received: float | None = None, **fields: Any) -> None:
        """``at`` by the worker's clock; ``received``: when it arrives here (default: at once)."""
        received = at if received is None else received
        self.path.at(received).handle({"type": etype, "hostname": self.host, "timestamp": at,
                                       "local_received": received, **fields})

    def online(self, at: float) -> None:
        self.processed = 0
        self.send("worker-online", at, freq=2.0, pid=self.pid)

    def heartbeat(self, at: float, active: int = 0) -> None:
        self.send("worker-heartbeat", at, freq=2.0, active=active, processed=self.processed, pid=self.pid)

    def run(self, at: float, *, started_seen: bool = True, end_seen: bool = True, uuid: str | None = None) -> str:
        """One task accepted at ``at`` (processed grows), its events sent or lost on the way."""
        uuid = uuid or f"t{next(_ids)}"
        self.processed += 1
        self.send("task-received", at, uuid=uuid, name="app.job", retries=0)
        if started_seen:
            self.send("task-started", at + 0.01, uuid=uuid)
        if end_seen:
            self.send("task-succeeded", at + 0.02, uuid=uuid, runtime=0.01)
        return uuid


def beating(worker: Worker, start: float, end: float, active: int = 0) -> None:
    """The worker stays alive: a heartbeat every 2 s, and the ticker runs."""
    at = start
    while at <= end:
        worker.heartbeat(at, active=active)
        tick(worker.path, at + 0.1)
        at += 2


def stream(path: DataPath):
    return path.view.snapshot().stream


def tick(path: DataPath, at: float) -> None:
    path.at(at)
    path.pipeline.set_connected(True)
    path.pipeline.tick(at)


def runtime_limit(path: DataPath, seconds: float) -> None:
    """Every task's stuck limit (thresholds.task_runtime_seconds.default), as a reload sets it."""
    thresholds = path.config.current.thresholds
    limits = thresholds.task_runtime_seconds.model_copy(update={"default": seconds})
    path.config.current = path.config.current.model_copy(
        update={"thresholds": thresholds.model_copy(update={"task_runtime_seconds": limits})})


@pytest.fixture
def path() -> DataPath:
    return DataPath.build(now=T0)


def test_a_whole_stream_estimates_nothing_missed(path):
    worker = Worker(path)
    worker.online(T0)
    for second in range(1, 60):
        worker.run(T0 + second)
        if second % 2 == 0:
            worker.heartbeat(T0 + second + 0.5)
    tick(path, T0 + 80)
    assert stream(path).expected >= 50
    assert stream(path).missed == 0


def test_every_lost_task_started_event_is_counted_as_missed(path):
    worker = Worker(path)
    worker.online(T0)
    lost = 0
    for second in range(1, 61):
        gone = second % 10 == 0
        lost += gone
        worker.run(T0 + second, started_seen=not gone, end_seen=not gone)
        if second % 2 == 0:
            worker.heartbeat(T0 + second + 0.5)
    tick(path, T0 + 80)
    view = stream(path)
    assert view.expected == 60
    assert view.missed == lost == 6
    assert view.by_worker[HOST] == (60, 6)


def test_events_a_worker_buffered_past_its_heartbeat_are_not_missed(path):
    """Task events go out in buffered groups; a heartbeat can overtake the last few."""
    worker = Worker(path)
    worker.online(T0)
    worker.run(T0 + 0.5)  # it sends task events
    worker.heartbeat(T0 + 1)
    worker.processed += 3  # accepted before the heartbeat ...
    worker.heartbeat(T0 + 3)
    for n in range(3):  # ... their events arrive after it
        worker.send("task-started", T0 + 2.5, received=T0 + 3.2, uuid=f"late{n}")
        worker.send("task-succeeded", T0 + 2.6, received=T0 + 3.3, uuid=f"late{n}", runtime=0.1)
    worker.heartbeat(T0 + 5)
    tick(path, T0 + 20)
    assert (stream(path).expected, stream(path).missed) == (4, 0)


def test_a_restarted_worker_is_a_new_baseline_not_a_loss(path):
    worker = Worker(path)
    worker.online(T0)
    for second in range(1, 11):
        worker.run(T0 + second)
    worker.heartbeat(T0 + 11)
    # SIGTERM and start again: a new pid, processed from 0; its worker-online may be lost too.
    worker.pid, worker.processed = 200, 0
    for second in range(20, 25):
        worker.run(T0 + second)
    worker.heartbeat(T0 + 26)
    worker.run(T0 + 27)
    worker.heartbeat(T0 + 28)
    tick(path, T0 + 60)
    assert stream(path).missed == 0


def test_a_sidecar_started_mid_stream_compares_only_what_it_watched(path):
    worker = Worker(path)
    worker.processed = 5000  # ran all day before the sidecar started
    worker.send("task-started", T0, uuid="already-running")  # ... it knows this worker sends task events
    worker.heartbeat(T0 + 1)
    for second in range(2, 12):
        worker.run(T0 + second)
        worker.heartbeat(T0 + second + 0.5)
    tick(path, T0 + 40)
    assert (stream(path).expected, stream(path).missed) == (10, 0)


def test_lost_heartbeats_only_make_the_period_longer(path):
    worker = Worker(path)
    worker.online(T0)
    for second in range(1, 31):
        worker.run(T0 + second, started_seen=second != 15)
        if second in (2, 28):  # every heartbeat in between lost
            worker.heartbeat(T0 + second + 0.5)
    worker.heartbeat(T0 + 31)
    tick(path, T0 + 60)
    assert (stream(path).expected, stream(path).missed) == (30, 1)


def test_a_retried_task_is_started_twice_and_counted_twice(path):
    worker = Worker(path)
    worker.online(T0)
    worker.run(T0 + 1, uuid="flaky", end_seen=False)
    worker.send("task-retried", T0 + 1.5, uuid="flaky", exception="Boom()")
    worker.run(T0 + 3, uuid="flaky")
    worker.heartbeat(T0 + 4)
    worker.heartbeat(T0 + 6)
    tick(path, T0 + 30)
    assert (stream(path).expected, stream(path).missed) == (2, 0)


def test_a_heartbeat_that_carries_no_count_is_no_evidence(path):
    """The sidecar's own heartbeat request is answered without ``processed``."""
    worker = Worker(path)
    worker.processed = 40
    worker.send("task-started", T0, uuid="x")
    worker.send("worker-heartbeat", T0 + 1, pid=worker.pid)
    worker.heartbeat(T0 + 2)
    worker.heartbeat(T0 + 4)
    tick(path, T0 + 20)
    assert (stream(path).expected, stream(path).missed) == (0, 0)


def test_a_worker_without_task_events_is_advice_not_a_lossy_stream(path):
    worker = Worker(path)
    worker.online(T0)
    for second in range(1, 21):
        worker.processed += 1  # runs tasks, sends no task event at all (no -E)
        worker.heartbeat(T0 + second)
    tick(path, T0 + 40)
    assert stream(path).missed == 0


def test_the_window_share_and_the_alert_text_name_the_likely_cause(path):
    path.config.current = path.config.current.model_copy(deep=True)
    worker = Worker(path)
    worker.online(T0)
    tick(path, T0 + 0.5)
    for second in range(1, 101):
        worker.run(T0 + second, started_seen=second % 20 != 0)
        if second % 2 == 0:
            worker.heartbeat(T0 + second + 0.5)
            tick(path, T0 + second + 0.6)
    path.pipeline.set_connected(False, "ConnectionError: Connection closed by server.")
    path.pipeline.set_connected(True)
    tick(path, T0 + 120)
    view = stream(path)
    assert view.window_missed == 5 and view.window_expected >= 95
    assert view.window_share == pytest.approx(5 / view.window_expected)
    families = path.families()
    assert families["celery_sidecar_task_events_missed_ratio"].samples[0].value == pytest.approx(view.window_share)
    from celery_sidecar.monitor.signals import BY_RULE

    readings = list(BY_RULE["events_missed"].read(path.view.snapshot(), path.config.current))
    assert len(readings) == 1 and readings[0].value > readings[0].limit
    assert "reconnected 1 time" in readings[0].text and "Connection closed by server" in readings[0].text


# -- running records held against the workers' word ------------------------------------------


def test_a_task_its_worker_no_longer_runs_is_closed_without_a_page_and_counted(path):
    runtime_limit(path, 60.0)
    worker = Worker(path)
    worker.online(T0)
    uuid = worker.run(T0 + 1, end_seen=False)  # it finished; its task-succeeded event was lost
    beating(worker, T0 + 2, T0 + 8, active=1)
    beating(worker, T0 + 10, T0 + 54)  # heartbeats now say it runs nothing
    # The heartbeat's active (0) is below the records held on it: the fold asks that worker.
    assert path.pipeline.take_verifications() == [HOST]
    path.pipeline.record_held({HOST: set()}, T0 + 56)
    beating(worker, T0 + 56, T0 + 57)
    assert uuid in path.state.tasks  # not closed at once: its end event may be in flight
    beating(worker, T0 + 58, T0 + 60)
    snap = path.view.snapshot()
    assert uuid not in path.state.tasks and not snap.stuck
    assert snap.end_unseen == {("app.job", "unknown"): 1}
    assert snap.stream.end_unseen == 1 and snap.stream.by_worker[HOST][1] == 1
    assert uuid in snap.closed_unseen


def test_a_task_past_its_limit_is_stuck_only_once_its_worker_confirms_it(path):
    runtime_limit(path, 30.0)
    worker = Worker(path)
    worker.online(T0)
    slow = worker.run(T0 + 1, end_seen=False)
    beating(worker, T0 + 2, T0 + 24, active=1)
    assert path.pipeline.take_verifications() == []
    beating(worker, T0 + 26, T0 + 26, active=1)  # 5 s before its limit: its worker is asked
    assert path.pipeline.take_verifications() == [HOST]
    beating(worker, T0 + 28, T0 + 40, active=1)
    assert path.view.snapshot().stuck == ()  # past the limit, not confirmed: no page yet
    path.pipeline.record_held({HOST: {slow}}, T0 + 40)
    stuck = path.view.snapshot().stuck
    assert [s.uuid for s in stuck] == [slow] and "still running it" in stuck[0].confirmed
    assert path.families()["celery_task_stuck"].samples[0].value == 1


def test_a_task_too_fresh_for_the_answer_gets_its_worker_asked_again_soon(path):
    """A 3 s limit is within PRECHECK at once: the first question can come before the worker
    lists the task. Its worker is asked again seconds later, not ASK_EVERY later."""
    runtime_limit(path, 3.0)
    worker = Worker(path)
    worker.online(T0)
    slow = worker.run(T0 + 1, end_seen=False)
    tick(path, T0 + 1.2)
    assert path.pipeline.take_verifications() == [HOST]
    path.pipeline.record_held({HOST: set()}, T0 + 1.3)  # asked before the worker listed it
    tick(path, T0 + 2.5)
    assert path.pipeline.take_verifications() == []  # not at once
    tick(path, T0 + 3.4)
    assert path.pipeline.take_verifications() == [HOST]  # ASK_AGAIN later, well before ASK_EVERY
    path.pipeline.record_held({HOST: {slow}}, T0 + 3.4)
    tick(path, T0 + 4.5)
    stuck = path.view.snapshot().stuck
    assert [s.uuid for s in stuck] == [slow] and "still running it" in stuck[0].confirmed


def test_a_worker_that_does_not_answer_cannot_hide_a_stuck_task(path):
    runtime_limit(path, 30.0)
    worker = Worker(path)
    worker.online(T0)
    slow = worker.run(T0 + 1, end_seen=False)
    beating(worker, T0 + 2, T0 + 28, active=1)
    assert path.pipeline.take_verifications() == [HOST]
    path.pipeline.record_held({HOST: None}, T0 + 28)  # a wedged worker answers nothing
    beating(worker, T0 + 29, T0 + 32, active=1)
    stuck = path.view.snapshot().stuck
    assert [s.uuid for s in stuck] == [slow] and "did not answer" in stuck[0].confirmed


def test_a_retry_is_not_a_redelivery_even_when_its_task_sent_comes_first(path):
    """A retry is sent again (task-sent with the new retries) before a worker receives it."""
    uuid = "flaky"
    task = {"uuid": uuid, "name": "app.flaky", "local_received": T0}
    for retries in (0, 1, 2):
        at = T0 + 10 * retries
        path.at(at).handle(
            {**task, "type": "task-sent", "hostname": "p@x", "queue": "celery", "retries": retries, "timestamp": at},
            {**task, "type": "task-received", "hostname": HOST, "retries": retries, "timestamp": at + 1},
            {**task, "type": "task-started", "hostname": HOST, "timestamp": at + 2},
            {**task, "type": "task-retried", "hostname": HOST, "exception": "Retry()", "timestamp": at + 3},
        )
    assert path.view.snapshot().redelivered == {}
    # The same receipt again, with no new retry, is a redelivery.
    path.handle({**task, "type": "task-received", "hostname": HOST, "retries": 2, "timestamp": T0 + 25})
    assert sum(path.view.snapshot().redelivered.values()) == 1


def test_an_event_after_a_tasks_final_one_is_counted_under_that_task(path):
    task = {"uuid": "r1", "local_received": T0}
    path.handle(
        {**task, "type": "task-sent", "name": "app.refuse", "queue": "orders", "hostname": "p@x", "timestamp": T0},
        {**task, "type": "task-received", "name": "app.refuse", "hostname": HOST, "timestamp": T0},
        {**task, "type": "task-started", "hostname": HOST, "timestamp": T0},
        {**task, "type": "task-failed", "hostname": HOST, "exception": "Reject('refused')", "timestamp": T0 + 1},
        {**task, "type": "task-rejected", "hostname": HOST, "timestamp": T0 + 1},
    )
    assert path.metrics.counts["rejected"] == {("app.refuse", HOST, "orders"): 1}


def test_a_worker_evicted_by_the_worker_cap_is_forgotten_like_one_gone_for_good():
    path = DataPath.build({"state": {"max_workers": 2}}, now=T0)
    for n in range(3):  # the third evicts the oldest dead one, or the oldest
        Worker(path, host=f"w{n}@x").online(T0 + n)
    path.pipeline.set_connected(True)
    forgotten = []

    class Listener:
        update_kinds = frozenset()

        def on_tick(self, now, offline, gone):
            forgotten.extend(gone)

    from celery_sidecar.monitor.fold.pipeline import Sink

    path.pipeline.add_sink(type("L", (Listener, Sink), {})())
    path.pipeline.tick(T0 + 3)
    assert forgotten == ["w0@x"]

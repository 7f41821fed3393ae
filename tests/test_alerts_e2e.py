"""Slack alerts end to end: real workers fail, die and back up; the real sidecar tells Slack.

Every test runs a private redis-server, real Celery workers, the `celery-sidecar run`
subprocess and the fake Slack of tests/support/fake_slack.py, which the sidecar's real
slack-sdk client posts to. Assertions are about what reached Slack. The dispatcher's own
behaviour, one call at a time, is covered by tests/test_slack_delivery.py.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_sidecar.alerts.delivery.blocks import MAX_SECTION_TEXT
from tests.support.clients import producer
from tests.support.configs import write_config
from tests.support.fake_slack import FakeSlack, Request
from tests.support.paths import ARTIFACTS, SIDECAR, SUITE, child_env
from tests.support.servers import wait_for

# Every test here runs the sidecar: as a process, or its CLI.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

ALERT_APP = "tests.support.alert_apps"
HEARTBEAT_FREQ = 2.0  # Celery's default worker heartbeat
HEARTBEAT_GRACE = 2.0  # state.heartbeat_grace_seconds default
TICK = 1.0  # the sidecar evaluates time-based alerts about once a second


# -- the pieces of a story --------------------------------------------------------------------


def slack_env(slack: FakeSlack) -> dict[str, str]:
    return {"SLACK_WEBHOOK_URL": slack.webhook_url}


def eventually(predicate: Callable[[], bool], timeout: float) -> bool:
    try:
        wait_for(predicate, timeout=timeout, interval=0.1)
    except TimeoutError:
        return False
    return True




class FailureClock:
    """Listens to the event stream like any monitor, and notes when each task-failed was sent."""

    def __init__(self, broker_url: str) -> None:
        self._app = Celery("failure-clock", broker=broker_url, set_as_current=False)
        self.failed_at: dict[str, float] = {}  # task id -> the worker's event timestamp (time.time())
        self.listening = threading.Event()
        self._receiver = None
        self._thread = threading.Thread(target=self._run, name="failure-clock", daemon=True)

    def __enter__(self) -> FailureClock:
        self._thread.start()
        # Any event (heartbeats come every 2 s) proves the subscription is live.
        assert self.listening.wait(15), "the event receiver saw no events"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(5)

    def _run(self) -> None:
        with self._app.connection_for_read() as conn:
            self._receiver = self._app.events.Receiver(conn, handlers={"*": self._on_event})
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.listening.set()
        if event["type"] == "task-failed":
            self.failed_at[event["uuid"]] = float(event["timestamp"])


# -- a failed task ----------------------------------------------------------------------------


def test_a_failed_task_gives_one_slack_message_with_what_on_call_needs(redis_srv, slack, sidecar, worker,
                                                                       tmp_path):
    config = write_config(tmp_path / "sidecar.yml", {"flower_url": "https://flower.example.com/"})
    side = sidecar(redis_srv.url, config=config, env=slack_env(slack))
    worker(redis_srv.url, name="payments", app=ALERT_APP)
    host = side.wait_worker_up("payments")

    result = producer(redis_srv.url).send_task(
        "alerting.charge_card", args=["order-1001"], kwargs={"card_token": "secret-kwarg-42"}
    )

    [message] = slack.wait_messages("Task failed: alerting.charge_card", side=side)
    side.settled()
    assert len(slack.accepted()) == 1, slack.headlines()
    text = message.body["text"]
    assert message.headline == "[WARNING] Task failed: alerting.charge_card"
    assert f"Task ID: {result.id}" in text
    assert "Exception: PaymentDeclined" in text
    assert "card declined for order order-1001" in text
    assert f"Worker: {host}" in text
    assert "Queue: celery" in text
    assert "Retries: 0" in text
    assert text.count("Traceback (most recent call last):") == 1
    # The blocks carry the first lines of the traceback, down to the frame that raised.
    code = [b["text"]["text"] for b in message.body["blocks"] if b["type"] == "section"
            and "text" in b and b["text"]["text"].startswith("```")]
    assert len(code) == 1 and "in charge_card" in code[0] and "PaymentDeclined: card declined" in code[0]
    flower = f"https://flower.example.com/task/{result.id}"
    assert flower in text
    assert any(e.get("url") == flower for b in message.body["blocks"] for e in b.get("elements", []))
    # Arguments may hold secrets or personal data: left out unless the operator opts in.
    for request in slack.requests:
        assert "secret-kwarg-42" not in json.dumps(request.body)
        assert "card_token" not in json.dumps(request.body)
    assert "Args:" not in text and "Kwargs:" not in text
    assert side.metrics().get("celery_sidecar_alerts_sent_total", channel="webhook") == 1


def test_with_include_args_the_message_shows_args_and_kwargs(redis_srv, slack, sidecar, worker, tmp_path):
    config = write_config(tmp_path / "sidecar.yml", {"include_args": True})
    side = sidecar(redis_srv.url, config=config, env=slack_env(slack))
    worker(redis_srv.url, name="payments", app=ALERT_APP)
    side.wait_worker_up("payments")

    result = producer(redis_srv.url).send_task(
        "alerting.charge_card", args=["order-7"], kwargs={"card_token": "secret-kwarg-42"}
    )

    [message] = slack.wait_messages("Task failed: alerting.charge_card", side=side)
    side.settled()
    assert result.id in message.body["text"]
    assert re.search(r"^  Args: .*'order-7'", message.body["text"], re.M), message.body["text"]
    assert "Kwargs: {'card_token': 'secret-kwarg-42'}" in message.body["text"]
    assert len(slack.accepted()) == 1


def test_a_task_that_fails_after_two_retries_reports_two_retries(redis_srv, slack, sidecar, worker):
    side = sidecar(redis_srv.url, env=slack_env(slack))
    worker(redis_srv.url, name="payments", app=ALERT_APP)
    side.wait_worker_up("payments")

    result = producer(redis_srv.url).send_task("alerting.charge_card_with_retries", args=["order-8"])

    [message] = slack.wait_messages("Task failed: alerting.charge_card_with_retries", side=side)
    side.settled()
    assert result.id in message.body["text"]
    # max_retries=2: the task ran three times and was retried twice.
    assert "Retries: 2" in message.body["text"], message.body["text"]
    assert len(slack.accepted()) == 1


RAISING_LINE = 'raise KeyError("customer_id")'
EXCEPTION_LINE = "KeyError: 'customer_id'"
LOG_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def log_record(log: str, words: str) -> str:
    """The whole (multi-line) record of the sidecar's log whose first line holds ``words``."""
    lines = log.splitlines()
    start = next((i for i, line in enumerate(lines) if words in line), None)
    assert start is not None, f"no log record with {words!r}:\n{log[-4000:]}"
    end = next((i for i in range(start + 1, len(lines)) if LOG_RECORD_START.match(lines[i])), len(lines))
    return "\n".join(lines[start:end])


def test_a_deep_traceback_keeps_where_it_failed_in_slack_and_in_the_console(redis_srv, slack, sidecar, worker):
    worker(redis_srv.url, name="billing", app=ALERT_APP)
    app = producer(redis_srv.url)

    # Slack: the code block of the message.
    side = sidecar(redis_srv.url, env=slack_env(slack))
    side.wait_worker_up("billing")
    app.send_task("alerting.load_invoice", args=["inv-1"])
    [message] = slack.wait_messages("Task failed: alerting.load_invoice", side=side)
    [code] = [b["text"]["text"] for b in message.body["blocks"]
              if b["type"] == "section" and b.get("text", {}).get("text", "").startswith("```")]
    last = code.removesuffix("```").rstrip().splitlines()
    assert last[-1] == EXCEPTION_LINE and RAISING_LINE in last[-2], code
    assert code.count('File "') >= 10, f"not the deep traceback this test is about:\n{code}"
    assert code.startswith("```Traceback (most recent call last):"), "room for the start too"
    assert len(code) <= MAX_SECTION_TEXT - 200
    assert side.stop() == 0

    # The console: the log record of the alert.
    console = sidecar(redis_srv.url)
    console.wait_worker_up("billing")
    app.send_task("alerting.load_invoice", args=["inv-2"])
    console.wait_log("Task failed: alerting.load_invoice", timeout=20)
    record = log_record(console.log(), "alerts.console: [WARNING] Task failed: alerting.load_invoice")
    assert RAISING_LINE in record and record.rstrip().endswith(EXCEPTION_LINE), record
    assert "Traceback (most recent call last):" in record
    assert re.search(r"^… \d+ lines cut …$", record, re.M), record


# -- latency ----------------------------------------------------------------------------------


def test_alert_latency_from_task_failure_to_slack_is_measured_over_many_failures(redis_srv, slack, sidecar,
                                                                                  worker, tmp_path):
    failures = 60
    # One message per failure: no storm folding, and no pacing slower than the failures come.
    config = write_config(tmp_path / "sidecar.yml", {"storm_window_seconds": 0, "rate_limit_per_second": 50})
    side = sidecar(redis_srv.url, config=config, env=slack_env(slack))
    worker(redis_srv.url, name="payments", app=ALERT_APP)
    side.wait_worker_up("payments")
    app = producer(redis_srv.url)

    with FailureClock(redis_srv.url) as clock:
        ids = []
        for i in range(failures):  # about 10 failures a second, as a bad deploy would produce
            ids.append(app.send_task("alerting.charge_card", args=[f"order-{i}"]).id)
            time.sleep(0.1)
        wait_for(lambda: len(slack.mentioning("Task failed")) >= failures, timeout=30,
                 what=f"{failures} failure messages")
        side.settled()
        wait_for(lambda: all(i in clock.failed_at for i in ids), timeout=5, what="every task-failed event")

    wall_minus_monotonic = time.time() - time.monotonic()
    latencies = []
    for task_id in ids:
        [request] = slack.mentioning(task_id)  # exactly one message per failure
        latencies.append(request.at + wall_minus_monotonic - clock.failed_at[task_id])
    assert len(slack.accepted()) == failures
    p50, p99 = statistics.median(latencies), _percentile(latencies, 0.99)
    report = (f"alert latency, task-failed event -> fake Slack received, {failures} failures at ~10/s: "
              f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms\n")
    print("\n" + report)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "alert_latency.txt").write_text(report)
    # A generous bound (the read batching alone adds up to 100 ms); the benchmark keeps the figure.
    assert p99 < 1.0, report


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- a failure storm --------------------------------------------------------------------------


def summaries(slack: FakeSlack, window: int) -> list[int]:
    """The "+N more of ..." counts of the storm summaries that reached Slack."""
    pattern = re.compile(rf"\+(\d+) more of alerting\.charge_card: PaymentDeclined in the last {window} s")
    return [int(m[1]) for r in slack.accepted() if (m := pattern.search(r.headline))]


def storm_openers(slack: FakeSlack) -> list[Request]:
    return [r for r in slack.messages("Task failed: alerting.charge_card")
            if "Exception: PaymentDeclined" in r.body["text"]]


def test_a_storm_of_500_failures_gives_one_message_and_summaries_with_exact_counts(redis_srv, slack, sidecar,
                                                                                  worker, tmp_path):
    # 500 failures within a minute. A 10 s storm window (instead of 60 s) keeps the test short
    # and makes the storm outlast one window, so the summary has to come round again.
    config = write_config(tmp_path / "sidecar.yml", {"storm_window_seconds": 10, "rate_limit_per_second": 20})
    side = sidecar(redis_srv.url, config=config, env=slack_env(slack))
    worker(redis_srv.url, name="payments", app=ALERT_APP)
    side.wait_worker_up("payments")
    app = producer(redis_srv.url)
    other = app.send_task("alerting.charge_card", args=["order-x"], kwargs={"error": "GatewayTimeout"})

    for batch in range(20):  # 500 failures over ~12 s
        for i in range(25):
            app.send_task("alerting.charge_card", args=[f"order-{batch}-{i}"])
        time.sleep(0.6)
    side.wait_metric("celery_task_failed_total", lambda v: v == 501, timeout=30, name="alerting.charge_card")

    # The last window closes storm_window + 1 s for late events + a tick after it opened.
    eventually(lambda: sum(summaries(slack, 10)) >= 499, timeout=20)
    side.settled()
    counts, openers = summaries(slack, 10), storm_openers(slack)
    assert len(openers) == 1, f"{len(openers)} individual messages for one storm; summaries {counts}"
    assert sum(counts) == 499, f"summaries {counts} do not add up to 499"
    # A different exception of the same task is its own alert, not part of the storm.
    assert len(slack.mentioning(other.id)) == 1
    assert len(slack.accepted()) == 2 + len(counts)


def test_a_storm_that_pauses_and_resumes_reports_every_window(redis_srv, slack, sidecar, worker, tmp_path):
    config = write_config(tmp_path / "sidecar.yml", {"storm_window_seconds": 8, "rate_limit_per_second": 20})
    side = sidecar(redis_srv.url, config=config, env=slack_env(slack))
    worker(redis_srv.url, name="payments", app=ALERT_APP)
    side.wait_worker_up("payments")
    app = producer(redis_srv.url)

    for i in range(100):
        app.send_task("alerting.charge_card", args=[f"order-a{i}"])
    eventually(lambda: summaries(slack, 8) == [99], timeout=20)
    assert summaries(slack, 8) == [99], slack.headlines()
    # The first window is summarized; the storm goes on in the next one.
    for i in range(100):
        app.send_task("alerting.charge_card", args=[f"order-b{i}"])
    side.wait_metric("celery_task_failed_total", lambda v: v == 200, name="alerting.charge_card")

    eventually(lambda: sum(summaries(slack, 8)) >= 199, timeout=15)
    side.settled()
    assert summaries(slack, 8) == [99, 100], slack.headlines()
    assert len(storm_openers(slack)) == 1


# -- workers ----------------------------------------------------------------------------------


def test_a_killed_worker_pages_offline_then_back_online_and_a_graceful_stop_is_no_page(redis_srv, slack, sidecar,
                                                                                       worker, tmp_path):
    config = write_config(tmp_path / "sidecar.yml", {"rate_limit_per_second": 10})
    side = sidecar(redis_srv.url, config=config, env=slack_env(slack))
    doomed = worker(redis_srv.url, name="doomed", app=ALERT_APP, concurrency=1)
    host = side.wait_worker_up("doomed")

    killed_at = time.monotonic()
    doomed.kill()  # SIGKILL to the whole process group: no worker-offline event
    [offline] = slack.wait_messages(f"Worker offline: {host}", timeout=15, side=side)
    took = offline.at - killed_at
    deadline = 2 * HEARTBEAT_FREQ + HEARTBEAT_GRACE + TICK + 1.0  # + 1 s for delivery
    assert took <= deadline, f"'worker offline' after {took:.1f} s (allowed {deadline:.0f} s)"
    assert offline.headline.startswith("[CRITICAL]")

    back = worker(redis_srv.url, name="doomed", app=ALERT_APP, concurrency=1)
    [online] = slack.wait_messages(f"Worker back online: {host}", timeout=20, side=side)
    assert online.headline.startswith("[CRITICAL] RESOLVED:")

    back.stop()  # SIGTERM: a warm shutdown sends worker-offline
    wait_for(lambda: side.health()[1]["workers"].get(host) == "down", timeout=15, what=f"{host} down")
    # A graceful shutdown is not a page: no "offline" follows once heartbeats stop, and within
    # the shutdown grace window (60 s by default) nothing at all.
    side.decided(time.time() + 2 * HEARTBEAT_FREQ + HEARTBEAT_GRACE + TICK)
    assert [r.headline.split("] ", 1)[1] for r in slack.accepted()] == [
        f"Worker offline: {host}", f"RESOLVED: Worker back online: {host}",
    ]


def test_a_worker_restarted_with_sigterm_posts_nothing(redis_srv, slack, sidecar, worker, tmp_path):
    grace = 10  # shorter than the default 60 s, so that the test can outwait it
    config = write_config(tmp_path / "sidecar.yml", {"rules": {"worker_shutdown": {"for_seconds": grace}}})
    side = sidecar(redis_srv.url, config=config, env=slack_env(slack))
    api = worker(redis_srv.url, name="api", app=ALERT_APP, concurrency=1)
    host = side.wait_worker_up("api")

    stopped_at = time.time()
    api.stop()  # SIGTERM: a warm shutdown, worker-offline sent
    wait_for(lambda: side.health()[1]["workers"].get(host) == "down", timeout=15, what=f"{host} down")
    worker(redis_srv.url, name="api", app=ALERT_APP, concurrency=1)
    side.wait_worker_up("api")

    # Past the grace window counted from the shutdown: the return cancelled its message for good.
    side.decided(stopped_at + grace + 2 * TICK)
    assert slack.requests == [], [r.headline for r in slack.requests]
    assert "back" in side.log() and "after a graceful shutdown" in side.log()


def test_a_worker_that_shuts_down_and_stays_away_is_one_message_resolved_when_back(redis_srv, slack, sidecar,
                                                                                  worker, tmp_path):
    grace = 2
    config = write_config(tmp_path / "sidecar.yml", {"rate_limit_per_second": 10,
                                                     "rules": {"worker_shutdown": {"for_seconds": grace}}})
    side = sidecar(redis_srv.url, config=config, env=slack_env(slack))
    api = worker(redis_srv.url, name="api", app=ALERT_APP, concurrency=1)
    host = side.wait_worker_up("api")

    stopping = time.monotonic()
    api.stop()
    [away] = slack.wait_messages(f"Worker shut down: {host}", timeout=15, side=side)
    assert away.at - stopping >= grace, "posted before the grace window was over"
    assert away.headline.startswith("[INFO]")
    assert "shut down gracefully" in away.body["text"]

    worker(redis_srv.url, name="api", app=ALERT_APP, concurrency=1)
    [back] = slack.wait_messages(f"Worker back online: {host}", timeout=20, side=side)
    assert back.headline.startswith("[INFO] RESOLVED:")
    side.settled()
    assert [r.headline.split("] ", 1)[1] for r in slack.accepted()] == [
        f"Worker shut down: {host}", f"RESOLVED: Worker back online: {host}",
    ]


# -- thresholds -------------------------------------------------------------------------------


def test_a_queue_filled_past_100_warns_and_resolves_once_drained(redis_srv, slack, sidecar, worker, tmp_path):
    config = write_config(
        tmp_path / "sidecar.yml",
        {"rate_limit_per_second": 10,
         "rules": {"queue_length_normal": {"for_seconds": 1, "resolve_after_seconds": 2}}},
        queues=["celery", "backlog"],
    )
    side = sidecar(redis_srv.url, config=config, env=slack_env(slack))
    app = producer(redis_srv.url)

    for _ in range(150):  # nothing consumes 'backlog' yet
        app.send_task("demo.ok", queue="backlog")

    [warning] = slack.wait_messages("Queue length above normal threshold: backlog", side=side)
    assert warning.headline.startswith("[WARNING]")
    assert "queue backlog holds 150 messages; threshold 100" in warning.body["text"]
    assert "Value: 150" in warning.body["text"] and "Threshold: 100" in warning.body["text"]

    worker(redis_srv.url, name="drainer", queues="backlog")
    [resolved] = slack.wait_messages("Resolved: queue length above normal threshold: backlog", timeout=30,
                               side=side)
    assert resolved.at > warning.at
    assert "backlog is back under 100" in resolved.body["text"]
    side.settled()
    # No flapping, and the peak threshold (1000) was never crossed.
    assert len(slack.mentioning("backlog")) == 2, [r.headline for r in slack.mentioning("backlog")]


def test_a_task_that_keeps_retrying_crosses_the_retry_rate_threshold(redis_srv, slack, sidecar, worker, tmp_path):
    config = write_config(
        tmp_path / "sidecar.yml",
        {"rate_limit_per_second": 10, "rules": {"retry_rate": {"for_seconds": 1, "resolve_after_seconds": 5}}},
    )
    side = sidecar(redis_srv.url, config=config, env=slack_env(slack))
    worker(redis_srv.url, name="flaky")
    side.wait_worker_up("flaky")
    app = producer(redis_srv.url)

    for _ in range(4):  # each retries 3 times, then fails: 12 retries in 16 outcomes
        app.send_task("demo.flaky", kwargs={"p_fail": 1.0})

    [alert] = slack.wait_messages("Retry rate above threshold: demo.flaky", timeout=30, side=side)
    assert alert.headline.startswith("[WARNING]")
    assert "Threshold: 5.0%" in alert.body["text"]
    assert re.search(r"demo\.flaky retried \d+ of \d+ times \((\d+)%\)", alert.body["text"])
    side.wait_metric("celery_task_failed_total", lambda v: v == 4, name="demo.flaky")
    side.settled()
    assert len(slack.messages("Retry rate above threshold")) == 1


# -- Slack trouble ----------------------------------------------------------------------------


def test_slack_rate_limits_three_times_and_the_failure_still_arrives_once(redis_srv, slack, sidecar, worker,
                                                                          tmp_path):
    side = sidecar(redis_srv.url, env=slack_env(slack))
    worker(redis_srv.url, name="payments", app=ALERT_APP)
    side.wait_worker_up("payments")
    slack.rate_limit(3, retry_after=1)

    result = producer(redis_srv.url).send_task("alerting.charge_card", args=["order-429"])

    [message] = slack.wait_messages("Task failed: alerting.charge_card", timeout=20, side=side)
    side.settled()
    assert result.id in message.body["text"]
    assert [r.status for r in slack.requests] == [429, 429, 429, 200]
    gaps = [b.at - a.at for a, b in zip(slack.requests, slack.requests[1:], strict=False)]
    assert all(gap >= 0.95 for gap in gaps), f"sent again before Retry-After: gaps {gaps}"
    assert len(slack.accepted()) == 1
    metrics = side.metrics()
    assert metrics.get("celery_sidecar_alerts_failed_total", reason="rate_limited") == 3
    assert metrics.get("celery_sidecar_alerts_sent_total", channel="webhook") == 1


def test_slack_down_for_30s_with_a_sidecar_restart_loses_no_alert(redis_srv, slack, sidecar, worker, tmp_path):
    config = write_config(tmp_path / "sidecar.yml", {"storm_window_seconds": 0, "rate_limit_per_second": 20})
    args = ("--instance-id", "sidecar-1")
    first = sidecar(redis_srv.url, *args, config=config, env=slack_env(slack))
    worker(redis_srv.url, name="payments", app=ALERT_APP)
    first.wait_worker_up("payments")
    app = producer(redis_srv.url)

    slack.down()
    outage_began = time.monotonic()
    ids = [app.send_task("alerting.charge_card", args=[f"order-a{i}"]).id for i in range(3)]
    first.wait_metric("celery_sidecar_alerts_pending", lambda v: v == 3)
    first.wait_metric("celery_sidecar_alerts_failed_total", lambda v: v >= 3, reason="connection")
    assert first.stop() == 0, first.log()[-3000:]

    second = sidecar(redis_srv.url, *args, config=config, env=slack_env(slack))
    second.wait_worker_up("payments")
    ids += [app.send_task("alerting.charge_card", args=[f"order-b{i}"]).id for i in range(2)]
    second.wait_metric("celery_sidecar_alerts_pending", lambda v: v == 5)  # 3 from the outbox, 2 new
    time.sleep(max(0.0, 30 - (time.monotonic() - outage_began)))  # the rest of the outage
    slack.up()

    # Retries back off up to 16 s by the end of a 30 s outage.
    wait_for(lambda: all(slack.mentioning(i) for i in ids), timeout=45, what="every alert after the outage")
    second.settled()
    assert {i: len(slack.mentioning(i)) for i in ids} == dict.fromkeys(ids, 1)
    assert len(slack.accepted()) == 5


def test_two_sidecars_on_one_broker_post_every_alert_once(redis_srv, slack, sidecar, worker, tmp_path):
    # A shutdown is posted once its worker stayed away for_seconds: both sidecars decide it.
    config = write_config(tmp_path / "sidecar.yml", {"storm_window_seconds": 0, "rate_limit_per_second": 50,
                                                     "rules": {"worker_shutdown": {"for_seconds": 1}}})
    sides = [sidecar(redis_srv.url, "--instance-id", name, config=config, env=slack_env(slack))
             for name in ("sidecar-a", "sidecar-b")]
    payments = worker(redis_srv.url, name="payments", app=ALERT_APP)
    [host] = {side.wait_worker_up("payments") for side in sides}
    app = producer(redis_srv.url)

    ids = [app.send_task("alerting.charge_card", args=[f"order-{i}"]).id for i in range(20)]
    for side in sides:  # both saw every failure, so both raised every alert
        side.wait_metric("celery_task_failed_total", lambda v: v == 20, name="alerting.charge_card")
    payments.stop()
    slack.wait_messages(f"Worker shut down: {host}", side=sides[0])
    wait_for(lambda: all(slack.mentioning(i) for i in ids), timeout=20, what="every failure in Slack")
    for side in sides:
        side.settled()

    assert {i: len(slack.mentioning(i)) for i in ids} == dict.fromkeys(ids, 1)
    assert len(slack.messages("Worker shut down")) == 1
    assert len(slack.accepted()) == 21
    sent = [side.metrics().sum("celery_sidecar_alerts_sent_total") for side in sides]
    assert sum(sent) == 21, f"sent per sidecar: {sent}"


# -- config -----------------------------------------------------------------------------------


def test_a_threshold_edited_in_the_file_changes_alerting_without_a_restart(redis_srv, slack, sidecar, tmp_path):
    alerts = {"rate_limit_per_second": 10,
              "rules": {"queue_length_normal": {"for_seconds": 1, "resolve_after_seconds": 2}}}
    path = tmp_path / "sidecar.yml"
    config = write_config(path, alerts, queues=["backlog"],
                          thresholds={"queue_length": {"normal": 200, "peak": 1000}})
    side = sidecar(redis_srv.url, config=config, env=slack_env(slack))
    app = producer(redis_srv.url)
    for _ in range(150):
        app.send_task("demo.ok", queue="backlog")
    side.wait_metric("celery_queue_length", lambda v: v == 150, queue_name="backlog")

    # 150 is under 200: for longer than the rule's for_seconds, nothing is sent.
    side.decided(time.time() + 1 + 2 * TICK)
    assert slack.requests == [], slack.headlines()

    write_config(path, alerts, queues=["backlog"], thresholds={"queue_length": {"normal": 100, "peak": 1000}})
    side.wait_metric("celery_threshold", lambda v: v == 100, signal="queue_length", level="normal",
                     queue_name="backlog")
    [warning] = slack.wait_messages("Queue length above normal threshold: backlog", side=side)
    assert "queue backlog holds 150 messages; threshold 100" in warning.body["text"]
    assert side.proc.poll() is None  # the same process: no restart
    assert side.health()[1]["config"]["valid"] is True


def config_check(path: Path, webhook_url: str | None = None) -> subprocess.CompletedProcess:
    env = child_env(**({"SLACK_WEBHOOK_URL": webhook_url} if webhook_url is not None else {}))
    return subprocess.run([sys.executable, *SIDECAR, "config", "check", str(path)], env=env, cwd=SUITE,
                          capture_output=True, text=True, timeout=60)


def test_config_check_names_a_broken_template(tmp_path):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "task_failed.json.j2").write_text('[{"type": "header", {% if alert.title %}]\n')
    config = write_config(tmp_path / "sidecar.yml", {"templates_dir": str(templates)})

    result = config_check(config)

    assert result.returncode != 0
    assert "task_failed.json.j2" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("url", "expect"),
    [
        ("ftp://x", "must be a full URL"),
        ("ftp://hooks.slack.com/services/T000/B000/s3cr3t-webhook-path", "must use https"),
        ("http://hooks.example.com/services/T000/B000/s3cr3t-webhook-path", "only allowed to a loopback host"),
        ("https://[::1/services/T000/B000/s3cr3t-webhook-path", "is not a valid URL"),
    ],
)
def test_config_check_refuses_a_bad_webhook_url_without_echoing_it(tmp_path, url, expect):
    config = write_config(tmp_path / "sidecar.yml")

    result = config_check(config, webhook_url=url)

    assert result.returncode != 0
    assert expect in result.stderr, result.stderr
    assert "SLACK_WEBHOOK_URL" in result.stderr
    assert "s3cr3t-webhook-path" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_accepts_a_good_file_and_webhook(tmp_path, slack):
    config = write_config(tmp_path / "sidecar.yml", {"flower_url": "https://flower.example.com"})
    result = config_check(config, webhook_url=slack.webhook_url)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert slack.requests == []  # checking does not post anything


def test_worker_cpu_memory_and_latency_thresholds_fire_and_resolve_when_raised_live(redis_srv, slack, sidecar,
                                                                                     worker, tmp_path):
    """The worker plugin's real CPU/memory readings and real queue waits cross thresholds set
    below them; raising the thresholds in the file resolves every alert without a restart."""
    rules = {name: {"for_seconds": 1, "resolve_after_seconds": 1} for name in ("worker_cpu", "worker_memory",
                                                                               "latency")}
    low = {"worker_cpu_percent": 0.0001, "worker_memory_percent": 0.0001, "latency_seconds": {"normal": 0.0001}}
    config = write_config(tmp_path / "sidecar.yml", {"rate_limit_per_second": 20, "rules": rules}, thresholds=low)
    side = sidecar(redis_srv.url, config=config, env=slack_env(slack))
    worker(redis_srv.url, name="busy", env={"DEMO_RESOURCE_INTERVAL": "1"})
    host = side.wait_worker_up("busy")
    app = producer(redis_srv.url)
    for _ in range(20):
        app.send_task("demo.ok")

    [cpu] = slack.wait_messages(f"Worker CPU above threshold: {host}", timeout=30, side=side)
    [mem] = slack.wait_messages(f"Worker memory above threshold: {host}", timeout=30, side=side)
    [latency] = slack.wait_messages("Task latency above threshold: normal", timeout=30, side=side)
    assert "Threshold: 0%" in cpu.body["text"] and "% CPU" in cpu.body["text"]
    assert "% memory" in mem.body["text"]
    assert "p95 queue wait of normal tasks" in latency.body["text"]

    write_config(tmp_path / "sidecar.yml", {"rate_limit_per_second": 20, "rules": rules})  # documented defaults
    for title in (f"Resolved: worker cpu above threshold: {host}", f"Resolved: worker memory above threshold: {host}",
                  "Resolved: task latency above threshold: normal"):
        slack.wait_messages(title, timeout=30, side=side)
    assert side.metrics().get("celery_threshold", signal="worker_cpu_percent") == 80

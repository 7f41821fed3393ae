"""Periodic tasks with real parts: a private redis-server, a real `celery beat` and worker,
`celery -A app sidecar` reading the Beat schedule from the app, and the fake Slack.

The apps are in tests/support/beat_apps.py: one runs tick-every-2s, one fail-every-2s
(whose task always fails).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.support.configs import write_config
from tests.support.fake_slack import FakeSlack, Request
from tests.support.paths import child_env
from tests.support.procs import Process, SidecarProcess

pytestmark = pytest.mark.timeout(240)

TICKING, FAILING = "tests.support.beat_apps:ticking", "tests.support.beat_apps:failing"
PERIOD, GRACE = 2.0, 3.0  # tick-every-2s; the default grace is max(3 s, 10 % of the period)
# What may come on top of due + grace before a message is in Slack: the sidecar judges
# once a second, then delivers.
DELIVERY = 3.0


def start_beat(procs: list[Process], app: str, broker_url: str, schedule: Path) -> Process:
    beat = Process("beat", [sys.executable, "-m", "celery", "-A", app, "beat", "-s", str(schedule),
                            "--loglevel=INFO"], child_env(CELERY_BROKER_URL=broker_url))
    procs.append(beat)
    return beat


def wall(request: Request) -> float:
    """When the fake Slack got the request, on the wall clock."""
    return request.at + (time.time() - time.monotonic())


Started = tuple[Process, Path, SidecarProcess]  # Beat, its schedule file, the sidecar


def start(procs, worker, app: str, broker_url: str, slack: FakeSlack, tmp_path: Path) -> Started:
    """A worker and Beat of the app, and `celery -A app sidecar` posting to the fake Slack."""
    config = write_config(tmp_path / "sidecar.yml", {"rate_limit_per_second": 20})
    schedule = tmp_path / "celerybeat-schedule"
    worker(broker_url, name="beatworker", app=app, queues="celery")
    beat = start_beat(procs, app, broker_url, schedule)
    side = SidecarProcess(None, command=("-m", "celery", "-A", app, "sidecar"), config=config,
                          env={"CELERY_BROKER_URL": broker_url, "SLACK_WEBHOOK_URL": slack.webhook_url})
    procs.append(side)
    return beat, schedule, side


def test_beat_stops_and_starts_missed_then_beat_not_scheduling_then_both_resolve(
        redis_srv, procs, worker, slack, tmp_path):
    beat, schedule, side = start(procs, worker, TICKING, redis_srv.url, slack, tmp_path)

    # On time: runs come, none is missed, none is late beyond its grace.
    side.wait_metric("celery_task_succeeded_total", lambda v: v >= 3, timeout=30, name="beat.tick")
    m = side.metrics()
    assert m.get("celery_beat_entry_period_seconds", entry="tick-every-2s", task="beat.tick") == PERIOD
    assert m.get("celery_beat_entry_grace_seconds", entry="tick-every-2s") == GRACE
    assert m.get("celery_beat_entry_missed_total", entry="tick-every-2s") == 0
    assert m.get("celery_beat_entry_late_seconds", entry="tick-every-2s") <= GRACE
    assert m.get("celery_beat_entry_next_due_timestamp_seconds", entry="tick-every-2s") > \
        m.get("celery_beat_entry_last_run_timestamp_seconds", entry="tick-every-2s")
    assert m.get("celery_beat_down") == 0

    # Beat stops: the entry is missed within two periods plus grace, then Beat is down.
    beat.stop()
    stopped = time.time()
    missed = slack.wait_message("Periodic task missed: tick-every-2s (beat.tick)", side=side)
    assert wall(missed) - stopped <= 2 * PERIOD + GRACE + DELIVERY, (
        f"missed alert {wall(missed) - stopped:.1f} s after Beat stopped")
    text = missed.body["text"]
    assert "periodic task missed: tick-every-2s (beat.tick), due at " in text and ", last run 20" in text
    down = slack.wait_message("Beat is not scheduling", side=side)
    assert wall(down) >= wall(missed)
    assert side.metrics().get("celery_beat_down") == 1
    assert side.metrics().get("celery_beat_entry_missed_total", entry="tick-every-2s") >= 2

    # Beat starts again (same schedule file): both resolve.
    start_beat(procs, TICKING, redis_srv.url, schedule)
    slack.wait_message("Beat is scheduling again", side=side)
    slack.wait_message("Periodic task ran again: tick-every-2s (beat.tick)", side=side)
    side.wait_metric("celery_beat_down", lambda v: v == 0)


def test_the_failure_alert_of_a_periodic_run_names_its_entry(redis_srv, procs, worker, slack, tmp_path):
    _, _, side = start(procs, worker, FAILING, redis_srv.url, slack, tmp_path)
    failed = slack.wait_message("Task failed: beat.fail", side=side)
    body = json.dumps(failed.body)
    assert "Periodic entry" in body and "fail-every-2s" in body
    assert side.metrics().get("celery_beat_entry_missed_total", entry="fail-every-2s") == 0

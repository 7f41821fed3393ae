"""The demo's Celery app: tasks that succeed, fail, retry and run slowly.

Run a worker with ``celery -A celery_sidecar.demo_tasks worker -E``; the broker comes from
``CELERY_BROKER_URL`` (this module is the demo's *app*, not part of the sidecar).
"""

from __future__ import annotations

import os
import random
import time

from celery import Celery

from celery_sidecar.plugin import ResourceUsage

app = Celery("demo", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_send_sent_event=True,
    worker_send_task_events=True,
    task_default_queue="celery",
    task_routes={"demo.report": {"queue": "heavy"}},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    resource_usage_interval=float(os.environ.get("DEMO_RESOURCE_INTERVAL", "2")),
    # The demo runs `celery beat` too; the sidecar reads this schedule from the app.
    beat_schedule={"demo-tick": {"task": "demo.tick", "schedule": 10.0}},
)
# The one optional line a real app adds for CPU/memory metrics:
app.steps["consumer"].add(ResourceUsage)


class DemoError(Exception):
    """Raised by demo.fail so the sidecar has failures to report."""


@app.task(name="demo.ok")
def ok(x: int = 1, y: int = 2) -> int:
    return x + y


@app.task(name="demo.fail")
def fail(reason: str = "demo failure") -> None:
    raise DemoError(reason)


@app.task(name="demo.flaky", bind=True, max_retries=3, default_retry_delay=0.2)
def flaky(self, p_fail: float = 0.5) -> str:
    if random.random() < p_fail:
        raise self.retry(exc=DemoError("transient"))
    return "ok"


@app.task(name="demo.slow")
def slow(seconds: float = 1.0) -> float:
    time.sleep(seconds)
    return seconds


@app.task(name="demo.report")
def report(seconds: float = 2.0) -> str:
    time.sleep(seconds)
    return "report done"


@app.task(name="demo.tick")
def tick() -> str:
    """The demo's periodic task (beat_schedule above)."""
    return "tick"


@app.task(name="demo.stuck")
def stuck(seconds: float = 25.0) -> str:
    """Runs past the demo's 10 s limit for it (thresholds.task_runtime_seconds): a stuck task."""
    time.sleep(seconds)
    return "unstuck"

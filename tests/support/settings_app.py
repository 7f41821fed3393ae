"""A Celery app whose settings the sidecar should take: broker (from SETTINGS_APP_BROKER, so
not from CELERY_BROKER_URL, which is also the sidecar's --broker-url variable), queues from
task_queues and task_routes, priority_steps, a Beat crontab in Asia/Tokyo and a time limit."""

from __future__ import annotations

import os

from celery import Celery
from celery.schedules import crontab
from kombu import Queue

app = Celery("settingsapp", broker=os.environ.get("SETTINGS_APP_BROKER"))
app.conf.update(
    broker_transport_options={"priority_steps": [0, 4]},
    task_queues=[Queue("celery"), Queue("from-task-queues")],
    task_routes={"settings.report": {"queue": "from-task-routes"}},
    timezone="Asia/Tokyo",
    beat_schedule={"nightly-cleanup": {"task": "settings.cleanup", "schedule": crontab(hour=3, minute=0)}},
    task_time_limit=600,
)


@app.task(name="settings.cleanup")
def cleanup() -> None: ...


@app.task(name="settings.report", time_limit=45)
def report() -> None: ...

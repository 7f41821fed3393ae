"""A Celery app with stock settings: no task events, no task-sent events (like most apps)."""

import os

from celery import Celery

app = Celery("plain", broker=os.environ.get("CELERY_BROKER_URL"))
app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)


@app.task(name="plain.ok")
def ok() -> str:
    return "ok"

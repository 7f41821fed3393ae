"""A Celery app whose tasks are acknowledged late, with a short Redis visibility timeout: a
task its worker dies running is delivered again (to another worker) a few seconds later."""

from __future__ import annotations

import os
import time

from celery import Celery

app = Celery("slow", broker=os.environ.get("CELERY_BROKER_URL"))
app.conf.update(
    task_send_sent_event=True,
    worker_send_task_events=True,
    task_acks_late=True,
    task_reject_on_worker_lost=False,  # the message stays unacked: Redis redelivers it
    broker_transport_options={"visibility_timeout": 5},
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="slow.sleep")
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds

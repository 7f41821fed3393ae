"""A Celery app on a production-shaped broker: its broker URL, transport options (Sentinel's
master_name) and broker_use_ssl (a CA and a client certificate) come from the environment, as
JSON, so a worker and ``celery -A ... sidecar`` share them. Task events on, task-sent too."""

from __future__ import annotations

import json
import os

from celery import Celery

app = Celery("production", broker=os.environ.get("PRODUCTION_APP_BROKER"))
app.conf.update(
    broker_transport_options=json.loads(os.environ.get("PRODUCTION_APP_TRANSPORT_OPTIONS") or "{}"),
    broker_use_ssl=json.loads(os.environ.get("PRODUCTION_APP_BROKER_USE_SSL") or "null"),
    task_send_sent_event=True,
    worker_send_task_events=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="production.ok")
def ok() -> str:
    return "ok"


def environment(broker_url: str, transport_options: dict | None = None, broker_use_ssl: dict | None = None) -> dict:
    """The environment that points this app (in a worker, or under ``celery -A``) at a broker."""
    return {"PRODUCTION_APP_BROKER": broker_url,
            "PRODUCTION_APP_TRANSPORT_OPTIONS": json.dumps(transport_options or {}),
            "PRODUCTION_APP_BROKER_USE_SSL": json.dumps(broker_use_ssl)}

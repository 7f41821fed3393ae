"""Celery apps with a Beat schedule, for a real `celery beat`, worker and sidecar:
``tests.support.beat_apps:ticking`` runs tick-every-2s, ``tests.support.beat_apps:failing``
runs fail-every-2s, whose task always fails. The broker comes from CELERY_BROKER_URL.
"""

from __future__ import annotations

import os

from celery import Celery


class NightlyError(Exception):
    pass


def _app(name: str, entry: str, task: str) -> Celery:
    app = Celery(name, broker=os.environ.get("CELERY_BROKER_URL"))
    app.conf.update(
        task_send_sent_event=True,
        worker_send_task_events=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        beat_schedule={entry: {"task": task, "schedule": 2.0}},
    )
    return app


ticking = _app("ticking", "tick-every-2s", "beat.tick")
failing = _app("failing", "fail-every-2s", "beat.fail")


@ticking.task(name="beat.tick")
def tick() -> str:
    return "tick"


@failing.task(name="beat.fail")
def fail() -> None:
    raise NightlyError("the periodic job broke")

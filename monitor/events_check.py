"""Tell the operator what the event stream lacks: task events, task-sent events.

Workers that send heartbeats but no task events are the usual "my metrics are empty".

Such a worker was started without ``-E`` (or ``worker_send_task_events``). We warn once,
naming the worker and the fix, and with ``--enable-events`` ask it to turn task events
on through remote control, as Flower does.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery

from celery_sidecar.monitor.pipeline import Sink
from celery_sidecar.monitor.state import State, WorkerUpdate

log = logging.getLogger(__name__)


class TaskEventsCheck(Sink):
    def __init__(self, state: State, enable_events: bool, app: Celery | None = None) -> None:
        self.state = state
        self.enable_events = enable_events
        self.app = app
        self.latency_source: str | None = None

    def on_tick(self, now: float, offline: list[WorkerUpdate], forgotten: list[str]) -> None:
        self._report_latency_source(now)
        for worker in self.state.workers.values():
            if worker.events_warning_logged or not self.state.task_events_missing(worker, now):
                continue
            worker.events_warning_logged = True
            log.warning(
                "worker %s sends heartbeats but no task events, so its tasks are invisible. "
                "Fix: start it with `celery worker -E` or set worker_send_task_events=True%s",
                worker.hostname,
                "; asking it to enable events now (--enable-events)" if self.enable_events else
                ", or run the sidecar with --enable-events",
            )
            if self.enable_events and self.app is not None:
                # Remote control is network I/O: keep it off the ticker (which holds the lock).
                threading.Thread(target=self._enable, args=(worker.hostname,), daemon=True).start()

    def _report_latency_source(self, now: float) -> None:
        source = self.state.latency_source(now)
        if source == self.latency_source:
            return
        self.latency_source = source
        if source == "sent":
            log.info("latency source: task-sent events arrive; queue wait is measured from when a task was sent")
        else:
            log.info(
                "latency source: no task-sent events, so queue wait is measured from when a worker received "
                "the task (it misses time spent in the broker). Set task_send_sent_event=True in the app to fix."
            )

    def _enable(self, hostname: str) -> None:
        try:
            self.app.control.enable_events(destination=[hostname])
            log.info("sent enable_events to %s", hostname)
        except Exception as exc:  # noqa: BLE001 - best effort; the warning already stands
            log.warning("enable_events to %s failed: %s", hostname, exc)

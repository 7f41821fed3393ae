"""Tell the operator what the event stream lacks: task events, task-sent events.

Advice speaks from evidence only, never from the sidecar's own start or from a broker it
cannot reach (nothing can be known about events that never arrived).

Workers that send heartbeats but no task events are the usual "my metrics are empty".
Such a worker was started without ``-E`` (or ``worker_send_task_events``). We warn once,
naming the worker and the fix, and with ``--enable-events`` ask it to turn task events
on through remote control, as Flower does. The evidence is the worker fold's
(``task_events_missing``).

Latency is measured from task-sent events when they arrive, else from task-received. The
log says which once events settle it: a task-sent event, or tasks received with no
task-sent event for SETTLE_SECONDS. With the app loaded (``--app``, ``celery -A``) its own
``task_send_sent_event`` shapes the words: an app that sets it is not told to set it, and
is told what was seen instead when the events say otherwise.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery

from celery_sidecar.monitor.fold.pipeline import Sink
from celery_sidecar.monitor.fold.records import WorkerUpdate
from celery_sidecar.monitor.fold.state import State

log = logging.getLogger(__name__)

# Tasks received with no task-sent event for this long settle it: task-sent events are off.
# A producer's task-sent goes out before the worker can receive the task, so a few seconds
# cover events that arrive out of order over separate connections.
SETTLE_SECONDS = 5.0


class TaskEventsCheck(Sink):
    def __init__(self, state: State, enable_events: bool, app: Celery | None = None,
                 app_sent_event: bool | None = None) -> None:
        """``app`` is the sidecar's own Celery app (remote control); ``app_sent_event`` the
        user's app's ``task_send_sent_event``, None when no app was loaded."""
        self.state = state
        self.enable_events = enable_events
        self.app = app
        self.app_sent_event = app_sent_event
        self.latency_source: str | None = None  # what the log last said; None: nothing yet
        self._warned: set[str] = set()  # hostnames warned about; forgotten workers leave it
        # (first tick, task-received count then) of receipts with no task-sent event in the window
        self._unsent_since: tuple[float, int] | None = None
        self._received_when_sent = 0  # the task-received count when task-sent events last arrived

    def on_tick(self, now: float, offline: list[WorkerUpdate], forgotten: list[str]) -> None:
        self._report_latency_source(now)
        self._warned.difference_update(forgotten)
        for worker in self.state.workers.values():
            if worker.hostname in self._warned or not self.state.worker_fold.task_events_missing(worker, now):
                continue
            self._warned.add(worker.hostname)
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
        received = self.state.counters.events_by_type.get("task-received", 0)
        if self.state.latency_source(now) == "sent":
            self._unsent_since, self._received_when_sent = None, received
            self._say("sent", 0)
            return
        if received == self._received_when_sent:
            return  # no task received since task-sent events last came (or ever): nothing to judge
        if self._unsent_since is None:
            self._unsent_since = (now, received)
        elif now - self._unsent_since[0] >= SETTLE_SECONDS:
            self._say("received", received - self._received_when_sent)

    def _say(self, source: str, unsent: int) -> None:
        if source == self.latency_source:
            return
        self.latency_source = source
        if source == "sent":
            log.info("latency source: task-sent events arrive; queue wait is measured from when a task was sent")
            return
        seen = (f"{unsent} task{'s' if unsent != 1 else ''} received and no task-sent events, so queue wait is "
                "measured from when a worker received the task (it misses time spent in the broker)")
        if self.app_sent_event is None:
            log.info("latency source: %s. Set task_send_sent_event=True in the app that sends the tasks to fix.",
                     seen)
        elif not self.app_sent_event:
            log.info("latency source: %s. The app leaves task_send_sent_event off. "
                     "Set task_send_sent_event=True in it to fix.", seen)
        else:
            log.warning(
                "latency source: the app sets task_send_sent_event=True, but %d task%s arrived with no "
                "task-sent event, so queue wait is measured from when a worker received the task. Whatever "
                "sends them does not use the app's settings: another app, or a process that configures its "
                "own.", unsent, "s" if unsent != 1 else "")

    def _enable(self, hostname: str) -> None:
        try:
            self.app.control.enable_events(destination=[hostname])
            log.info("sent enable_events to %s", hostname)
        except Exception as exc:  # noqa: BLE001 - best effort; the warning already stands
            log.warning("enable_events to %s failed: %s", hostname, exc)

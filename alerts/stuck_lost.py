"""Alerts about where tasks are: stuck (running past their limit), lost with their worker,
and lost tasks that came back (redelivered).

A pipeline sink beside the alert engine (alerts/engine.py), sharing its dispatcher. Lost
tasks arrive with the worker's offline update; a redelivery with the task-received update;
stuck tasks are read from one state snapshot per tick. Keys come from event data (task
ids, the worker's last heartbeat), so redundant sidecars post each once.
"""

from __future__ import annotations

import logging
import time

from celery_sidecar.alerts.engine import Dispatcher
from celery_sidecar.alerts.model import Alert
from celery_sidecar.monitor.config.settings import Config, LiveConfig
from celery_sidecar.monitor.sinks import Sink, TaskUpdate, Update, WorkerUpdate
from celery_sidecar.monitor.view import StateView, StuckTask

log = logging.getLogger(__name__)

LOST_LISTED = 20  # task ids named in one lost-tasks alert; the count says how many in all
MAX_LOST_GROUPS = 10_000  # lost task ids remembered, to follow up when one comes back
_ENDINGS = {"succeeded": "succeeded", "failed": "failed", "revoked": "was revoked", "rejected": "was rejected",
            "retried": "was retried"}


class InFlightAlerts(Sink):
    def __init__(self, config: LiveConfig, view: StateView, dispatcher: Dispatcher) -> None:
        self._live = config
        self.view = view
        self.dispatcher = dispatcher
        self.stuck: dict[str, StuckTask] = {}  # open stuck alerts, by task id
        self.lost_in: dict[str, str] = {}  # lost task id -> the group of the alert that reported it

    @property
    def config(self) -> Config:
        return self._live.current

    # -- events -------------------------------------------------------------------------

    # Endings (for stuck tasks), received (a lost task back), offline (tasks lost with it).
    update_kinds = frozenset({*_ENDINGS, "received", "offline"})

    def on_update(self, update: Update) -> None:
        if type(update) is TaskUpdate:
            if update.uuid in self.stuck and update.kind in _ENDINGS:
                self._unstuck(self.stuck.pop(update.uuid), f"{_ENDINGS[update.kind]}", update.timestamp)
            if update.was_lost:
                self._came_back(update)
        elif update.kind == "offline" and update.lost:
            for uuid, _name, _queue in update.lost:
                if uuid in self.stuck:
                    self._unstuck(self.stuck.pop(uuid), f"ended with its worker {update.hostname} going down",
                                  update.timestamp)
            self._lost(update)

    def _lost(self, update: WorkerUpdate) -> None:
        rule = self.config.alerts.rules.rule("tasks_lost")
        group = f"tasks_lost:{update.hostname}:{update.last_heartbeat_ts:.3f}"
        for uuid, _name, _queue in update.lost:
            self.lost_in[uuid] = group
        while len(self.lost_in) > MAX_LOST_GROUPS:
            self.lost_in.pop(next(iter(self.lost_in)))
        if not rule.enabled:
            return
        lost = update.lost
        listed = "\n".join(f"{uuid} ({name}, queue {queue})" for uuid, name, queue in lost[:LOST_LISTED])
        more = f"\n… and {len(lost) - LOST_LISTED} more" if len(lost) > LOST_LISTED else ""
        how = "went down without a goodbye" if update.reason == "heartbeat-lost" else "shut down"
        self.dispatcher.submit(Alert(
            key=group, group=group, kind="tasks_lost", status="firing", severity=rule.severity,
            title=f"{len(lost)} task{'s' if len(lost) != 1 else ''} lost on {update.hostname}",
            text=(f"{update.hostname} {how} while running these tasks; they did not finish there "
                  f"(with acks_late they will be redelivered):\n{listed}{more}"),
            fields={"Worker": update.hostname, "Lost": str(len(lost)),
                    "Tasks": ", ".join(sorted({name for _, name, _ in lost}))[:500]},
            created_at=update.timestamp,
        ))

    def _came_back(self, update: TaskUpdate) -> None:
        group = self.lost_in.pop(update.uuid, None)
        rule = self.config.alerts.rules.rule("tasks_lost")
        if group is None or not rule.enabled:
            return
        self.dispatcher.submit(Alert(
            key=f"{group}:back:{update.uuid}", group=group, kind="task_redelivered", status="info",
            severity="info", title=f"Lost task came back: {update.name}",
            text=f"Task {update.uuid}, lost with its worker, was delivered again, to {update.hostname}.",
            fields={"Task": update.name, "Task ID": update.uuid, "Worker": update.hostname, "Queue": update.queue},
            task_name=update.name, created_at=update.timestamp,
        ))

    # -- time ---------------------------------------------------------------------------

    def on_tick(self, now: float, offline: list[WorkerUpdate], forgotten: list[str]) -> None:
        for update in offline:
            self.on_update(update)
        rule = self.config.alerts.rules.rule("task_stuck")
        if not rule.enabled:
            return
        snap = self.view.snapshot(now)
        stuck = {task.uuid: task for task in snap.stuck}
        for uuid, task in stuck.items():
            if uuid not in self.stuck:
                self.stuck[uuid] = task
                self._stuck(task, rule.severity)
        for uuid in [u for u in self.stuck if u not in stuck]:
            # Not finished (that resolves on its event), yet no longer running past its limit:
            # its worker no longer runs it (the end event was lost), the limit was raised, or
            # the task left the in-flight state.
            ending = ("is no longer run by its worker (its end event never reached the sidecar)"
                      if uuid in snap.closed_unseen else "is no longer over its limit")
            self._unstuck(self.stuck.pop(uuid), ending, now)

    def _stuck(self, task: StuckTask, severity: str) -> None:
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(task.started_at))
        self.dispatcher.submit(Alert(
            key=f"task_stuck:{task.uuid}", group=f"task_stuck:{task.uuid}", kind="task_stuck", status="firing",
            severity=severity,  # type: ignore[arg-type]
            title=f"Task stuck: {task.name}",
            text=f"Task {task.uuid} has run for {task.runtime:.0f} s on {task.hostname}; "
                 f"its limit is {task.limit:g} s. Checked: {task.confirmed}.",
            fields={"Task": task.name, "Task ID": task.uuid, "Worker": task.hostname, "Started": started,
                    "Running for": f"{task.runtime:.0f} s", "Limit": f"{task.limit:g} s"},
            task_name=task.name, created_at=task.started_at + task.limit,
        ))

    def _unstuck(self, task: StuckTask, ending: str, at: float) -> None:
        rule = self.config.alerts.rules.rule("task_stuck")
        self.dispatcher.submit(Alert(
            key=f"task_stuck:{task.uuid}:resolved", group=f"task_stuck:{task.uuid}", kind="task_stuck",
            status="resolved", severity=rule.severity,
            title=f"Task no longer stuck: {task.name}",
            text=f"Task {task.uuid} {ending}.",
            fields={"Task": task.name, "Task ID": task.uuid, "Worker": task.hostname},
            task_name=task.name, created_at=at,
        ))

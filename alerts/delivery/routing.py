"""Which alerts are sent: task include/exclude patterns and mute windows.

A firing alert that is muted or excluded marks its group as suppressed, so the
"resolved" for it is dropped too: nobody should get a resolution for an alert they
never saw. The suppressed groups are held in memory, bounded (oldest forgotten first).
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from celery_sidecar.alerts.model import Alert
from celery_sidecar.monitor.config.alert_rules import WEEKDAYS, AlertsConfig, MuteWindow

DropReason = Literal["muted", "excluded", "suppressed"]
MAX_SUPPRESSED_GROUPS = 10_000


@dataclass(frozen=True)
class Verdict:
    send: bool
    reason: DropReason | None = None


SEND = Verdict(send=True)


class Router:
    """Decides per alert with the config it is given; remembers the suppressed groups."""

    def __init__(self, max_suppressed: int = MAX_SUPPRESSED_GROUPS) -> None:
        self._suppressed: OrderedDict[str, None] = OrderedDict()
        self._max_suppressed = max_suppressed

    def route(self, alert: Alert, cfg: AlertsConfig, now: float) -> Verdict:
        """`now` is wall-clock time (mute windows are in UTC)."""
        if alert.status == "resolved" and alert.group in self._suppressed:
            del self._suppressed[alert.group]
            return Verdict(False, "suppressed")
        verdict = _judge(alert, cfg, now)
        if alert.status == "firing":
            if verdict.send:
                self._suppressed.pop(alert.group, None)
            else:
                self._suppress(alert.group)
        return verdict

    def _suppress(self, group: str) -> None:
        self._suppressed[group] = None
        self._suppressed.move_to_end(group)
        while len(self._suppressed) > self._max_suppressed:
            self._suppressed.popitem(last=False)


def _judge(alert: Alert, cfg: AlertsConfig, now: float) -> Verdict:
    if alert.task_name is not None and not task_selected(cfg, alert.task_name):
        return Verdict(False, "excluded")
    # A resolution is news whenever it comes: a mute window only holds back new alerts.
    if alert.status != "resolved" and is_muted(cfg.mute, alert, now):
        return Verdict(False, "muted")
    return SEND


def task_selected(cfg: AlertsConfig, task_name: str) -> bool:
    included = any(fnmatch.fnmatchcase(task_name, p) for p in cfg.include_tasks)
    return included and not any(fnmatch.fnmatchcase(task_name, p) for p in cfg.exclude_tasks)


def is_muted(windows: list[MuteWindow], alert: Alert, now: float) -> bool:
    moment = datetime.fromtimestamp(now, tz=UTC)
    return any(_covers(w, moment) for w in windows if not w.severities or alert.severity in w.severities)


def _covers(window: MuteWindow, moment: datetime) -> bool:
    minute = moment.hour * 60 + moment.minute
    today = WEEKDAYS[moment.weekday()]
    start, end = window.start_minute, window.end_minute
    if start < end:
        return today in window.weekdays and start <= minute < end
    # Crosses midnight: the early part belongs to the window that started yesterday.
    yesterday = WEEKDAYS[(moment - timedelta(days=1)).weekday()]
    return (today in window.weekdays and minute >= start) or (yesterday in window.weekdays and minute < end)

"""Alerts about periodic tasks: an entry missed, and Beat not scheduling at all.

A pipeline sink beside the alert engine, sharing its dispatcher. Once a second it reads
the Beat entries from a state snapshot (monitor/beat.py keeps them): an entry missing a
run is one alert, resolved by its next run; when Beat looks down (two entries missed since
the last run of any, monitor/beat.py), one "Beat is not scheduling" alert stands for all (no further per-entry
alerts until Beat is back), resolved by the next run of any entry. Keys come from the due
times, so redundant sidecars post each once.
"""

from __future__ import annotations

from datetime import UTC, datetime

from celery_sidecar.alerts.engine import Dispatcher
from celery_sidecar.alerts.model import Alert
from celery_sidecar.monitor.config import Config, LiveConfig
from celery_sidecar.monitor.pipeline import Sink
from celery_sidecar.monitor.state import WorkerUpdate
from celery_sidecar.monitor.view import BeatEntryView, StateView


def _when(ts: float | None) -> str:
    return "never seen" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class BeatAlerts(Sink):
    def __init__(self, config: LiveConfig, view: StateView, dispatcher: Dispatcher) -> None:
        self._live = config
        self.view = view
        self.dispatcher = dispatcher
        self.missing: dict[str, str] = {}  # entry -> group of its open missed alert
        self.down: str | None = None  # group of the open "Beat is not scheduling" alert

    @property
    def config(self) -> Config:
        return self._live.current

    def on_tick(self, now: float, offline: list[WorkerUpdate], forgotten: list[str]) -> None:
        snap = self.view.snapshot(now)
        rules = self.config.alerts.rules
        missed_rule, down_rule = rules.rule("beat_missed"), rules.rule("beat_down")
        if snap.beat_down_since is not None and self.down is None and down_rule.enabled:
            self.down = f"beat_down:{snap.beat_down_since:.0f}"
            missing = [e for e in snap.beat if e.missing_since is not None]
            runs = [e.last_run for e in snap.beat if e.last_run is not None]
            self.dispatcher.submit(Alert(
                key=self.down, group=self.down, kind="beat_down", status="firing", severity=down_rule.severity,
                title="Beat is not scheduling",
                text=(f"No periodic task has run since {_when(max(runs) if runs else None)}; "
                      f"entries missed since then: " + ", ".join(f"{e.entry} ({e.task})" for e in missing)),
                fields={"Entries missing": str(len(missing)), "Entries watched": str(len(snap.beat))},
                created_at=now,
            ))
        elif snap.beat_down_since is None and self.down is not None:
            self.dispatcher.submit(Alert(
                key=f"{self.down}:resolved", group=self.down, kind="beat_down", status="resolved",
                severity=down_rule.severity, title="Beat is scheduling again",
                text="A periodic task ran again.", created_at=now,
            ))
            self.down = None
        for entry in snap.beat:
            if entry.missing_since is not None and entry.entry not in self.missing:
                if self.down is not None or not missed_rule.enabled:
                    continue  # one "Beat is not scheduling" stands for every entry
                self._missed(entry, missed_rule.severity, now)
            elif entry.missing_since is None and entry.entry in self.missing:
                self._back(entry, self.missing.pop(entry.entry), missed_rule.severity, now)
        gone = set(self.missing) - {e.entry for e in snap.beat}
        for name in gone:  # no longer configured
            self.missing.pop(name)

    def _missed(self, entry: BeatEntryView, severity: str, now: float) -> None:
        group = f"beat_missed:{entry.entry}:{entry.missing_since:.0f}"
        self.missing[entry.entry] = group
        self.dispatcher.submit(Alert(
            key=group, group=group, kind="beat_missed", status="firing", severity=severity,  # type: ignore[arg-type]
            title=f"Periodic task missed: {entry.entry} ({entry.task})",
            text=(f"periodic task missed: {entry.entry} ({entry.task}), due at {_when(entry.missing_since)}, "
                  f"last run {_when(entry.last_run)}"),
            fields={"Entry": entry.entry, "Task": entry.task, "Due at": _when(entry.missing_since),
                    "Last run": _when(entry.last_run), "Grace": f"{entry.grace:g} s"},
            task_name=entry.task, created_at=now,
        ))

    def _back(self, entry: BeatEntryView, group: str, severity: str, now: float) -> None:
        self.dispatcher.submit(Alert(
            key=f"{group}:resolved", group=group, kind="beat_missed", status="resolved",
            severity=severity,  # type: ignore[arg-type]
            title=f"Periodic task ran again: {entry.entry} ({entry.task})",
            text=f"{entry.entry} ({entry.task}) ran at {_when(entry.last_run)}, {entry.late:.1f} s after its due time.",
            fields={"Entry": entry.entry, "Task": entry.task, "Last run": _when(entry.last_run)},
            task_name=entry.task, created_at=now,
        ))

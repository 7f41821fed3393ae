"""Alerts about periodic tasks: an entry missed, and Beat not scheduling at all.

A pipeline sink beside the alert engine, sharing its dispatcher. Once a second it reads
the Beat entries from a state snapshot (monitor/fold/beat.py keeps them): an entry missing a
run is one alert, resolved by its next run; when Beat looks down (two entries missed since
the last run of any, monitor/fold/beat.py), one "Beat is not scheduling" alert stands for all (no further per-entry
alerts until Beat is back), resolved by the next run of any entry. Keys come from the due
times, so redundant sidecars post each once.
"""

from __future__ import annotations

from datetime import UTC, datetime

from celery_sidecar.alerts.engine import Dispatcher
from celery_sidecar.alerts.model import Alert
from celery_sidecar.monitor.config.alert_rules import RuleConfig
from celery_sidecar.monitor.config.settings import Config, LiveConfig
from celery_sidecar.monitor.signals import Severity
from celery_sidecar.monitor.sinks import Sink, WorkerUpdate
from celery_sidecar.monitor.view import BeatEntryView, Snapshot, StateView


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _last_run(entry: BeatEntryView, started_at: float) -> tuple[str, str]:
    """The entry's last run, as a clause and as a field. With none seen, say since when the
    sidecar has watched: the entry may well have run before."""
    if entry.last_run is None:
        return (f"no run since the sidecar started at {_utc(started_at)}",
                f"none since the sidecar started at {_utc(started_at)}")
    return f"last run {_utc(entry.last_run)}", _utc(entry.last_run)


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
        self._follow_beat(snap, rules.rule("beat_down"), now)
        self._follow_entries(snap, rules.rule("beat_missed"), now)
        self._forget_removed(snap)

    # -- the steps of a tick ---------------------------------------------------------------------

    def _follow_beat(self, snap: Snapshot, rule: RuleConfig, now: float) -> None:
        """Beat down: one alert for every entry; resolved by the next run of any."""
        if snap.beat_down_since is not None and self.down is None and rule.enabled:
            self._beat_down(snap, rule.severity, now)
        elif snap.beat_down_since is None and self.down is not None:
            self._beat_up(self.down, rule.severity, now)
            self.down = None

    def _follow_entries(self, snap: Snapshot, rule: RuleConfig, now: float) -> None:
        for entry in snap.beat:
            if entry.missing_since is not None and entry.entry not in self.missing:
                # While Beat is down, its one alert stands for every entry.
                if self.down is None and rule.enabled:
                    self._missed(entry, rule.severity, snap.started_at, now)
            elif entry.missing_since is None and entry.entry in self.missing:
                self._back(entry, self.missing.pop(entry.entry), rule.severity, now)

    def _forget_removed(self, snap: Snapshot) -> None:
        """Entries no longer configured: their open alerts are not followed any more."""
        for name in set(self.missing) - {e.entry for e in snap.beat}:
            self.missing.pop(name)

    # -- the alerts --------------------------------------------------------------------------------

    def _beat_down(self, snap: Snapshot, severity: Severity, now: float) -> None:
        self.down = f"beat_down:{snap.beat_down_since:.0f}"
        missing = [e for e in snap.beat if e.missing_since is not None]
        runs = [e.last_run for e in snap.beat if e.last_run is not None]
        since = _utc(max(runs)) if runs else f"the sidecar started at {_utc(snap.started_at)}"
        self.dispatcher.submit(Alert(
            key=self.down, group=self.down, kind="beat_down", status="firing", severity=severity,
            title="Beat is not scheduling",
            text=(f"No periodic task has run since {since}; "
                  f"entries missed since then: " + ", ".join(f"{e.entry} ({e.task})" for e in missing)),
            fields={"Entries missing": str(len(missing)), "Entries watched": str(len(snap.beat))},
            created_at=now,
        ))

    def _beat_up(self, group: str, severity: Severity, now: float) -> None:
        self.dispatcher.submit(Alert(
            key=f"{group}:resolved", group=group, kind="beat_down", status="resolved",
            severity=severity, title="Beat is scheduling again",
            text="A periodic task ran again.", created_at=now,
        ))

    def _missed(self, entry: BeatEntryView, severity: Severity, started_at: float, now: float) -> None:
        group = f"beat_missed:{entry.entry}:{entry.missing_since:.0f}"
        self.missing[entry.entry] = group
        due = _utc(entry.missing_since or now)
        last, last_field = _last_run(entry, started_at)
        self.dispatcher.submit(Alert(
            key=group, group=group, kind="beat_missed", status="firing", severity=severity,
            title=f"Periodic task missed: {entry.entry} ({entry.task})",
            text=f"periodic task missed: {entry.entry} ({entry.task}), due at {due}, {last}",
            fields={"Entry": entry.entry, "Task": entry.task, "Due at": due,
                    "Last run": last_field, "Grace": f"{entry.grace:g} s"},
            task_name=entry.task, created_at=now,
        ))

    def _back(self, entry: BeatEntryView, group: str, severity: Severity, now: float) -> None:
        ran = _utc(entry.last_run or now)
        self.dispatcher.submit(Alert(
            key=f"{group}:resolved", group=group, kind="beat_missed", status="resolved",
            severity=severity,
            title=f"Periodic task ran again: {entry.entry} ({entry.task})",
            text=f"{entry.entry} ({entry.task}) ran at {ran}, {entry.late:.1f} s after its due time.",
            fields={"Entry": entry.entry, "Task": entry.task, "Last run": ran},
            task_name=entry.task, created_at=now,
        ))

"""The alert engine: decides *when* to notify; alerts/delivery/dispatcher.py decides *how*.

It is a pipeline sink. Task failures arrive on the event thread and cost one dict
lookup unless they open a new alert; everything time-based (workers going silent,
thresholds, storm summaries) is evaluated in ``on_tick`` about once a second, on one
state snapshot (monitor/view.py). The thresholds are the signal table's
(monitor/signals.py): this module knows no signal by name.

A worker that shuts down gracefully (worker-offline) is usually being restarted: nothing is
posted unless it stays away longer than the ``worker_shutdown`` rule's ``for_seconds``
(60 s by default); then one message, resolved when it is back. A worker whose heartbeats
stop pages at once (``worker_offline``).

Keys are derived from event data (task ids, heartbeat timestamps, the failure that
opened a storm window) so that two sidecars reading the same stream produce the same
keys and the delivery layer's claim posts each page once. Threshold episodes are keyed
by the 5-minute bucket in which the breach began (docs/alerts-delivery.md, "HA").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from celery_sidecar.alerts.model import Alert
from celery_sidecar.monitor.config.alert_rules import RuleConfig
from celery_sidecar.monitor.config.dashboard_links import dashboard_url, subject_variables
from celery_sidecar.monitor.config.settings import Config, LiveConfig
from celery_sidecar.monitor.signals import BY_RULE, SIGNALS, Reading, Severity, Signal, format_value
from celery_sidecar.monitor.sinks import Sink, TaskUpdate, Update, WorkerUpdate
from celery_sidecar.monitor.view import Snapshot, StateView

log = logging.getLogger(__name__)

MAX_STORMS = 1000  # distinct (task, exception) groups tracked at once
EPISODE_BUCKET = 300.0
LATE_EVENT_SLACK = 1.0  # seconds to wait for late events before closing a storm window
# How long a gracefully shut down worker may stay away before anyone is told: a restart
# (a deploy, a config change) comes back well within it.


class Dispatcher(Protocol):  # the part of alerts.delivery.Dispatcher the engine uses
    def start(self) -> None: ...
    def submit(self, alert: Alert) -> None: ...
    def stop(self, timeout: float = 5.0) -> None: ...


@dataclass
class _Storm:
    opened_by: str  # uuid of the failure whose alert opened this window
    window_start: float  # event timestamp
    suppressed: int = 0
    last: TaskUpdate | None = None


@dataclass
class _Shutdown:
    """A graceful shutdown not reported (yet): its worker may be back within the grace window."""

    update: WorkerUpdate
    since: float  # the window counts from here: the shutdown, or the broker's return


@dataclass
class _Breach:
    """One (rule, subject) threshold: pending → firing → resolving → gone."""

    since: float
    value: float
    limit: float
    firing_key: str | None = None
    clear_since: float | None = None


class AlertEngine(Sink):
    def __init__(self, config: LiveConfig, view: StateView, dispatcher: Dispatcher) -> None:
        self._live = config
        self.view = view
        self.dispatcher = dispatcher
        self.storms: dict[tuple[str, str], _Storm] = {}
        self.breaches: dict[tuple[str, str], _Breach] = {}
        self.shutdowns: dict[str, _Shutdown] = {}  # by hostname
        self.offline_groups: dict[str, tuple[str, str]] = {}  # hostname -> (group, rule) of its open alert

    @property
    def config(self) -> Config:
        return self._live.current

    @property
    def rules(self):
        return self.config.alerts.rules

    def start(self) -> None:
        self.dispatcher.start()

    def stop(self) -> None:
        self.dispatcher.stop()

    def _dashboard(self, **variables: str) -> str | None:
        """The Grafana dashboard on these variables (per-task with a task), if alerts.grafana_url is set."""
        base = self.config.alerts.grafana_url
        return dashboard_url(base, **variables) if base else None

    # -- events -----------------------------------------------------------------------

    update_kinds = frozenset({"failed", "offline", "online"})

    def on_update(self, update: Update) -> None:
        if type(update) is TaskUpdate:
            if update.kind == "failed" and self.rules.task_failed.enabled:
                self._task_failed(update)
        elif update.kind == "offline" and update.reason == "shutdown":
            self._worker_shutdown(update)
        elif update.kind == "online":
            self._worker_back(update)

    def _task_failed(self, update: TaskUpdate) -> None:
        group = (update.name, update.exception or "Exception")
        storm = self.storms.get(group)
        window = self.config.alerts.storm_window_seconds
        if storm is not None and update.timestamp < storm.window_start + window:
            storm.suppressed += 1
            storm.last = update
            return
        if storm is not None and storm.suppressed and update.timestamp < storm.window_start + 2 * window:
            # The storm goes on: summarise the window that ended and count this failure in the next.
            self._flush_storm(group, storm)
            storm.window_start += window
            storm.suppressed, storm.last = 1, update
            return
        if storm is not None:
            self._flush_storm(group, storm)
        if len(self.storms) >= MAX_STORMS:
            oldest = min(self.storms, key=lambda g: self.storms[g].window_start)
            self._flush_storm(oldest, self.storms.pop(oldest))
        self.storms[group] = _Storm(update.uuid, update.timestamp)
        self.dispatcher.submit(self._failure_alert(update))

    def _failure_alert(self, u: TaskUpdate) -> Alert:
        cfg = self.config.alerts
        fields = {
            "Task": u.name,
            "Task ID": u.uuid,
            "Exception": u.exception or "unknown",
            "Worker": u.hostname,
            "Queue": u.queue,
            "Retries": str(u.retries),
        }
        if u.entry:
            fields["Periodic entry"] = u.entry
        if cfg.include_args:
            fields["Args"] = str(u.args)
            fields["Kwargs"] = str(u.kwargs)
        return Alert(
            key=f"task_failed:{u.uuid}",
            group=f"task_failed:{u.uuid}",
            kind="task_failed",
            status="firing",
            severity=self.rules.task_failed.severity,
            title=f"Task failed: {u.name}",
            text=f"{u.exception_message or u.exception or 'unknown error'}"[:2000],
            fields=fields,
            task_name=u.name,
            traceback=u.traceback,
            link=f"{cfg.flower_url.rstrip('/')}/task/{u.uuid}" if cfg.flower_url else None,
            created_at=u.timestamp,
            dashboard=self._dashboard(task=u.name, queue=u.queue),
        )

    def _flush_storm(self, group: tuple[str, str], storm: _Storm) -> None:
        if not storm.suppressed:
            return
        name, exc = group
        window = self.config.alerts.storm_window_seconds
        last = storm.last
        self.dispatcher.submit(
            Alert(
                key=f"failure_summary:{storm.opened_by}:{storm.window_start:.3f}",
                group=f"task_failed:{storm.opened_by}",
                kind="failure_summary",
                status="firing",
                severity=self.rules.task_failed.severity,
                title=f"+{storm.suppressed} more of {name}: {exc} in the last {window:g} s",
                text=f"{storm.suppressed} further failures of {name} with {exc} after the one reported.",
                fields={"Task": name, "Exception": exc, "Count": str(storm.suppressed),
                        "Last worker": last.hostname if last else "", "Last task ID": last.uuid if last else ""},
                task_name=name,
                created_at=storm.window_start + window,
                dashboard=self._dashboard(task=name),
            )
        )
        storm.suppressed = 0

    def _worker_shutdown(self, update: WorkerUpdate) -> None:
        if update.hostname in self.offline_groups:
            # Reported silent (or away after a shutdown), it was alive after all (a network
            # partition, a stalled event loop, a return whose worker-online was lost): that page
            # is over, and this shutdown is judged by its own rule from now on.
            self._resolve_offline(update, "Worker heard from again",
                                  f"{update.hostname} was heard from again: it shut down gracefully (worker-offline).")
        if self.rules.worker_shutdown.enabled:
            # Held back: a restart brings the worker back within the grace window.
            self.shutdowns[update.hostname] = _Shutdown(update, update.timestamp)
            _bound(self.shutdowns, self.config.state.max_workers)

    def _report_shutdowns(self, now: float, snap: Snapshot) -> None:
        """Post the graceful shutdowns whose worker stayed away past the grace window."""
        rule = self.rules.worker_shutdown
        if not snap.intake.connected:
            # No worker can be seen coming back while the broker is unreachable: the window
            # starts again when it is back, as the workers' heartbeat grace does.
            for shutdown in self.shutdowns.values():
                shutdown.since = now
            return
        grace = rule.for_seconds
        for hostname, shutdown in list(self.shutdowns.items()):
            if now - shutdown.since < grace:
                continue
            del self.shutdowns[hostname]
            if rule.enabled:
                self._shutdown_alert(shutdown.update, rule.severity, now)

    def _shutdown_alert(self, update: WorkerUpdate, severity: Severity, now: float) -> None:
        group = f"worker_shutdown:{update.hostname}:{update.last_heartbeat_ts:.3f}"
        self.offline_groups[update.hostname] = (group, "worker_shutdown")
        _bound(self.offline_groups, self.config.state.max_workers)
        away = now - update.timestamp
        self.dispatcher.submit(
            Alert(
                key=group, group=group, kind="worker_shutdown", status="firing", severity=severity,
                title=f"Worker shut down: {update.hostname}",
                text=f"{update.hostname} shut down gracefully (worker-offline) and has not come back "
                     f"for {away:.0f} s.",
                fields={"Worker": update.hostname, "Away for": f"{away:.0f} s"},
                created_at=update.timestamp,
                dashboard=self._dashboard(hostname=update.hostname),
            )
        )

    def _worker_lost(self, update: WorkerUpdate) -> None:
        rule = self.rules.worker_offline
        if not rule.enabled:
            return
        group = f"worker_offline:{update.hostname}:{update.last_heartbeat_ts:.3f}"
        self.offline_groups[update.hostname] = (group, "worker_offline")
        _bound(self.offline_groups, self.config.state.max_workers)
        silent = update.timestamp - update.last_heartbeat_ts
        self.dispatcher.submit(
            Alert(
                key=group, group=group, kind="worker_offline", status="firing", severity=rule.severity,
                title=f"Worker offline: {update.hostname}",
                text=f"No heartbeat from {update.hostname} for {silent:.0f} s (killed, OOM or network).",
                fields={"Worker": update.hostname, "Silent for": f"{silent:.0f} s"},
                created_at=update.timestamp,
                dashboard=self._dashboard(hostname=update.hostname),
            )
        )

    def _worker_back(self, update: WorkerUpdate) -> None:
        shutdown = self.shutdowns.pop(update.hostname, None)
        if shutdown is not None:
            log.info("worker %s is back %.0f s after a graceful shutdown: a restart, not reported",
                     update.hostname, update.timestamp - shutdown.update.timestamp)
            return
        if update.hostname in self.offline_groups:
            self._resolve_offline(update, "Worker back online", f"Heartbeats from {update.hostname} have resumed.")

    def _resolve_offline(self, update: WorkerUpdate, title: str, text: str) -> None:
        """Resolve the worker's open offline or shutdown alert (the caller checked there is one)."""
        group, rule = self.offline_groups.pop(update.hostname)
        self.dispatcher.submit(
            Alert(
                key=f"{group}:resolved", group=group, kind="worker_online", status="resolved",
                severity=self.rules.rule(rule).severity,
                title=f"{title}: {update.hostname}",
                text=text,
                fields={"Worker": update.hostname},
                created_at=update.timestamp,
                dashboard=self._dashboard(hostname=update.hostname),
            )
        )

    # -- time -------------------------------------------------------------------------

    def on_tick(self, now: float, offline: list[WorkerUpdate], forgotten: list[str]) -> None:
        for update in offline:
            self._worker_lost(update)
        snap = self.view.snapshot(now)
        self._close_storm_windows(now)
        self._report_shutdowns(now, snap)
        self._evaluate_thresholds(now, snap)

    def _close_storm_windows(self, now: float) -> None:
        window = self.config.alerts.storm_window_seconds
        for group, storm in list(self.storms.items()):
            if now >= storm.window_start + window + LATE_EVENT_SLACK:
                if storm.suppressed:
                    self._flush_storm(group, storm)
                    # The storm goes on: the next window starts where this one ended.
                    storm.window_start += window
                else:
                    del self.storms[group]

    def _evaluate_thresholds(self, now: float, snap: Snapshot) -> None:
        cfg = self.config
        seen: set[tuple[str, str]] = set()
        for signal in SIGNALS:
            rule: RuleConfig = cfg.alerts.rules.rule(signal.rule)
            if not rule.enabled:
                continue
            for reading in signal.read(snap, cfg):
                if reading.value > reading.limit:
                    key = (signal.rule, reading.subject)
                    seen.add(key)
                    self._breached(key, signal, reading, rule, now)
        if not snap.intake.connected:
            # A breach the sidecar cannot see any more is not over: resolved now, it would be
            # news the sidecar does not have (a worker's receipts, a task's end, are unheard).
            # Its clearing starts again once the sidecar can see: the outage proves nothing.
            for key, breach in self.breaches.items():
                if key not in seen:
                    breach.clear_since = None
            return
        for key in [k for k in self.breaches if k not in seen]:
            self._cleared(key, now)

    def _breached(self, key: tuple[str, str], signal: Signal, reading: Reading, rule: RuleConfig,
                  now: float) -> None:
        breach = self.breaches.get(key)
        if breach is None:
            breach = self.breaches[key] = _Breach(since=now, value=reading.value, limit=reading.limit)
        breach.value, breach.limit, breach.clear_since = reading.value, reading.limit, None
        if breach.firing_key is None and now - breach.since >= rule.for_seconds:
            bucket = int(breach.since // EPISODE_BUCKET)
            breach.firing_key = f"{signal.rule}:{reading.subject}:{bucket}"
            unit = signal.unit
            self.dispatcher.submit(
                Alert(
                    key=breach.firing_key, group=breach.firing_key, kind="threshold", status="firing",
                    severity=rule.severity,
                    title=f"{signal.title}: {reading.subject}",
                    text=f"{reading.text}; threshold {format_value(reading.limit, unit)} "
                    f"(breached for {now - breach.since:.0f} s)",
                    fields={"Rule": signal.rule, "Subject": reading.subject,
                            "Value": format_value(reading.value, unit),
                            "Threshold": format_value(reading.limit, unit)},
                    created_at=now,
                    dashboard=self._dashboard(**subject_variables(signal.subject, reading.subject)),
                )
            )

    def _cleared(self, key: tuple[str, str], now: float) -> None:
        breach = self.breaches[key]
        if breach.firing_key is None:
            del self.breaches[key]
            return
        if breach.clear_since is None:
            breach.clear_since = now
        rule_name, subject = key
        rule: RuleConfig = self.rules.rule(rule_name)
        if now - breach.clear_since >= rule.resolve_after_seconds:
            del self.breaches[key]
            signal = BY_RULE[rule_name]
            limit = format_value(breach.limit, signal.unit)
            self.dispatcher.submit(
                Alert(
                    key=f"{breach.firing_key}:resolved", group=breach.firing_key, kind="threshold",
                    status="resolved", severity=rule.severity,
                    title=f"Resolved: {signal.title.lower()}: {subject}",
                    text=f"{subject} is back under {limit} for {now - breach.clear_since:.0f} s",
                    fields={"Rule": rule_name, "Subject": subject, "Threshold": limit},
                    created_at=now,
                    dashboard=self._dashboard(**subject_variables(signal.subject, subject)),
                )
            )


def _bound(mapping: dict, size: int) -> None:
    """Forget the oldest entries of an insertion-ordered dict beyond `size`."""
    while len(mapping) > size:
        mapping.pop(next(iter(mapping)))

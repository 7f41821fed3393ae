"""Wires the parts of `celery-sidecar run` together and runs them until stopped.

The data path, one way: monitor/intake/ (consumer.py for events, probes.py for queues and
workers) → monitor/boundary/ → monitor/fold/ (pipeline.py, state.py) → monitor's read API
(view.py snapshots, sinks.py updates) → {exporters/, alerts/ rules → alerts/delivery/}.
This module is the only one that knows every part; nothing imports it.

Threads: intake (events → pipeline), ticker (liveness, alert evaluation, once a second),
queue and inspect probes, config reloader, prerender, HTTP server, and the alert
dispatcher's delivery thread. Only the intake thread touches the event path.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import ProcessCollector

from celery_sidecar.alerts.delivery.slack import SlackSettings
from celery_sidecar.exporters.collectors import StateCollector
from celery_sidecar.exporters.controls import check_controls
from celery_sidecar.exporters.event_metrics import EventMetrics
from celery_sidecar.exporters.exposition import Exposition
from celery_sidecar.exporters.http import HttpServer
from celery_sidecar.exporters.ovalmoney import OvalMoneyCollector
from celery_sidecar.exporters.task_classes import TaskClassCollector
from celery_sidecar.monitor.advice import TaskEventsCheck
from celery_sidecar.monitor.config.app_settings import AppDefaults
from celery_sidecar.monitor.config.reload import ConfigReloader, describe_thresholds
from celery_sidecar.monitor.config.settings import Config, LiveConfig
from celery_sidecar.monitor.fold.pipeline import Pipeline
from celery_sidecar.monitor.fold.state import State
from celery_sidecar.monitor.fold.status import Status
from celery_sidecar.monitor.intake.consumer import Intake
from celery_sidecar.monitor.intake.event_queue import EventQueue
from celery_sidecar.monitor.intake.probes import Poller, make_queue_probe, redis_client
from celery_sidecar.monitor.view import StateView

log = logging.getLogger(__name__)

# Render /metrics ahead only while someone scrapes (Prometheus scrapes every 15 s to 5 min),
# and only when a scrape would otherwise render more than ~2,000 histogram series (~15 ms).
PRERENDER_WARM_SECONDS = 600.0
PRERENDER_BACKLOG = 2000


@dataclass(frozen=True)
class RunSettings:
    """How this process runs (from flags and env vars); what it judges is the Config."""

    broker_url: str
    bind: str = "127.0.0.1"
    port: int = 9808
    config_path: Path | None = None
    transport_options: dict[str, Any] = field(default_factory=dict)
    broker_use_ssl: Any = None  # celery's broker_use_ssl: the TLS options of every broker connection
    app: AppDefaults = field(default_factory=AppDefaults)
    fast_path: bool = True
    enable_events: bool = False
    probe_interval: float = 5.0
    inspect_interval: float = 30.0
    probe_timeout: float = 3.0
    reload_interval: float = 1.0
    compat: tuple[str, ...] = ()
    namespace: str = "celery"
    alerts: bool = True
    slack: SlackSettings = field(default_factory=SlackSettings)
    event_queue: EventQueue = field(default_factory=EventQueue)
    state_dir: Path = Path(".")
    instance_id: str = "sidecar"
    app_sent_event: bool | None = None  # the app's task_send_sent_event; None: no app loaded
    static_labels: tuple[tuple[str, str], ...] = ()  # on every series of /metrics (--static-label)


class Sidecar:
    def __init__(self, settings: RunSettings, config: Config) -> None:
        self.settings = settings
        try:
            check_controls(config)  # what the schema cannot check: the families the controls name
        except ValueError as exc:
            raise ValueError(f"{settings.config_path or 'the config'}: {exc}") from None
        self.config = LiveConfig(config)
        self.status = Status(config_path=str(settings.config_path) if settings.config_path else None)
        self.state = State(self.config, app=settings.app)
        self.pipeline = Pipeline(self.state, self.status)
        self.view = StateView(self.pipeline)
        self.event_metrics = EventMetrics(self.config, settings.static_labels)
        self.pipeline.add_sink(self.event_metrics)
        self.intake = Intake(settings.broker_url, settings.transport_options, self.pipeline,
                             fast_path=settings.fast_path, event_queue=settings.event_queue,
                             ssl_options=settings.broker_use_ssl)
        self.pipeline.add_sink(TaskEventsCheck(self.state, settings.enable_events, self.intake.app,
                                               app_sent_event=settings.app_sent_event))
        self.poller = Poller(
            queue_probe=make_queue_probe(settings.broker_url, settings.transport_options, settings.probe_timeout,
                                         settings.broker_use_ssl),
            app=self.intake.app,
            pipeline=self.pipeline,
            interval=settings.probe_interval,
            inspect_interval=settings.inspect_interval,
            timeout=settings.probe_timeout,
        )
        # /metrics: the fast task metrics, then every collector registered here.
        self.registry = Exposition(self.event_metrics.exposition, lambda: self.event_metrics.render_errors,
                                   self.config, settings.static_labels)
        checks = [check_controls]
        self.alerts = None
        if settings.alerts:
            self.alerts, dispatcher = self._build_alerts()
            checks.append(dispatcher.check)
        self.registry.register(StateCollector(self.view, self.config))
        self.registry.register(TaskClassCollector(self.event_metrics, self.config))
        if "ovalmoney" in settings.compat:
            self.registry.register(OvalMoneyCollector(self.event_metrics, self.view, settings.namespace))
        ProcessCollector(registry=self.registry)
        self.http = HttpServer(settings.bind, settings.port, self.registry.render, self.health)
        self.reloader = (
            ConfigReloader(settings.config_path, self.config, self.status.reload_result, checks,
                           settings.reload_interval)
            if settings.config_path
            else None
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _build_alerts(self):
        from celery_sidecar.alerts.beat_alerts import BeatAlerts
        from celery_sidecar.alerts.delivery.dispatcher import build_dispatcher
        from celery_sidecar.alerts.delivery.outbox import open_outbox
        from celery_sidecar.alerts.engine import AlertEngine
        from celery_sidecar.alerts.stuck_lost import InFlightAlerts

        settings = self.settings
        dispatcher = build_dispatcher(
            self.config, settings.slack,
            open_outbox(settings.broker_url, settings.state_dir,
                        redis_client(settings.broker_url, settings.transport_options, settings.broker_use_ssl, 5.0)),
            registry=self.registry, instance_id=settings.instance_id,
        )
        engine = AlertEngine(self.config, self.view, dispatcher)
        self.pipeline.add_sink(engine)
        self.pipeline.add_sink(InFlightAlerts(self.config, self.view, dispatcher))
        self.pipeline.add_sink(BeatAlerts(self.config, self.view, dispatcher))
        return engine, dispatcher

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        log.info("thresholds: %s", describe_thresholds(self.config.current))
        log.info(
            "latency is measured from task-sent when the app sends those events "
            "(task_send_sent_event=True), else from task-received; see /health"
        )
        self.http.start()
        log.info("serving /metrics and /health on http://%s:%d", self.settings.bind, self.http.port)
        if self.alerts is not None:
            self.alerts.start()  # logs where alerts go
        else:
            log.info("alerts are off (--no-alerts): nothing is sent to Slack or the log")
        self.poller.start()
        if self.reloader:
            self.reloader.start()
        for name, target in (("intake", self.intake.run), ("ticker", self._tick_loop),
                             ("prerender", self._prerender_loop)):
            thread = threading.Thread(target=target, args=(self._stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.poller.stop()
        if self.reloader:
            self.reloader.stop()
        if self.alerts is not None:
            self.alerts.stop()
        self.http.stop()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop.wait(timeout)

    def _tick_loop(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            self.pipeline.tick()

    def _prerender_loop(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            self.event_metrics.prerender(PRERENDER_WARM_SECONDS, PRERENDER_BACKLOG)

    # -- /health --------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        snap = self.view.snapshot()
        intake, config = snap.intake, snap.config
        # A stopped reloader means edits are silently ignored: not healthy, whatever the broker.
        reloader = self.reloader.health() if self.reloader else None
        reloading = reloader is None or bool(reloader["running"])
        body = {
            "status": ("broker unreachable" if not intake.connected else
                       "ok" if reloading else "config reloader stopped"),
            "broker": {
                "url": intake.broker,
                "connected": intake.connected,
                "intake": intake.path,
                "intake_reason": self.intake.path_reason,  # why this path (and, on the stock path, if unpatched)
                "reconnects": intake.reconnects,
                "attempts": self.intake.failed_attempts,  # since the last connection
                "last_error": intake.last_error,
            },
            "events": {"consumed": sum(intake.events_by_type.values()),
                       "skipped": sum(intake.skipped_by_reason.values())},
            "last_event_age_seconds": (
                None if intake.last_event_at is None else round(snap.at - intake.last_event_at, 3)
            ),
            "latency_source": intake.latency_source,
            "config": {
                "path": config.path,
                "valid": config.error is None,
                "error": config.error,
                "reloads": config.reloads,
                "reloader": reloader,
            },
            "workers": {w.hostname: ("up" if w.alive else "down") for w in snap.workers},
            "uptime_seconds": round(time.time() - snap.started_at, 1),
        }
        return intake.connected and reloading, body

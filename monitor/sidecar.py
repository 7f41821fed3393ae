"""Wires the parts of `celery-sidecar run` together and runs them until stopped.

Threads: intake (events → pipeline), ticker (liveness, alert evaluation, once a
second), probe poller (queue lengths, worker inspection), config reloader, HTTP server,
and the alert dispatcher's delivery thread. Only the intake thread touches the event path.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector

from exporters.collectors import QueueCollector, SidecarCollector, ThresholdCollector, WorkerCollector
from exporters.event_metrics import EventMetrics
from exporters.http import HttpServer
from exporters.ovalmoney import OvalMoneyCollector
from exporters.probes import Poller, WorkerInfo, make_queue_probe
from monitor.config import Config
from monitor.events_check import TaskEventsCheck
from monitor.intake import Intake
from monitor.pipeline import Pipeline
from monitor.reload import ConfigReloader, describe_thresholds
from monitor.state import State
from monitor.status import Status

log = logging.getLogger(__name__)

# Render /metrics ahead only while someone scrapes (Prometheus scrapes every 15 s to 5 min),
# and only when a scrape would otherwise render more than ~2,000 histogram series (~15 ms).
PRERENDER_WARM_SECONDS = 600.0
PRERENDER_BACKLOG = 2000


@dataclass(frozen=True)
class SlackSettings:
    webhook_url: str | None = None
    bot_token: str | None = None
    channel: str | None = None
    base_url: str | None = None  # a Slack-compatible API base, for tests and proxies


@dataclass(frozen=True)
class RunSettings:
    broker_url: str
    bind: str = "127.0.0.1"
    port: int = 9808
    config_path: Path | None = None
    transport_options: dict[str, Any] = field(default_factory=dict)
    fast_path: bool = True
    enable_events: bool = False
    probe_interval: float = 5.0
    inspect_interval: float = 30.0
    probe_timeout: float = 3.0
    reload_interval: float = 1.0
    compat: tuple[str, ...] = ()
    namespace: str = "celery"
    alerts: bool = True
    slack: SlackSettings = SlackSettings()
    state_dir: Path = Path(".")
    instance_id: str = "sidecar"


class Sidecar:
    def __init__(self, settings: RunSettings, config: Config) -> None:
        self.settings = settings
        self.config = config
        self.status = Status(config_path=str(settings.config_path) if settings.config_path else None)
        self.state = State(config)
        self.event_metrics = EventMetrics(config)
        self.events_check = TaskEventsCheck(self.state, settings.enable_events)
        self.pipeline = Pipeline(self.state, [self.event_metrics, self.events_check])
        self.intake = Intake(
            settings.broker_url, settings.transport_options, self.pipeline, self.status,
            fast_path=settings.fast_path,
        )
        self.events_check.app = self.intake.app
        self.registry = CollectorRegistry()
        self.poller = Poller(
            queue_probe=make_queue_probe(settings.broker_url, settings.transport_options, settings.probe_timeout),
            app=self.intake.app,
            queues=self._known_queues,
            on_workers=self._on_inspected_workers,
            interval=settings.probe_interval,
            inspect_interval=settings.inspect_interval,
            timeout=settings.probe_timeout,
        )
        self.alerts = self._build_alerts() if settings.alerts else None
        # event_metrics is not registered: /metrics renders it with its fast exposition.
        for collector in (
            WorkerCollector(self.pipeline),
            QueueCollector(self.poller.readings),
            ThresholdCollector(lambda: self.config, self._known_queues),
            SidecarCollector(self.pipeline, self.status),
        ):
            self.registry.register(collector)
        if "ovalmoney" in settings.compat:
            self.registry.register(OvalMoneyCollector(self.event_metrics, self.pipeline, settings.namespace))
        ProcessCollector(registry=self.registry)
        self.http = HttpServer(
            settings.bind, settings.port, self.registry, self.health, self.event_metrics.exposition
        )
        self.reloader = (
            ConfigReloader(settings.config_path, self.apply_config, self.status, settings.reload_interval)
            if settings.config_path
            else None
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _build_alerts(self):
        from alerts.delivery import build_dispatcher
        from alerts.engine import AlertEngine

        slack = self.settings.slack
        dispatcher = build_dispatcher(
            self.config.alerts,
            webhook_url=slack.webhook_url,
            bot_token=slack.bot_token,
            default_channel=slack.channel,
            slack_base_url=slack.base_url,
            broker_url=self.settings.broker_url,
            state_dir=self.settings.state_dir,
            registry=self.registry,
            instance_id=self.settings.instance_id,
        )
        engine = AlertEngine(self.config, self.state, dispatcher, self.poller.readings)
        self.pipeline.add_sink(engine)
        return engine

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        log.info("thresholds: %s", describe_thresholds(self.config))
        log.info(
            "latency is measured from task-sent when the app sends those events "
            "(task_send_sent_event=True), else from task-received; see /health"
        )
        self.http.start()
        log.info("serving /metrics and /health on http://%s:%d", self.settings.bind, self.http.port)
        if self.alerts is not None:
            self.alerts.start()
        self.poller.start()
        if self.reloader:
            self.reloader.start()
        for name, target in (("intake", self.intake.run), ("ticker", self._tick_loop),
                             ("prerender", self._prerender_loop)):
            thread = threading.Thread(target=target, args=(self._stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

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

    # -- shared reads and updates -------------------------------------------------------

    def apply_config(self, config: Config) -> None:
        """Swap in a new config; ValueError (bad alert templates or channels) changes nothing."""
        with self.pipeline.lock:
            if self.alerts is not None:
                self.alerts.reconfigure(config)  # validates first: raises before anything changed
            self.config = config
            self.state.reconfigure(config)
            self.event_metrics.reconfigure(config)

    def _known_queues(self) -> list[str]:
        with self.pipeline.lock:
            return self.state.known_queues()

    def _on_inspected_workers(self, info: dict[str, WorkerInfo]) -> None:
        with self.pipeline.lock:
            for hostname, worker_info in info.items():
                worker = self.state.workers.get(hostname)
                if worker is not None:
                    worker.queues = worker_info.queues
                    if worker_info.pool_max:
                        worker.pool_max = worker_info.pool_max

    def health(self) -> tuple[bool, dict[str, Any]]:
        status, counters = self.status, self.state.counters
        now = time.time()
        body = {
            "status": "ok" if status.connected else "broker unreachable",
            "broker": {
                "url": status.broker,
                "connected": status.connected,
                "intake": status.intake,
                "reconnects": status.reconnects,
                "last_error": status.last_error,
            },
            "last_event_age_seconds": (
                None if counters.last_event_at is None else round(now - counters.last_event_at, 3)
            ),
            "latency_source": self.state.latency_source(now),
            "config": {
                "path": status.config_path,
                "valid": status.config_error is None,
                "error": status.config_error,
                "reloads": dict(status.reloads),
            },
            "workers": {h: ("up" if w.alive else "down") for h, w in list(self.state.workers.items())},
            "uptime_seconds": round(now - status.started_at, 1),
        }
        return status.connected, body

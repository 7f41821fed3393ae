"""The sidecar's data path in-process, without threads or sockets: config → state →
pipeline → {view, event metrics}. For tests that feed events by hand, with a fake clock
(or the real one: ``now=None``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from celery_sidecar.alerts.model import Alert
from celery_sidecar.exporters.collectors import StateCollector
from celery_sidecar.exporters.event_metrics import EventMetrics
from celery_sidecar.monitor.config.app_settings import AppDefaults
from celery_sidecar.monitor.config.settings import Config, LiveConfig, parse_config
from celery_sidecar.monitor.fold.pipeline import Pipeline, Sink
from celery_sidecar.monitor.fold.state import State
from celery_sidecar.monitor.fold.status import Status
from celery_sidecar.monitor.intake.consumer import Intake
from celery_sidecar.monitor.view import StateView
from tests.support.tier import require_e2e


class Recorder:
    """A dispatcher that keeps what the alert sinks submit."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def start(self) -> None: ...
    def stop(self, timeout: float = 5.0) -> None: ...

    def submit(self, alert: Alert) -> None:
        self.alerts.append(alert)


@dataclass
class DataPath:
    config: LiveConfig
    state: State
    pipeline: Pipeline
    view: StateView
    metrics: EventMetrics
    now: list[float] = field(default_factory=lambda: [0.0])  # the fake clock; set with .at()

    @classmethod
    def build(cls, config: Config | dict[str, Any] | None = None, now: float | None = 0.0,
              sinks: Iterable[Sink] = (), app: AppDefaults | None = None) -> DataPath:
        cfg = config if isinstance(config, Config) else parse_config(config or {})
        live = LiveConfig(cfg)
        clock_value = [now or 0.0]
        clock: Callable[[], float] = time.time if now is None else lambda: clock_value[0]
        state = State(live, clock=clock, app=app)
        pipeline = Pipeline(state, Status(), clock=clock)
        metrics = EventMetrics(live)
        pipeline.add_sink(metrics)
        for sink in sinks:
            pipeline.add_sink(sink)
        return cls(live, state, pipeline, StateView(pipeline), metrics, clock_value)

    def at(self, now: float) -> DataPath:
        self.now[0] = now
        return self

    def handle(self, *events: dict[str, Any]) -> None:
        for event in events:
            self.pipeline.handle(event)

    def families(self) -> dict[str, Any]:
        """The scrape-time families, by name (one snapshot, as a scrape takes it)."""
        return {f.name: f for f in StateCollector(self.view, self.config).collect()}


class Consumer:
    """One event path (intake → pipeline → state and event metrics) on a thread, against a
    real broker: the sidecar without its HTTP server, probes and alerts."""

    def __init__(self, url: str, fast_path: bool, transport_options: dict[str, Any] | None = None,
                 ssl_options: dict[str, Any] | None = None) -> None:
        require_e2e("an event consumer on a broker")
        self.path = DataPath.build(now=None)
        self.state, self.metrics, self.pipeline = self.path.state, self.path.metrics, self.path.pipeline
        self.status = self.pipeline.status
        self.intake = Intake(url, transport_options or {}, self.pipeline, fast_path=fast_path, ssl_options=ssl_options)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.intake.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> Consumer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)

    def events(self) -> int:
        return sum(self.state.counters.events_by_type.values())

    def skipped(self) -> int:
        return sum(self.state.counters.skipped_by_reason.values())

    def taken_in(self) -> int:
        return self.events() + self.skipped()

"""The read API of state: immutable snapshots, taken under the pipeline lock.

The exporters, the alert engine, /health and the demo read state only through
``StateView.snapshot()``. A snapshot copies what they need in one short critical
section (O(workers + task names + queues), never O(in-flight tasks)) and is then read
without any lock, so a slow scrape or a slow Slack call cannot stall the event thread,
and no reader can see a half-applied event.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery_sidecar.monitor.pipeline import Pipeline
from celery_sidecar.monitor.state import QueueReading


@dataclass(frozen=True, slots=True)
class WorkerView:
    hostname: str
    alive: bool
    active: int
    pool_max: int | None
    cpu_percent: float | None
    memory_percent: float | None
    rss_bytes: float | None
    queues: tuple[str, ...]
    task_events_enabled: bool


@dataclass(frozen=True, slots=True)
class IntakeView:
    """The event consumer: what it took in and how it is connected."""

    path: str  # "stock", "redis-fast", "amqp-fast"
    broker: str  # redacted URL
    connected: bool
    reconnects: int
    last_error: str | None
    events_by_type: dict[str, int]
    skipped_by_reason: dict[str, int]
    last_event_at: float | None
    last_event_lag: float
    tasks_in_memory: int
    latency_source: str  # "sent" or "received"


@dataclass(frozen=True, slots=True)
class ConfigView:
    path: str | None
    error: str | None  # the refused edit, while the previous config stays live
    reloads: dict[str, int]


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float
    started_at: float
    workers: tuple[WorkerView, ...]
    retries: dict[str, tuple[int, int]]  # task name -> (retries, outcomes) in the retry window
    latency_p95: dict[str, float | None]  # task class -> p95 queue wait in the latency window
    queues: dict[str, QueueReading]  # the queue probe's last readings
    queue_probe_at: float | None
    probe_errors: dict[str, int]
    known_queues: tuple[str, ...]
    intake: IntakeView
    config: ConfigView
    last_tick_at: float | None  # when liveness and time-based alerts were last evaluated

    def retry_ratio(self, name: str) -> float | None:
        hits, total = self.retries.get(name, (0, 0))
        return hits / total if total else None


class StateView:
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def snapshot(self, now: float | None = None) -> Snapshot:
        pipeline = self._pipeline
        now = pipeline.clock() if now is None else now
        status = pipeline.status
        with pipeline.lock:
            state = pipeline.state
            counters = state.counters
            workers = tuple(
                WorkerView(w.hostname, w.alive, w.active, w.pool_max, w.cpu_percent, w.memory_percent,
                           w.rss_bytes, w.queues, not state.task_events_missing(w, now))
                for w in state.workers.values()
            )
            retries = {name: window.counts(now) for name, window in state.retry_windows.items()}
            latency = {c: window.quantile(0.95, now) for c, window in state.latency_windows.items()}
            intake = IntakeView(
                path=status.intake, broker=status.broker, connected=status.connected,
                reconnects=status.reconnects, last_error=status.last_error,
                events_by_type=dict(counters.events_by_type), skipped_by_reason=dict(counters.skipped_by_reason),
                last_event_at=counters.last_event_at, last_event_lag=counters.last_event_lag,
                tasks_in_memory=len(state.tasks), latency_source=state.latency_source(now),
            )
            snap = Snapshot(
                at=now, started_at=status.started_at, workers=workers, retries=retries, latency_p95=latency,
                queues=dict(state.queue_readings), queue_probe_at=state.queue_probe_at,
                probe_errors=dict(state.probe_errors), known_queues=tuple(state.known_queues()),
                intake=intake,
                config=ConfigView(status.config_path, status.config_error, dict(status.reloads)),
                last_tick_at=pipeline.last_tick_at,
            )
        return snap

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
from celery_sidecar.monitor.state import MAX_STUCK, QueueReading, Unacked


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
class QueueAge:
    seconds: float  # how long the oldest task sent to the queue and not started has waited; 0: none
    task_class: str  # "normal" or "heavy": which latency threshold that task is judged against
    lower_bound: bool  # only known from when the probe first saw it (sent before the sidecar started)


@dataclass(frozen=True, slots=True)
class RunningView:
    running: int  # tasks of this name running now
    oldest_seconds: float  # the runtime so far of the one that started first
    stuck: int  # running longer than their limit (thresholds.task_runtime_seconds)


@dataclass(frozen=True, slots=True)
class StuckTask:
    uuid: str
    name: str
    hostname: str
    started_at: float  # our clock
    runtime: float
    limit: float


@dataclass(frozen=True, slots=True)
class BeatEntryView:
    entry: str
    task: str
    source: str  # "app" or "sidecar.yml"
    next_due: float
    period: float
    grace: float
    last_run: float | None  # our clock
    late: float  # how late the last run came
    missed_total: int
    missing_since: float | None  # due time of a miss no run has followed yet


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
    event_queue_messages: int | None  # AMQP: the sidecar's event queue depth


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
    queue_ages: dict[str, QueueAge]  # every known queue
    running: dict[str, RunningView]  # by task name
    stuck: tuple[StuckTask, ...]  # at most MAX_STUCK
    lost: dict[tuple[str, str], int]  # (task name, queue) -> tasks lost with their worker
    redelivered: dict[tuple[str, str], int]  # (task name, queue) -> tasks received again
    unacked: Unacked | None  # Redis only
    beat: tuple[BeatEntryView, ...]
    beat_down_since: float | None  # two entries missed since any run (monitor/beat.py)

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
                event_queue_messages=status.event_queue_messages,
            )
            cfg = state.config
            limit = state.runtime_limit
            queues = {*state.known_queues(), *state.waiting.queues()}
            queue_ages = {q: QueueAge(*state.queue_age(q, now)) for q in sorted(queues)}
            running = _capped_running(state.running.by_name(now, limit), cfg.cardinality.max_task_names)
            stuck = tuple(StuckTask(uuid, name, host, started, now - started, limit(name))
                          for uuid, name, host, started in state.running.stuck(now, limit, MAX_STUCK))
            snap = Snapshot(
                at=now, started_at=status.started_at, workers=workers, retries=retries, latency_p95=latency,
                queues=dict(state.queue_readings), queue_probe_at=state.queue_probe_at,
                probe_errors=dict(state.probe_errors), known_queues=tuple(state.known_queues()),
                intake=intake,
                config=ConfigView(status.config_path, status.config_error, dict(status.reloads)),
                last_tick_at=pipeline.last_tick_at,
                queue_ages=queue_ages, running=running, stuck=stuck, lost=dict(state.lost),
                redelivered=dict(state.redelivered), unacked=state.unacked,
                beat=tuple(BeatEntryView(name, e.entry.task, e.entry.source, e.next_due, e.period, e.grace,
                                         e.last_run, e.late, e.missed_total, e.missing_since)
                           for name, e in state.beat.entries.items()),
                beat_down_since=state.beat.down_since,
            )
        return snap


def _capped_running(rows, cap: int) -> dict[str, RunningView]:
    """Per task name, at most ``cap`` names; the rest together as 'other' (as the task series)."""
    out: dict[str, RunningView] = {}
    for name, running, oldest, stuck in rows:
        if name not in out and len(out) >= cap:
            name = "other"
            if name in out:
                was = out[name]
                running, oldest, stuck = was.running + running, max(was.oldest_seconds, oldest), was.stuck + stuck
        out[name] = RunningView(running, oldest, stuck)
    return out

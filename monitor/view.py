"""The read API of state: immutable snapshots, taken under the pipeline lock.

The exporters, the alert engine, /health and the demo read state only through
``StateView.snapshot()``. A snapshot copies what they need in one short critical
section (O(workers + task names + queues), never O(in-flight tasks)) and is then read
without any lock, so a slow scrape or a slow Slack call cannot stall the event thread,
and no reader can see a half-applied event.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from celery_sidecar.monitor.fold.pipeline import Pipeline
from celery_sidecar.monitor.fold.records import QueueReading, Unacked
from celery_sidecar.monitor.fold.state import MAX_STUCK, State
from celery_sidecar.monitor.load import Consuming, QueueLoad, consuming, queue_loads

MAX_CANDIDATES = 10_000  # tasks past their limit looked at per snapshot


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
    heard: bool  # heard since the broker was last back (a 1 on celery_worker_up needs it)


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
    confirmed: str  # how the worker confirmed it (monitor/fold/held.py): "its worker says ..."


@dataclass(frozen=True, slots=True)
class StreamView:
    """How complete the event stream is, by the workers' own counts (monitor/fold/crosscheck.py)."""

    expected: int  # task-started events the workers' heartbeats account for, since the sidecar started
    missed: int  # ... that never arrived, plus end events never seen (end_unseen)
    end_unseen: int  # running tasks their worker no longer held, closed without their end event
    by_worker: dict[str, tuple[int, int]]  # hostname -> (expected, missed)
    window_seconds: float
    window_expected: int
    window_missed: int
    window_reconnects: int
    window_lag: float  # the worst consumer lag in the window

    @property
    def window_share(self) -> float | None:
        return self.window_missed / self.window_expected if self.window_expected else None

    def likely_cause(self, intake: IntakeView) -> str:
        """What the sidecar saw that explains a loss, in words an operator can act on."""
        if self.window_reconnects:
            error = f" (last: {intake.last_disconnect})" if intake.last_disconnect else ""
            if intake.path in ("redis-fast", "stock") and "redis" in intake.broker:
                return (f"the sidecar reconnected {self.window_reconnects} time(s){error}: Redis pub/sub keeps "
                        "nothing for a subscriber that is away, and Redis drops a subscriber that falls behind "
                        "(client-output-buffer-limit pubsub)")
            return f"the sidecar reconnected {self.window_reconnects} time(s){error}: events sent meanwhile are gone"
        if self.window_lag > 10:
            return (f"the sidecar fell {self.window_lag:.0f} s behind the stream: on RabbitMQ its event queue "
                    "drops the oldest events when full (--event-queue-max-bytes, --event-queue-ttl)")
        return ("no reconnect or lag on the sidecar's side: events were lost between the workers and the "
                "broker (a worker's broker connection, or the broker itself)")


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
    last_disconnect: str | None  # what ended the last connection, after it came back
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
    beat_down_since: float | None  # two entries missed since any run (monitor/fold/beat.py)
    stream: StreamView
    end_unseen: dict[tuple[str, str], int]  # (task name, queue) -> running tasks closed without their end event
    closed_unseen: frozenset[str]  # recently closed that way: why a stuck alert resolved
    loads: dict[str, QueueLoad]  # every known queue's demand, capacity and workers desired (monitor/load.py)
    consuming: tuple[Consuming, ...]  # per live worker and queue it lists: does it take tasks from it

    def retry_ratio(self, name: str) -> float | None:
        hits, total = self.retries.get(name, (0, 0))
        return hits / total if total else None


class StateView:
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def snapshot(self, now: float | None = None) -> Snapshot:
        pipeline = self._pipeline
        # Within a tick every sink that asks gets the tick's one snapshot: the state cannot change
        # under the lock the tick holds, and a snapshot costs O(workers + names + queues).
        ticking = pipeline.ticking_thread == threading.get_ident()
        shared = pipeline.tick_snapshot if ticking else None
        if shared is not None and (now is None or now == shared.at):
            return shared
        now = pipeline.clock() if now is None else now
        status = pipeline.status
        with pipeline.lock:
            state = pipeline.state
            counters = state.counters
            workers = tuple(
                WorkerView(w.hostname, w.alive, w.active, w.pool_max, w.cpu_percent, w.memory_percent,
                           w.rss_bytes, w.queues, not state.worker_fold.task_events_missing(w, now), w.heard)
                for w in state.workers.values()
            )
            retries = {name: window.counts(now) for name, window in state.task_fold.retry_windows.items()}
            latency = {c: window.quantile(0.95, now) for c, window in state.task_fold.latency_windows.items()}
            intake = IntakeView(
                path=status.intake, broker=status.broker, connected=status.connected,
                reconnects=status.reconnects, last_error=status.last_error,
                last_disconnect=status.last_disconnect,
                events_by_type=dict(counters.events_by_type), skipped_by_reason=dict(counters.skipped_by_reason),
                last_event_at=counters.last_event_at, last_event_lag=counters.last_event_lag,
                tasks_in_memory=len(state.tasks), latency_source=state.latency_source(now),
                event_queue_messages=status.event_queue_messages,
            )
            cfg = state.config
            limit = state.runtime_limit
            queues = {*state.known_queues(), *state.task_fold.waiting.queues()}
            queue_ages = {q: QueueAge(*state.queue_age(q, now)) for q in sorted(queues)}
            loads = queue_loads(state, now, set(queues))
            waited = {q: max(age.seconds, now - state.queue_fold.nonempty_since.get(q, now))
                      for q, age in queue_ages.items()}
            stuck, stuck_by_name = _confirmed_stuck(state, now)
            rows = ((name, n, oldest, stuck_by_name.get(name, 0))
                    for name, n, oldest, _unconfirmed in state.task_fold.running.by_name(now, limit))
            running = _capped_running(rows, cfg.cardinality.max_task_names)
            snap = Snapshot(
                at=now, started_at=status.started_at, workers=workers, retries=retries, latency_p95=latency,
                queues=dict(state.queue_fold.readings), queue_probe_at=state.queue_fold.probe_at,
                probe_errors=dict(state.queue_fold.probe_errors), known_queues=tuple(state.known_queues()),
                intake=intake,
                config=ConfigView(status.config_path, status.config_error, dict(status.reloads)),
                last_tick_at=pipeline.last_tick_at,
                queue_ages=queue_ages, running=running, stuck=stuck, lost=dict(state.task_fold.lost),
                redelivered=dict(state.task_fold.redelivered), unacked=state.queue_fold.unacked,
                beat=tuple(BeatEntryView(name, e.entry.task, e.entry.source, e.next_due, e.period, e.grace,
                                         e.last_run, e.late, e.missed_total, e.missing_since)
                           for name, e in state.beat.entries.items()),
                beat_down_since=state.beat.down_since,
                stream=_stream(state), end_unseen=dict(state.task_fold.end_unseen),
                closed_unseen=frozenset(state.task_fold.held.closed),
                loads=loads, consuming=_consuming(state, now, waited, status.connected),
            )
        if ticking:
            pipeline.tick_snapshot = snap
        return snap


def _consuming(state: State, now: float, waited: dict[str, float], connected: bool) -> tuple[Consuming, ...]:
    """The zombie check's verdicts. Cut off from the broker, no receipt can be seen, and silence
    is no evidence: the verdicts stay as they were when the stream was lost (a zombie then is
    one still; nobody becomes one for the outage)."""
    if connected:
        return tuple(consuming(state, now, waited))
    blind_since = state.blind_since
    if blind_since is None:  # never connected: no worker heard yet
        return ()
    gone = now - blind_since
    return tuple(consuming(state, blind_since, {q: max(0.0, w - gone) for q, w in waited.items()}))

def _confirmed_stuck(state: State, now: float) -> tuple[tuple[StuckTask, ...], dict[str, int]]:
    """Tasks past their limit that their worker confirmed (or could not deny): no phantoms.
    (at most MAX_STUCK of them, how many per task name)."""
    held, limit = state.task_fold.held, state.runtime_limit
    found: list[StuckTask] = []
    per_name: dict[str, int] = {}
    for uuid, name, host, started in state.task_fold.running.stuck(now, limit, MAX_CANDIDATES):
        cap = limit(name)
        why = held.confirmed(uuid, host, started, cap)
        if why is not None:
            per_name[name] = per_name.get(name, 0) + 1
            if len(found) < MAX_STUCK:
                found.append(StuckTask(uuid, name, host, started, now - started, cap, why))
    return tuple(found), per_name


def _stream(state: State) -> StreamView:
    check, window = state.worker_fold.stream, state.stream_window
    expected, missed, reconnects, lag = window.delta()
    return StreamView(
        expected=check.expected, missed=check.missed, end_unseen=check.end_unseen,
        by_worker={host: (t.expected, t.missed) for host, t in check.tallies.items()},
        window_seconds=window.seconds, window_expected=expected, window_missed=missed,
        window_reconnects=reconnects, window_lag=lag,
    )


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

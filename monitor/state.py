"""Bounded fold of the Celery event stream.

``State.apply(type, fields, received)`` dispatches on the event type through a table and
returns a small update record (or None) that the exporter and the alert engine consume.
The fields come from monitor/schema.py, which has checked them: nothing here converts or
guards a value. Every structure here has a stated bound:

- in-flight tasks: LRU of ``state.max_tasks`` records (finished tasks are removed);
- workers: at most ``state.max_workers``, forgotten ``worker_forget_seconds`` after they go;
- retry/latency windows: fixed-size rings per task name (names capped by the exporter's cap)
  and per task class;
- discovered queues: 1000; task name -> queue map: 10,000 names;
- probe readings: one per known queue (the probes are intakes too: pipeline.py);
- waiting and running tasks: indexes over the in-flight LRU (monitor/inflight.py);
- recently finished or lost task ids (to tell a redelivery): an LRU of 10,000;
- lost and redelivered counts: per (task name, queue), names capped like the retry windows.

Worker liveness uses the *local* receive time of heartbeats, so clock skew between
workers and the sidecar cannot make a live worker look dead.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from celery_sidecar.monitor.app_defaults import AppDefaults
from celery_sidecar.monitor.beat import BeatTracker
from celery_sidecar.monitor.config import Config, LiveConfig
from celery_sidecar.monitor.inflight import Running, Waiting
from celery_sidecar.monitor.schema import RESOURCE_EVENT
from celery_sidecar.monitor.windows import RatioWindow, SampleWindow

log = logging.getLogger(__name__)

TASK_KINDS = ("sent", "received", "started", "succeeded", "failed", "retried", "rejected", "revoked")
WORKER_KINDS = ("online", "offline")
UNKNOWN = "unknown"
MAX_LEARNED_NAMES = 10_000
MAX_QUEUES = 1000  # discovered queues (and so queue label values) kept
MAX_RECENT = 10_000  # finished or lost task ids remembered, to recognise a redelivery
MAX_STUCK = 100  # stuck tasks reported at once (each is one alert)
_EXC_CLASS = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*[(:]?")


@dataclass(slots=True)
class TaskRecord:
    uuid: str
    name: str = UNKNOWN
    queue: str | None = None
    hostname: str | None = None
    sent_at: float | None = None
    eta_at: float | None = None
    received_at: float | None = None
    started_at: float | None = None  # our clock: when the task-started event arrived
    retries: int = 0
    retried: int = 0  # task-retried events seen; fills in when events carry no retries field
    args: str | None = None
    kwargs: str | None = None


@dataclass(slots=True)
class TaskUpdate:
    """What one task event changed; read by the exporter and the alert engine."""

    kind: str  # one of TASK_KINDS
    uuid: str
    name: str
    hostname: str
    queue: str
    timestamp: float
    runtime: float | None = None
    latency: float | None = None
    task_class: str = "normal"
    exception: str | None = None  # class name only
    exception_message: str | None = None
    traceback: str | None = None
    retries: int = 0
    args: str | None = None
    kwargs: str | None = None
    redelivered: bool = False  # received again after being received, finished or lost
    was_lost: bool = False  # ... and it had been reported lost with its worker
    entry: str | None = None  # the Beat schedule entry this task is a run of


@dataclass(slots=True)
class WorkerRecord:
    hostname: str
    first_seen: float
    last_seen: float  # local receive time of the last worker event
    freq: float = 2.0
    alive: bool = True
    offline_reason: str | None = None  # "shutdown" | "heartbeat-lost"
    went_offline_at: float | None = None
    last_heartbeat_ts: float = 0.0  # the worker's own (adjusted) timestamp: stable across sidecars
    active: int = 0
    processed: int = 0
    processed_at_first_heartbeat: int | None = None
    task_events_seen: bool = False
    events_warning_logged: bool = False
    pool_max: int | None = None
    cpu_percent: float | None = None
    memory_percent: float | None = None
    rss_bytes: float | None = None
    queues: tuple[str, ...] = ()


@dataclass(slots=True)
class WorkerUpdate:
    """A worker liveness transition: online, offline (shutdown or heartbeat-lost)."""

    kind: str  # "online" | "offline"
    hostname: str
    reason: str | None
    timestamp: float
    last_heartbeat_ts: float
    lost: tuple[tuple[str, str, str], ...] = ()  # (uuid, name, queue) of tasks it had started and not finished


@dataclass(frozen=True, slots=True)
class QueueReading:
    """A queue probe's reading of one queue."""

    length: int
    consumers: int | None  # AMQP knows its consumers; Redis does not
    tails: tuple[tuple[str, str | None], ...] = ()  # Redis: (task id, name) at the oldest end of each list


@dataclass(frozen=True, slots=True)
class Unacked:
    """Redis: messages workers have taken and not acknowledged (kombu's unacked hash)."""

    count: int
    oldest_at: float | None  # when the oldest of them was delivered (unacked_index score)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What worker inspection (remote control) says of a worker."""

    queues: tuple[str, ...]
    pool_max: int | None


@dataclass
class Counters:
    """Intake self-metrics, plain ints so the hot path stays cheap."""

    events_by_type: dict[str, int] = field(default_factory=dict)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    sent_events_seen_at: float | None = None
    last_event_at: float | None = None
    last_event_lag: float = 0.0


class State:
    def __init__(self, config: LiveConfig, clock=time.time, app: AppDefaults | None = None) -> None:
        self._live = config
        self.clock = clock
        self.app = app or AppDefaults()
        self.beat = BeatTracker()
        self._beat_config: Config | None = None
        self.tasks: OrderedDict[str, TaskRecord] = OrderedDict()
        self.workers: dict[str, WorkerRecord] = {}
        self.counters = Counters()
        limits = config.current.state
        self.retry_windows: dict[str, RatioWindow] = {}
        self.latency_windows: dict[str, SampleWindow] = {
            c: SampleWindow(limits.latency_window_seconds) for c in ("normal", "heavy")
        }
        self.discovered_queues: dict[str, float] = {}  # queue -> last seen (bounded below)
        # task name -> queue, learned from task-sent: the queue of a task whose own task-sent
        # arrived late (a worker's batched events can overtake it) or not at all.
        self.queue_of_name: dict[str, str] = {}
        # The probes' last readings: bounded by the known queues, which are bounded above.
        self.queue_readings: dict[str, QueueReading] = {}
        self.queue_probe_at: float | None = None
        self.probe_errors: dict[str, int] = {}
        # Redis: queue -> {task id at the oldest end of one of its lists: (name, first seen there)}
        self.tails: dict[str, dict[str, tuple[str | None, float]]] = {}
        self.unacked: Unacked | None = None
        self.waiting = Waiting()
        self.running = Running()
        self.recent: OrderedDict[str, tuple[int, bool]] = OrderedDict()  # uuid -> (retries, lost)
        self.lost: dict[tuple[str, str], int] = {}
        self.redelivered: dict[tuple[str, str], int] = {}
        # One handler per event type; monitor/schema.PARSERS has exactly these keys.
        self._table = {
            "task-sent": self._task_sent,
            "task-received": self._task_received,
            "task-started": self._task_started,
            "task-succeeded": self._task_succeeded,
            "task-failed": self._task_failed,
            "task-retried": self._task_retried,
            "task-rejected": self._task_rejected,
            "task-revoked": self._task_revoked,
            "worker-online": self._worker_online,
            "worker-heartbeat": self._worker_heartbeat,
            "worker-offline": self._worker_offline,
            RESOURCE_EVENT: self._worker_resources,
        }
        self.follow_beat_config(clock())

    @property
    def config(self) -> Config:
        return self._live.current

    # -- dispatch -------------------------------------------------------------------

    def apply(self, etype: str, fields: tuple, received: float) -> TaskUpdate | WorkerUpdate | None:
        """Fold one event whose fields monitor/schema.py has parsed (and so checked).

        ``received`` is our local receive time: windows and liveness run on it, so a
        skewed worker clock cannot age them.
        """
        return self._table[etype](fields, received)

    # -- tasks ----------------------------------------------------------------------

    def _record(self, uuid: str) -> TaskRecord:
        tasks = self.tasks
        rec = tasks.get(uuid)
        if rec is None:
            rec = tasks[uuid] = TaskRecord(uuid)
            if len(tasks) > self.config.state.max_tasks:
                evicted, _ = tasks.popitem(last=False)
                self.waiting.remove(evicted)
                self.running.finish(evicted)
        else:
            tasks.move_to_end(uuid)
        return rec

    def _update(self, kind: str, rec: TaskRecord, timestamp: float, hostname: str | None) -> TaskUpdate:
        # Positional: a dataclass __init__ with keywords costs twice as much, on every task event.
        update = TaskUpdate(kind, rec.uuid, rec.name, hostname or UNKNOWN,
                            rec.queue or self.queue_of_name.get(rec.name, UNKNOWN), timestamp)
        update.retries = rec.retries
        return update

    def _task_sent(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, ts, hostname, name, queue, retries, eta_at, args, kwargs = fields
        rec = self._record(uuid)
        if name:
            rec.name = name
        if queue:
            rec.queue = queue
            self._saw_queue(queue)
            if len(self.queue_of_name) < MAX_LEARNED_NAMES or rec.name in self.queue_of_name:
                self.queue_of_name[rec.name] = queue
        rec.sent_at, rec.eta_at, rec.retries = ts, eta_at, retries or 0
        rec.args, rec.kwargs = args, kwargs
        if rec.queue and rec.started_at is None:
            self.waiting.add(uuid, rec.queue, received, eta_at)
        self.counters.sent_events_seen_at = received
        # The producer's hostname, as danihodovic/celery-exporter labels task-sent.
        update = self._update("sent", rec, ts, hostname or rec.hostname)
        if self.beat.by_task:
            update.entry = self.beat.saw(uuid, rec.name, args, kwargs, received)
        return update

    def _task_received(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, ts, hostname, name, retries, eta_at, args, kwargs = fields
        again = self._received_before(uuid, retries)
        rec = self._record(uuid)
        if name:
            rec.name = name
        rec.hostname, rec.received_at = hostname, ts
        if retries is not None:
            rec.retries = retries
        if eta_at is not None:
            rec.eta_at = eta_at
        if rec.args is None:
            rec.args, rec.kwargs = args, kwargs
        if rec.sent_at is None and rec.started_at is None:
            # No task-sent seen: it waits (prefetched) from now, on the queue its name goes to.
            queue = rec.queue or self.queue_of_name.get(rec.name)
            if queue:
                self.waiting.add(uuid, queue, received, eta_at)
        self._saw_task_event(hostname)
        update = self._update("received", rec, ts, hostname)
        if self.beat.by_task:
            update.entry = self.beat.saw(uuid, rec.name, rec.args, rec.kwargs, received)
        if again is not None:
            update.redelivered, update.was_lost = True, again
            self._count(self.redelivered, rec.name, update.queue)
        return update

    def _received_before(self, uuid: str, retries: int | None) -> bool | None:
        """None for a first delivery; else whether this task had been reported lost.

        A retry is received again too, with a higher ``retries``: that is not a redelivery.
        """
        rec = self.tasks.get(uuid)
        if rec is not None and (rec.received_at is not None or rec.started_at is not None):
            return False if retries is None or retries <= rec.retries else None
        seen = self.recent.pop(uuid, None)
        if seen is None:
            return None
        was_retries, was_lost = seen
        return was_lost if retries is None or retries <= was_retries else None

    def _task_started(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, started, hostname = fields
        rec = self._record(uuid)
        rec.hostname = hostname or rec.hostname
        rec.started_at = received
        self.waiting.remove(uuid)
        self.running.start(uuid, rec.name, rec.hostname or UNKNOWN, received)
        self._saw_task_event(rec.hostname)
        update = self._update("started", rec, started, rec.hostname)
        if self.beat.by_task:
            update.entry = self.beat.saw(uuid, rec.name, rec.args, rec.kwargs, received)
        if rec.sent_at is not None:
            base = rec.sent_at if rec.eta_at is None else max(rec.sent_at, rec.eta_at)
        elif rec.received_at is not None:
            base = rec.received_at if rec.eta_at is None else max(rec.received_at, rec.eta_at)
        else:
            base = None
        if base is not None:
            latency = max(0.0, started - base)
            update.latency = latency
            update.task_class = "heavy" if self.config.is_heavy(rec.name, rec.queue) else "normal"
            self.latency_windows[update.task_class].add(received, latency)
        return update

    def _task_succeeded(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, ts, hostname, runtime = fields
        rec = self._finish(uuid, hostname)
        update = self._update("succeeded", rec, ts, rec.hostname)
        update.runtime = runtime
        self._retry_window(rec.name).add(received, hit=False)
        return update

    def _task_failed(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, ts, hostname, exception, traceback = fields
        rec = self._finish(uuid, hostname)
        update = self._update("failed", rec, ts, rec.hostname)
        update.entry = self.beat.entry_of(uuid)
        update.exception, update.exception_message = split_exception(exception)
        update.traceback = traceback
        update.args, update.kwargs = rec.args, rec.kwargs
        self._retry_window(rec.name).add(received, hit=False)
        return update

    def _task_retried(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, ts, hostname, exception, _traceback = fields
        rec = self._record(uuid)
        rec.hostname = hostname or rec.hostname
        # Back to its queue: its next run is a new task-sent/received/started.
        rec.started_at = None
        self.running.finish(uuid)
        self._saw_task_event(rec.hostname)
        update = self._update("retried", rec, ts, rec.hostname)
        update.exception, update.exception_message = split_exception(exception)
        # The retry's task-received (with the authoritative `retries`) may arrive before this event.
        rec.retried += 1
        rec.retries = max(rec.retries, rec.retried)
        self._retry_window(rec.name).add(received, hit=True)
        return update

    def _task_rejected(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, ts, hostname = fields
        rec = self._finish(uuid, hostname)
        return self._update("rejected", rec, ts, rec.hostname)

    def _task_revoked(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, ts, hostname = fields
        rec = self._finish(uuid, hostname)
        return self._update("revoked", rec, ts, rec.hostname)

    def _finish(self, uuid: str, hostname: str | None) -> TaskRecord:
        rec = self.tasks.pop(uuid, None)
        if rec is None:
            rec = TaskRecord(uuid)
        rec.hostname = hostname or rec.hostname
        self.waiting.remove(uuid)
        self.running.finish(uuid)
        self._remember(uuid, rec.retries, lost=False)
        self._saw_task_event(rec.hostname)
        return rec

    def _remember(self, uuid: str, retries: int, lost: bool) -> None:
        recent = self.recent
        recent[uuid] = (retries, lost)
        recent.move_to_end(uuid)
        if len(recent) > MAX_RECENT:
            recent.popitem(last=False)

    def _count(self, counts: dict[tuple[str, str], int], name: str, queue: str) -> None:
        """Count per (name, queue); names past the task-name cap count as 'other'. Rare events
        (a lost or redelivered task), so the cap is checked by looking, not by bookkeeping."""
        names = {n for n, _ in counts}
        if name not in names and len(names) >= self.config.cardinality.max_task_names:
            name = "other"
        if queue not in self.discovered_queues:
            queue = UNKNOWN if len(counts) >= MAX_QUEUES else queue
        counts[(name, queue)] = counts.get((name, queue), 0) + 1

    def _retry_window(self, name: str) -> RatioWindow:
        window = self.retry_windows.get(name)
        if window is None:
            if len(self.retry_windows) >= self.config.cardinality.max_task_names:
                name = "other"
                window = self.retry_windows.get(name)
            if window is None:
                window = self.retry_windows[name] = RatioWindow(self.config.state.retry_window_seconds)
        return window

    def _saw_queue(self, queue: str) -> None:
        known = self.discovered_queues
        if queue not in known and len(known) >= MAX_QUEUES:
            return
        known[queue] = self.clock()

    def _saw_task_event(self, hostname: str | None) -> None:
        worker = self.workers.get(hostname) if hostname else None
        if worker is not None and not worker.task_events_seen:
            worker.task_events_seen = True

    # -- workers --------------------------------------------------------------------

    def _worker(self, hostname: str, ts: float, freq: float | None,
                now: float) -> tuple[WorkerRecord, WorkerUpdate | None]:
        worker = self.workers.get(hostname)
        came_back = None
        if worker is None:
            if len(self.workers) >= self.config.state.max_workers:
                self._evict_oldest_dead_worker()
            worker = self.workers[hostname] = WorkerRecord(hostname, first_seen=now, last_seen=now)
            came_back = WorkerUpdate("online", hostname, "new", now, ts)
        elif not worker.alive:
            came_back = WorkerUpdate("online", hostname, worker.offline_reason, now, ts)
            worker.alive, worker.offline_reason, worker.went_offline_at = True, None, None
        worker.last_seen = now
        worker.last_heartbeat_ts = ts
        if freq:
            worker.freq = freq
        return worker, came_back

    def _worker_online(self, fields: tuple, received: float) -> WorkerUpdate | None:
        worker, update = self._worker(*fields, received)
        # A worker that just came online has processed nothing: the baseline for telling
        # whether it works without sending task events (tasks may finish before a heartbeat).
        worker.processed_at_first_heartbeat = 0
        return update

    def _worker_heartbeat(self, fields: tuple, received: float) -> WorkerUpdate | None:
        hostname, ts, freq, active, processed = fields
        worker, update = self._worker(hostname, ts, freq, received)
        worker.active = active or 0
        worker.processed = processed or 0
        if worker.processed_at_first_heartbeat is None:
            worker.processed_at_first_heartbeat = worker.processed
        return update

    def _worker_offline(self, fields: tuple, received: float) -> WorkerUpdate | None:
        worker, _ = self._worker(*fields, received)
        return self._mark_offline(worker, "shutdown", received)

    def _worker_resources(self, fields: tuple, received: float) -> WorkerUpdate | None:
        hostname, ts, freq, cpu, memory, rss, pool_max = fields
        worker, update = self._worker(hostname, ts, freq, received)
        worker.cpu_percent, worker.memory_percent, worker.rss_bytes = cpu, memory, rss
        if pool_max is not None:
            worker.pool_max = pool_max
        return update

    def _mark_offline(self, worker: WorkerRecord, reason: str, now: float) -> WorkerUpdate | None:
        if not worker.alive:
            return None
        worker.alive, worker.offline_reason, worker.went_offline_at = False, reason, now
        worker.active = 0
        return WorkerUpdate("offline", worker.hostname, reason, now, worker.last_heartbeat_ts,
                            lost=self._lose(worker.hostname))

    def _lose(self, hostname: str) -> tuple[tuple[str, str, str], ...]:
        """The tasks ``hostname`` had started and not finished: lost with it (or, with acks_late,
        to be redelivered later). They leave the in-flight state; their ids are remembered."""
        lost = []
        for uuid in self.running.on_host(hostname):
            self.running.finish(uuid)
            rec = self.tasks.pop(uuid, None)
            name = rec.name if rec else UNKNOWN
            queue = (rec.queue if rec else None) or self.queue_of_name.get(name, UNKNOWN)
            self._remember(uuid, rec.retries if rec else 0, lost=True)
            self._count(self.lost, name, queue)
            lost.append((uuid, name, queue))
        return tuple(lost)

    def _evict_oldest_dead_worker(self) -> None:
        dead = [w for w in self.workers.values() if not w.alive]
        victim = min(dead or self.workers.values(), key=lambda w: w.last_seen)
        del self.workers[victim.hostname]

    def tick(self, now: float | None = None) -> tuple[list[WorkerUpdate], list[str]]:
        """Time-driven transitions: heartbeats lost, and dead workers forgotten.

        Returns (offline updates, forgotten hostnames). Called about once a second.
        """
        now = self.clock() if now is None else now
        self.follow_beat_config(now)
        self.beat.tick(now)
        limits = self.config.state
        went_offline: list[WorkerUpdate] = []
        forgotten: list[str] = []
        for worker in list(self.workers.values()):
            if worker.alive and now - worker.last_seen > 2 * worker.freq + limits.heartbeat_grace_seconds:
                update = self._mark_offline(worker, "heartbeat-lost", now)
                if update:
                    went_offline.append(update)
            elif not worker.alive and now - (worker.went_offline_at or now) > limits.worker_forget_seconds:
                del self.workers[worker.hostname]
                forgotten.append(worker.hostname)
        return went_offline, forgotten

    def task_events_missing(self, worker: WorkerRecord, now: float) -> bool:
        """A live worker that processes tasks but sends no task events (no ``-E``)."""
        if worker.task_events_seen or not worker.alive:
            return False
        did_work = worker.active > 0 or (
            worker.processed_at_first_heartbeat is not None
            and worker.processed > worker.processed_at_first_heartbeat
        )
        waited = now - worker.first_seen >= min(self.config.state.task_events_grace_seconds, 3 * worker.freq)
        return did_work and waited

    # -- periodic tasks ------------------------------------------------------------

    def follow_beat_config(self, now: float) -> None:
        """Watch the Beat entries of the config in force (and the app's), once it changed."""
        config = self.config
        if config is not self._beat_config:
            self._beat_config = config
            self.beat.configure(self.app.beat_entries(config), now)

    def runtime_limit(self, task_name: str) -> float:
        return self.app.runtime_limit(self.config, task_name)

    # -- probe results ---------------------------------------------------------------

    def record_queues(self, readings: dict[str, QueueReading], at: float, unacked: Unacked | None = None) -> None:
        known = set(self.known_queues())
        self.queue_readings = {q: r for q, r in {**self.queue_readings, **readings}.items() if q in known}
        self.queue_probe_at = at
        for queue, reading in readings.items():
            if not reading.tails or queue not in known:
                self.tails.pop(queue, None)
                continue
            seen = self.tails.get(queue, {})
            self.tails[queue] = {tid: seen.get(tid, (name, at)) for tid, name in reading.tails}
        if unacked is not None:
            self.unacked = unacked

    def record_inspection(self, info: dict[str, WorkerInfo]) -> None:
        for hostname, worker_info in info.items():
            worker = self.workers.get(hostname)
            if worker is not None:
                worker.queues = worker_info.queues[:100]
                if worker_info.pool_max:
                    worker.pool_max = worker_info.pool_max

    def probe_failed(self, probe: str) -> None:
        self.probe_errors[probe] = self.probe_errors.get(probe, 0) + 1

    # -- queries ------------------------------------------------------------------------

    def queue_age(self, queue: str, now: float) -> tuple[float, str, bool]:
        """(how long the oldest task sent to ``queue`` and not started has waited, its task
        class, whether that is only a lower bound). 0 for an empty queue.

        From the in-flight tasks (task-sent seen), and on Redis from the task at the oldest
        end of the list: when the sidecar never saw that one sent (it is older than the
        sidecar), its age counts from when the probe first saw it there: a lower bound.
        """
        age, uuid = self.waiting.oldest(queue, now)
        name, lower = None, False
        for tid, (tail_name, first_seen) in self.tails.get(queue, {}).items():
            # One the sidecar saw sent is in the waiting index already, with its real age.
            if tid not in self.tasks and now - first_seen > age:
                age, uuid, name, lower = now - first_seen, tid, tail_name, True
        if uuid is not None and name is None:
            rec = self.tasks.get(uuid)
            name = rec.name if rec is not None else None
        heavy = uuid is not None and self.config.is_heavy(name, queue)
        return age, "heavy" if heavy else "normal", lower

    def latency_source(self, now: float | None = None) -> str:
        seen = self.counters.sent_events_seen_at
        now = self.clock() if now is None else now
        if seen is not None and now - seen <= self.config.state.latency_window_seconds:
            return "sent"
        return "received"

    def known_queues(self) -> list[str]:
        queues = set(self.config.queues) | set(self.discovered_queues) | set(self.app.queues)
        for worker in self.workers.values():
            queues.update(worker.queues)
        return sorted(queues)


def split_exception(text: Any) -> tuple[str | None, str | None]:
    """'ValueError("bad")' -> ('ValueError', 'ValueError("bad")'): the class is the label."""
    if not text:
        return None, None
    text = str(text)
    match = _EXC_CLASS.match(text)
    return (match.group(1).rsplit(".", 1)[-1] if match else "Exception"), text

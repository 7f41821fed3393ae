"""The worker fold: which workers are alive, what they run, and what they report of themselves.

Liveness uses the *local* receive time of worker events, so clock skew between workers and
the sidecar cannot make a live worker look dead. Bound: at most ``state.max_workers``
records; a worker gone for ``worker_forget_seconds`` is forgotten.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from celery_sidecar.monitor.boundary.parse import RESOURCE_EVENT
from celery_sidecar.monitor.config.settings import Config, LiveConfig
from celery_sidecar.monitor.fold.crosscheck import StreamCheck
from celery_sidecar.monitor.fold.records import WorkerInfo, WorkerRecord, WorkerUpdate

MAX_QUEUES_PER_WORKER = 100  # as many as inspection lists for one worker

Lose = Callable[[str], tuple[tuple[str, str, str], ...]]
CheckActive = Callable[[str, int, float], None]


class WorkerFold:
    def __init__(self, config: LiveConfig, lose: Lose, check_active: CheckActive) -> None:
        self._live = config
        self._lose = lose  # the task fold's: the tasks a worker took down with it
        self._check_active = check_active  # the task fold's: does it run what we think it runs?
        self.records: dict[str, WorkerRecord] = {}
        self.stream = StreamCheck()  # heartbeats' ``processed`` against the task-started events
        self._evicted: list[str] = []  # forgotten to make room (the worker cap): told at the next tick

    @property
    def config(self) -> Config:
        return self._live.current

    def handlers(self) -> dict[str, Callable[[tuple, float], WorkerUpdate | None]]:
        return {
            "worker-online": self._online,
            "worker-heartbeat": self._heartbeat,
            "worker-offline": self._offline,
            RESOURCE_EVENT: self._resources,
        }

    def queues(self) -> Iterator[tuple[str, ...]]:
        return (worker.queues for worker in self.records.values())

    # -- handlers -----------------------------------------------------------------------

    def _worker(self, hostname: str, ts: float, freq: float | None,
                now: float) -> tuple[WorkerRecord, WorkerUpdate | None]:
        worker = self.records.get(hostname)
        came_back = None
        if worker is None:
            if len(self.records) >= self.config.state.max_workers:
                self._evict_oldest_dead()
            worker = self.records[hostname] = WorkerRecord(hostname, first_seen=now, last_seen=now, up_since=now)
            came_back = WorkerUpdate("online", hostname, "new", now, ts)
        elif not worker.alive:
            came_back = WorkerUpdate("online", hostname, worker.offline_reason, now, ts)
            worker.alive, worker.offline_reason, worker.went_offline_at = True, None, None
            worker.up_since = now
        worker.last_seen = now
        worker.heard = True
        worker.last_heartbeat_ts = ts
        if freq:
            worker.freq = freq
        return worker, came_back

    def _online(self, fields: tuple, received: float) -> WorkerUpdate | None:
        hostname, ts, freq, pid = fields
        worker, update = self._worker(hostname, ts, freq, received)
        # A worker that just came online has processed nothing: the baseline for telling
        # whether it works without sending task events (tasks may finish before a heartbeat).
        worker.processed_at_first_heartbeat = 0
        self.stream.online(hostname, ts, pid)
        return update

    def _heartbeat(self, fields: tuple, received: float) -> WorkerUpdate | None:
        hostname, ts, freq, active, processed, pid = fields
        worker, update = self._worker(hostname, ts, freq, received)
        self.stream.heartbeat(hostname, ts, processed, pid, worker.task_events_seen, received)
        if active is not None:
            worker.active = active
            self._check_active(hostname, active, received)
        # A baseline only from a count the worker sent: a reply to the sidecar's own heartbeat
        # request carries none, and a baseline of 0 would make every task the worker ran
        # before the sidecar started look like work done without task events.
        if processed is not None:
            worker.processed = processed
            if worker.processed_at_first_heartbeat is None:
                worker.processed_at_first_heartbeat = processed
        return update

    def _offline(self, fields: tuple, received: float) -> WorkerUpdate | None:
        hostname, ts, freq, _pid = fields
        worker, _ = self._worker(hostname, ts, freq, received)
        return self._mark_offline(worker, "shutdown", received)

    def _resources(self, fields: tuple, received: float) -> WorkerUpdate | None:
        hostname, ts, freq, cpu, memory, rss, pool_max = fields
        worker, update = self._worker(hostname, ts, freq, received)
        worker.cpu_percent, worker.memory_percent, worker.rss_bytes = cpu, memory, rss
        if pool_max is not None:
            worker.pool_max = pool_max
        return update

    # -- transitions ----------------------------------------------------------------------

    def _mark_offline(self, worker: WorkerRecord, reason: str, now: float) -> WorkerUpdate | None:
        if not worker.alive:
            return None
        worker.alive, worker.offline_reason, worker.went_offline_at = False, reason, now
        worker.active = 0
        return WorkerUpdate("offline", worker.hostname, reason, now, worker.last_heartbeat_ts,
                            lost=self._lose(worker.hostname))

    def _evict_oldest_dead(self) -> None:
        dead = [w for w in self.records.values() if not w.alive]
        victim = min(dead or self.records.values(), key=lambda w: w.last_seen)
        del self.records[victim.hostname]
        self.stream.forget(victim.hostname)
        self._evicted.append(victim.hostname)

    def tick(self, now: float) -> tuple[list[WorkerUpdate], list[str]]:
        """Heartbeats lost, and dead workers forgotten: (offline updates, forgotten hostnames)."""
        limits = self.config.state
        went_offline: list[WorkerUpdate] = []
        forgotten, self._evicted = self._evicted, []
        for worker in list(self.records.values()):
            if worker.alive and now - worker.last_seen > 2 * worker.freq + limits.heartbeat_grace_seconds:
                update = self._mark_offline(worker, "heartbeat-lost", now)
                if update:
                    went_offline.append(update)
            elif not worker.alive and now - (worker.went_offline_at or now) > limits.worker_forget_seconds:
                del self.records[worker.hostname]
                self.stream.forget(worker.hostname)
                forgotten.append(worker.hostname)
        self.stream.tick(now)
        return went_offline, forgotten

    def resume(self, now: float, blind_for: float) -> None:
        """The broker is back after ``blind_for`` seconds: no heartbeat could arrive meanwhile,
        so every live worker gets a fresh grace period instead of being declared dead for it.
        The zombie check (monitor/load.py) counts only time it could watch: receipts it could
        not see are no evidence, so the outage is left out of each worker's idle time (a
        zombie before it is one still; a worker that received just before it is not one)."""
        for worker in self.records.values():
            if worker.alive:
                worker.last_seen = max(worker.last_seen, now)
                worker.heard = False  # alive, as far as anyone knows: not "up" until it says so
                worker.up_since = min(worker.up_since + blind_for, now)
                received = worker.received_at
                for queue, at in received.items():
                    received[queue] = min(at + blind_for, now)

    # -- what workers say of themselves -----------------------------------------------------

    def saw_task_event(self, hostname: str | None) -> None:
        worker = self.records.get(hostname) if hostname else None
        if worker is not None and not worker.task_events_seen:
            worker.task_events_seen = True

    def saw_received(self, hostname: str, queue: str, at: float) -> None:
        """A task-received event: the worker consumes ``queue`` (the zombie check's evidence)."""
        worker = self.records.get(hostname)
        if worker is not None:
            worker.task_events_seen = True
            received = worker.received_at
            if queue in received or len(received) < MAX_QUEUES_PER_WORKER:
                received[queue] = at

    def saw_started(self, hostname: str | None, ts: float) -> None:
        """A task-started event: the worker sends task events, and one of them is counted
        against its heartbeats' ``processed``."""
        worker = self.records.get(hostname) if hostname else None
        if worker is not None:
            worker.task_events_seen = True
            self.stream.started(worker.hostname, ts)

    def record_inspection(self, info: dict[str, WorkerInfo]) -> None:
        for hostname, worker_info in info.items():
            worker = self.records.get(hostname)
            if worker is not None:
                worker.queues = worker_info.queues[:100]
                if worker_info.pool_max:
                    worker.pool_max = worker_info.pool_max

    def task_events_missing(self, worker: WorkerRecord, now: float) -> bool:
        """A live worker that processes tasks but sends no task events (no ``-E``).

        Evidence only: its own ``processed`` count (tasks it accepted) grew past a baseline it
        sent, so it started a task while the sidecar watched, and it has had time to send the
        task events of that work. ``active`` is no evidence: a task started before the sidecar
        did sent its task-started event before anyone listened."""
        if worker.task_events_seen or not worker.alive:
            return False
        did_work = (worker.processed_at_first_heartbeat is not None
                    and worker.processed > worker.processed_at_first_heartbeat)
        waited = now - worker.first_seen >= min(self.config.state.task_events_grace_seconds, 3 * worker.freq)
        return did_work and waited

"""The task fold: in-flight task records, where each task is, and the windows its events feed.

One handler per task event type; each takes the fields monitor/boundary/ has checked and
returns the ``TaskUpdate`` the sinks receive. Bounds:

- in-flight tasks: an LRU of ``state.max_tasks`` records (finished tasks are removed);
- waiting and running tasks: indexes over that LRU (monitor/fold/inflight.py);
- recently finished or lost tasks (to tell a redelivery, and whose task a late event is): an LRU
  of 10,000 ids with their name and queue;
- retry windows: one ring per task name (names capped like the task series), latency
  windows one per task class;
- task name -> queue: 10,000 names;
- lost and redelivered counts: per (task name, queue), names capped like the retry windows.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from celery_sidecar.monitor.config.settings import Config, LiveConfig
from celery_sidecar.monitor.fold.beat import BeatTracker
from celery_sidecar.monitor.fold.held import HeldCheck
from celery_sidecar.monitor.fold.inflight import Running, Waiting
from celery_sidecar.monitor.fold.pressure import QueueRates, Reserved
from celery_sidecar.monitor.fold.queues import MAX_QUEUES, QueueFold
from celery_sidecar.monitor.fold.records import UNKNOWN, TaskRecord, TaskUpdate
from celery_sidecar.monitor.fold.windows import RatioWindow, SampleWindow

MAX_LEARNED_NAMES = 10_000
MAX_RECENT = 10_000  # finished or lost task ids remembered, to recognise a redelivery
_EXC_CLASS = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*[(:]?")


class TaskFold:
    def __init__(self, config: LiveConfig, beat: BeatTracker, queues: QueueFold,
                 saw_task_event: Callable[[str | None], None],
                 saw_started: Callable[[str | None, float], None],
                 end_unseen: Callable[[str], None],
                 saw_received: Callable[[str, str, float], None],
                 route: Callable[[str], str | None] = lambda _name: None) -> None:
        self._live = config
        self.beat = beat
        self.queues = queues
        self._saw_task_event = saw_task_event  # the worker fold's: this host sends task events
        self._saw_started = saw_started  # ... and one more task-started to count against its heartbeats
        self._saw_received = saw_received  # ... and it took a task from that queue (it consumes)
        self._route = route  # the app's routes: a task's queue when no task-sent said it
        self.records: OrderedDict[str, TaskRecord] = OrderedDict()
        self.waiting = Waiting()
        self.running = Running()
        # uuid -> (retries, lost, name, queue) of tasks that ended or were lost
        self.recent: OrderedDict[str, tuple[int, bool, str, str]] = OrderedDict()
        self.lost: dict[tuple[str, str], int] = {}
        self.redelivered: dict[tuple[str, str], int] = {}
        self.end_unseen: dict[tuple[str, str], int] = {}
        limits = config.current.state
        self.retry_windows: dict[str, RatioWindow] = {}
        self.latency_windows: dict[str, SampleWindow] = {
            c: SampleWindow(limits.latency_window_seconds) for c in ("normal", "heavy")
        }
        # task name -> queue, learned from task-sent: the queue of a task whose own task-sent
        # arrived late (a worker's batched events can overtake it) or not at all.
        self.queue_of_name: dict[str, str] = {}
        self.sent_events_seen_at: float | None = None
        self.held = HeldCheck(self, end_unseen)  # running records held against the workers' word
        self.reserved = Reserved()  # received by a worker, not started: prefetched or scheduled
        self.rates = QueueRates(limits.pressure_window_seconds)

    @property
    def config(self) -> Config:
        return self._live.current

    def handlers(self) -> dict[str, Callable[[tuple, float], TaskUpdate]]:
        return {
            "task-sent": self._sent,
            "task-received": self._received,
            "task-started": self._started,
            "task-succeeded": self._succeeded,
            "task-failed": self._failed,
            "task-retried": self._retried,
            "task-rejected": self._rejected,
            "task-revoked": self._revoked,
        }

    # -- records ------------------------------------------------------------------------

    def _record(self, uuid: str) -> TaskRecord:
        tasks = self.records
        rec = tasks.get(uuid)
        if rec is None:
            rec = tasks[uuid] = TaskRecord(uuid)
            if len(tasks) > self._live.current.state.max_tasks:
                evicted, _ = tasks.popitem(last=False)
                self.waiting.remove(evicted)
                self.running.finish(evicted)
                self.reserved.remove(evicted)
        else:
            tasks.move_to_end(uuid)
        return rec

    @staticmethod
    def _update(kind: str, rec: TaskRecord, timestamp: float, hostname: str | None, queue: str) -> TaskUpdate:
        # Positional: a dataclass __init__ with keywords costs twice as much, on every task event.
        update = TaskUpdate(kind, rec.uuid, rec.name, hostname or UNKNOWN, queue, timestamp)
        update.retries = rec.retries
        return update

    def _finish(self, uuid: str, hostname: str | None, received: float,
                runtime: float | None = None) -> tuple[TaskRecord, str]:
        """The task's record, out of the in-flight state, and its queue."""
        rec = self.records.pop(uuid, None)
        if rec is None:
            rec = TaskRecord(uuid)
            seen = self.recent.get(uuid)
            if seen is not None:
                # An event after the task's final one (task-rejected after task-failed, a
                # revoke after it ended): still that task, on that queue.
                rec.name, rec.queue = seen[2], seen[3]
        rec.hostname = hostname or rec.hostname
        queue = rec.queue or self.queue_of(rec)
        if rec.started_at is None:  # only an unstarted task waits or is reserved (_started takes it out)
            self.waiting.remove(uuid)
            self.reserved.remove(uuid)
        elif self.running.finish(uuid):  # only a started one runs
            # The time one slot spent on it: the worker's own runtime when it says, else ours.
            rate = self.rates.by_queue.get(queue) or self.rates.of(queue)
            rate.runtimes.push((received, runtime if runtime is not None else received - rec.started_at))
        self._remember(uuid, rec.retries, False, rec.name, queue)
        self._saw_task_event(rec.hostname)
        return rec, queue

    def _remember(self, uuid: str, retries: int, lost: bool, name: str, queue: str) -> None:
        recent = self.recent
        recent[uuid] = (retries, lost, name, queue)
        recent.move_to_end(uuid)
        if len(recent) > MAX_RECENT:
            recent.popitem(last=False)

    # -- handlers -----------------------------------------------------------------------

    def _sent(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, ts, hostname, name, queue, retries, eta_at, args, kwargs = fields
        rec = self._record(uuid)
        if name:
            rec.name = name
        if queue:
            rec.queue = queue
            self.queues.saw(queue)
            if len(self.queue_of_name) < MAX_LEARNED_NAMES or rec.name in self.queue_of_name:
                self.queue_of_name[rec.name] = queue
        rec.sent_at, rec.eta_at, rec.retries = ts, eta_at, retries or 0
        rec.args, rec.kwargs = args, kwargs
        if rec.queue and rec.started_at is None and (queue or uuid not in self.waiting):
            # (One naming no queue leaves a task already waiting where it waits, since when it did.)
            self.waiting.add(uuid, rec.queue, received, eta_at)
        self.sent_events_seen_at = received
        # The producer's hostname, as danihodovic/celery-exporter labels task-sent.
        update = self._update("sent", rec, ts, hostname or rec.hostname, rec.queue or self.queue_of(rec))
        if self.beat.by_task:
            update.entry = self.beat.saw(uuid, rec.name, args, kwargs, received)
        return update

    def _received(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, ts, hostname, name, retries, eta_at, args, kwargs = fields
        again = self._received_before(uuid, retries)
        rec = self._record(uuid)
        if name:
            rec.name = name
        rec.hostname, rec.received_at = hostname, ts
        if retries is not None:
            rec.retries = rec.received_retries = retries
        if eta_at is not None:
            rec.eta_at = eta_at
        if rec.args is None:
            rec.args, rec.kwargs = args, kwargs
        queue = rec.queue or self.queue_of(rec)
        if queue != UNKNOWN:
            rec.queue = queue  # inferred once: the task's later events need not infer it again
        if rec.started_at is None:
            if rec.sent_at is None and queue != UNKNOWN:
                # No task-sent seen: it waits (prefetched) from now, on the queue its name goes to.
                self.waiting.add(uuid, queue, received, eta_at)
            self.reserved.add(uuid, queue, hostname, rec.eta_at, received)
        (self.rates.by_queue.get(queue) or self.rates.of(queue)).arrivals.add(received)
        self._saw_received(hostname, queue, received)
        update = self._update("received", rec, ts, hostname, queue)
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
        rec = self.records.get(uuid)
        if rec is not None and (rec.received_at is not None or rec.started_at is not None):
            # Against the retries it was last *received* with: a retry's own task-sent (same
            # retries as its coming task-received) has already raised rec.retries.
            last = rec.received_retries if rec.received_retries >= 0 else rec.retries
            return False if retries is None or retries <= last else None
        seen = self.recent.pop(uuid, None)
        if seen is None:
            return None
        was_retries, was_lost = seen[0], seen[1]
        return was_lost if retries is None or retries <= was_retries else None

    def _started(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, started, hostname = fields
        rec = self._record(uuid)
        rec.hostname = hostname or rec.hostname
        rec.started_at = received
        self.waiting.remove(uuid)
        self.reserved.remove(uuid)
        queue = rec.queue or self.queue_of(rec)
        self.running.start(uuid, rec.name, rec.hostname or UNKNOWN, received, queue)
        self._saw_started(rec.hostname, started)
        update = self._update("started", rec, started, rec.hostname, queue)
        if self.beat.by_task:
            update.entry = self.beat.saw(uuid, rec.name, rec.args, rec.kwargs, received)
        # The queue wait began when it was sent (or received, with no task-sent), or at its eta.
        base = rec.sent_at if rec.sent_at is not None else rec.received_at
        if base is not None:
            if rec.eta_at is not None and rec.eta_at > base:
                base = rec.eta_at
            latency = started - base if started > base else 0.0
            update.latency = latency
            # The queue inferred too: with task_send_sent_event off (celery's default) no task-sent names it.
            update.task_class = "heavy" if self._live.current.is_heavy(rec.name, queue) else "normal"
            self.latency_windows[update.task_class].push((received, latency))
        return update

    def _succeeded(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, ts, hostname, runtime = fields
        rec, queue = self._finish(uuid, hostname, received, runtime)
        update = self._update("succeeded", rec, ts, rec.hostname, queue)
        update.runtime = runtime
        self._retry_window(rec.name).add(received, hit=False)
        return update

    def _failed(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, ts, hostname, exception, traceback = fields
        rec, queue = self._finish(uuid, hostname, received)
        update = self._update("failed", rec, ts, rec.hostname, queue)
        update.entry = self.beat.entry_of(uuid)
        update.exception, update.exception_message = split_exception(exception)
        update.traceback = traceback
        update.args, update.kwargs = rec.args, rec.kwargs
        self._retry_window(rec.name).add(received, hit=False)
        return update

    def _retried(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, ts, hostname, exception, _traceback = fields
        rec = self._record(uuid)
        rec.hostname = hostname or rec.hostname
        # Back to its queue: its next run is a new task-sent/received/started.
        rec.started_at = None
        self.running.finish(uuid)
        self.reserved.remove(uuid)
        self._saw_task_event(rec.hostname)
        update = self._update("retried", rec, ts, rec.hostname, rec.queue or self.queue_of(rec))
        update.exception, update.exception_message = split_exception(exception)
        # The retry's task-received (with the authoritative `retries`) may arrive before this event.
        rec.retried += 1
        rec.retries = max(rec.retries, rec.retried)
        self._retry_window(rec.name).add(received, hit=True)
        return update

    def _rejected(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, ts, hostname = fields
        rec, queue = self._finish(uuid, hostname, received)
        return self._update("rejected", rec, ts, rec.hostname, queue)

    def _revoked(self, fields: tuple, received: float) -> TaskUpdate:
        uuid, ts, hostname = fields
        rec, queue = self._finish(uuid, hostname, received)
        return self._update("revoked", rec, ts, rec.hostname, queue)

    # -- running records the worker no longer holds -----------------------------------------

    def close_unseen(self, uuid: str) -> tuple[str, str, str] | None:
        """A running task its worker no longer holds, whose end event never came: closed with
        no page, counted per (name, queue). Returns (name, queue, host), or None if it ended."""
        host = self.running.host_of(uuid)
        if host is None:
            return None
        self.running.finish(uuid)
        self.reserved.remove(uuid)
        rec = self.records.pop(uuid, None)
        name = rec.name if rec else UNKNOWN
        queue = self.queue_of(rec) if rec else UNKNOWN
        self._remember(uuid, rec.retries if rec else 0, False, name, queue)
        self._count(self.end_unseen, name, queue)
        return name, queue, host

    # -- lost with a worker -------------------------------------------------------------

    def lose(self, hostname: str) -> tuple[tuple[str, str, str], ...]:
        """The tasks ``hostname`` had started and not finished: lost with it (or, with acks_late,
        to be redelivered later). They leave the in-flight state; their ids are remembered."""
        for uuid in self.reserved.on_host(hostname):
            self.reserved.remove(uuid)  # unstarted: back to the broker (unacked), not lost
        lost = []
        for uuid in self.running.on_host(hostname):
            self.running.finish(uuid)
            rec = self.records.pop(uuid, None)
            name = rec.name if rec else UNKNOWN
            queue = (rec.queue if rec else None) or self.queue_of_name.get(name, UNKNOWN)
            self._remember(uuid, rec.retries if rec else 0, True, name, queue)
            self._count(self.lost, name, queue)
            lost.append((uuid, name, queue))
        return tuple(lost)

    # -- bounded counts and windows -------------------------------------------------------

    def _count(self, counts: dict[tuple[str, str], int], name: str, queue: str) -> None:
        """Count per (name, queue); names past the task-name cap count as 'other'. Rare events
        (a lost or redelivered task), so the cap is checked by looking, not by bookkeeping."""
        names = {n for n, _ in counts}
        if name not in names and len(names) >= self.config.cardinality.max_task_names:
            name = "other"
        if queue not in self.queues.discovered:
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

    # -- queries ------------------------------------------------------------------------

    def queue_of(self, rec: TaskRecord) -> str:
        """The queue a task went to: its task-sent said (or it was inferred at task-received),
        else its name's (learned from other task-sent events, else the app's routes)."""
        return rec.queue or self.queue_of_name.get(rec.name) or self._routed(rec.name)

    def _routed(self, name: str) -> str:
        queue = self._route(name)
        if queue is None:
            return UNKNOWN
        if len(self.queue_of_name) < MAX_LEARNED_NAMES:
            self.queue_of_name[name] = queue  # once: the app's routes do not change
        return queue

    def latency_source(self, now: float) -> str:
        seen = self.sent_events_seen_at
        if seen is not None and now - seen <= self.config.state.latency_window_seconds:
            return "sent"
        return "received"


def split_exception(text: Any) -> tuple[str | None, str | None]:
    """'ValueError("bad")' -> ('ValueError', 'ValueError("bad")'): the class is the label."""
    if not text:
        return None, None
    text = str(text)
    match = _EXC_CLASS.match(text)
    return (match.group(1).rsplit(".", 1)[-1] if match else "Exception"), text

"""Queue pressure, read from the fold: each queue's whole demand against its capacity, the
workers it needs, and the workers that heartbeat but take nothing from it.

A queue's **demand** is what waits in the broker (the probe's length) plus what its workers
hold: received and not started (**reserved**; a task held for its eta or countdown is
**scheduled**, and not demand until it is due) and **running**. Prefetch moves tasks from
the first to the second, so the broker's length alone reads low exactly when the workers
are busiest; the sum does not.

Its **capacity** is the pool slots of the live workers that consume it. A worker that
consumes several queues counts its whole pool in each: any of its slots may serve any of
them, so capacity is what could serve the queue, and summing it over queues counts such a
worker more than once.

**Pressure** is demand / capacity: 1 means every slot has exactly one task; above 1, tasks
wait. With no capacity it is +Inf while anything is demanded, and 0 when nothing is.

**Workers desired** (``workers_desired``): the workers, of the queue's typical pool size,
that keep the oldest waiting task under the queue's latency threshold ``L`` (normal or heavy,
by ``heavy_queues``) at the throughput per slot measured over ``state.pressure_window_seconds``.
With ``r`` the median time a slot spends per task in the window, ``λ`` the tasks arriving per
second, ``B`` the backlog (broker length + reserved) and ``R`` the running tasks::

    slots   = max(λ·r, R) + B·r / L
    desired = ceil(slots / pool_size)

``max(λ·r, R)`` keeps up with arrivals and never asks for fewer slots than the tasks running
now (scaling in under running tasks kills them); ``B·r / L`` starts the whole backlog within
``L``. A median, so one slow task does not swing it. Every input is exported
(docs/autoscaling.md gives the PromQL that reproduces it). Before any task of the queue has
finished in the window, ``r`` is unknown and the queue holds its current workers (at least
one while anything is demanded). Nothing demanded and nothing arriving: 0.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from celery_sidecar.monitor.fold.state import State


@dataclass(frozen=True, slots=True)
class QueueLoad:
    waiting: int  # in the broker (the probe's last length; 0 before any reading)
    reserved: int  # received by a worker and not started, due to run
    scheduled: int  # received and held for their eta or countdown: not demand yet
    running: int  # started and not finished
    workers: int  # live workers consuming the queue
    capacity: int  # their pool slots
    pool_size: int  # the typical (median) pool size of those workers (of all live workers, else 1)
    arrival_rate: float  # tasks received per second over the window
    runtime_median: float | None  # seconds one slot spends per task, over the window
    latency_limit: float  # the queue's latency threshold: what the oldest waiting task may wait

    @property
    def demand(self) -> int:
        return self.waiting + self.reserved + self.running

    @property
    def pressure(self) -> float:
        if self.capacity:
            return self.demand / self.capacity
        return math.inf if self.demand else 0.0

    @property
    def workers_desired(self) -> int:
        r = self.runtime_median
        if r is None:
            return max(self.workers, 1) if self.demand else 0
        slots = max(self.arrival_rate * r, self.running) + (self.waiting + self.reserved) * r / self.latency_limit
        return math.ceil(slots / self.pool_size - 1e-9) if slots > 0 else 0


def queue_loads(state: State, now: float, queues: set[str]) -> dict[str, QueueLoad]:
    """Every known queue's load, from one look at the fold (under the pipeline's lock)."""
    task_fold, cfg = state.task_fold, state.config
    held = task_fold.reserved.counts(now)
    running = task_fold.running.per_queue()
    rates = {q: (rate, median) for q, rate, median in task_fold.rates.rates(now)}
    live = [w for w in state.workers.values() if w.alive]
    all_pools = [w.pool_max for w in live if w.pool_max]
    loads = {}
    for queue in sorted(queues | set(held) | set(running)):
        consumers = [w for w in live if queue in w.queues]
        pools = [w.pool_max for w in consumers if w.pool_max] or all_pools
        reading = state.queue_fold.readings.get(queue)
        reserved, scheduled = held.get(queue, (0, 0))
        rate, median = rates.get(queue, (0.0, None))
        limits = cfg.thresholds.latency_seconds
        loads[queue] = QueueLoad(
            waiting=reading.length if reading is not None else 0, reserved=reserved, scheduled=scheduled,
            running=running.get(queue, 0), workers=len(consumers),
            capacity=sum(w.pool_max or 0 for w in consumers),
            pool_size=max(1, round(statistics.median(pools))) if pools else 1,
            arrival_rate=rate, runtime_median=median,
            latency_limit=limits.heavy if cfg.is_heavy(None, queue) else limits.normal,
        )
    return loads


@dataclass(frozen=True, slots=True)
class Consuming:
    """Whether a live worker takes tasks from one of its queues."""

    hostname: str
    queue: str
    consuming: bool
    idle_seconds: float  # since it last received a task of the queue (or came up)
    waited_seconds: float  # how long the queue's tasks have waited (0: none waits)


def consuming(state: State, now: float, waited: dict[str, float]) -> list[Consuming]:
    """Per live worker and queue it lists: a worker with free pool slots that received nothing
    from a queue whose tasks have waited ``not_consuming_seconds`` is not consuming it. A
    worker whose slots are all busy is busy, not a zombie; an empty queue pages no one."""
    limit = state.config.thresholds.not_consuming_seconds
    found = []
    for worker in state.workers.values():
        if not worker.alive:
            continue
        free = worker.pool_max is not None and worker.active < worker.pool_max
        for queue in worker.queues:
            idle = now - max(worker.received_at.get(queue, 0.0), worker.up_since)
            wait = waited.get(queue, 0.0)
            zombie = free and idle >= limit and wait >= limit
            found.append(Consuming(worker.hostname, queue, not zombie, idle, wait))
    return found

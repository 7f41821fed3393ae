"""Where each queue's demand is, beyond what the broker's list shows.

A worker takes ``prefetch_multiplier x concurrency`` messages off the broker's list before it
runs them (more with ``acks_late``), so the list can read 0 while hundreds of tasks wait on
the workers. The stream says where every task is: received by a worker and not started is
**reserved** (or **scheduled** while it waits for its eta or countdown), started and not
finished is **running**. With the broker's own length, that is the queue's whole demand.

Also folded here, per queue, over ``state.pressure_window_seconds``: how fast tasks arrive
(task-received), and the median time one slot takes per task (the throughput per slot; a
median, so one slow task does not swing it). The read API turns these into capacity,
pressure and the workers a queue needs (monitor/view.py).

Bounds: one entry per reserved task (they are in-flight tasks: bounded by ``state.max_tasks``
like the task LRU, and leave with it); per queue (at most 1,000) a count, a heap of etas, a
ring of at most ``RUNTIME_SAMPLES`` runtimes and a bucketed arrival count.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from celery_sidecar.monitor.fold.queues import MAX_QUEUES
from celery_sidecar.monitor.fold.windows import CountWindow, SampleWindow

RUNTIME_SAMPLES = 256  # per queue: plenty for a median


class Reserved:
    """Per queue, the tasks a worker received and has not started."""

    def __init__(self) -> None:
        self._of: dict[str, tuple[str, str, bool]] = {}  # uuid -> (queue, host, due)
        self._ready: dict[str, int] = {}  # queue -> reserved, due to run
        self._held: dict[str, int] = {}  # queue -> scheduled: waiting for an eta
        self._etas: dict[str, list[tuple[float, str]]] = {}  # queue -> heap of (eta, uuid)

    def __len__(self) -> int:
        return len(self._of)

    def add(self, uuid: str, queue: str, host: str, eta: float | None, now: float) -> None:
        if uuid in self._of:  # received again (a redelivery): counted once
            self.remove(uuid)
        due = eta is None or eta <= now
        self._of[uuid] = (queue, host, due)
        counts = self._ready if due else self._held
        counts[queue] = counts.get(queue, 0) + 1
        if not due:
            heap = self._etas.setdefault(queue, [])
            heapq.heappush(heap, (eta, uuid))
            if len(heap) > 2 * self._held[queue] + 64:  # entries of tasks long gone: drop them
                heap[:] = [(e, u) for e, u in heap
                           if (entry := self._of.get(u)) is not None and entry[0] == queue and not entry[2]]
                heapq.heapify(heap)

    def remove(self, uuid: str) -> None:
        entry = self._of.pop(uuid, None)
        if entry is not None:
            queue, _host, due = entry
            counts = self._ready if due else self._held
            left = counts[queue] - 1
            if left:
                counts[queue] = left
            else:
                del counts[queue]

    def release(self, now: float) -> None:
        """Scheduled tasks whose eta has come are reserved like the others."""
        for queue, heap in self._etas.items():
            while heap and heap[0][0] <= now:
                _eta, uuid = heapq.heappop(heap)
                entry = self._of.get(uuid)
                if entry is not None and entry[0] == queue and not entry[2]:
                    self.remove(uuid)
                    self._of[uuid] = (queue, entry[1], True)
                    self._ready[queue] = self._ready.get(queue, 0) + 1

    def on_host(self, host: str) -> list[str]:
        """The tasks ``host`` holds unstarted: back to the broker when it goes down. O(reserved):
        a worker going down is rare."""
        return [uuid for uuid, (_q, h, _d) in self._of.items() if h == host]

    def counts(self, now: float) -> dict[str, tuple[int, int]]:
        """queue -> (reserved, scheduled)."""
        self.release(now)
        return {q: (self._ready.get(q, 0), self._held.get(q, 0)) for q in {*self._ready, *self._held}}


class QueueRate:
    """One queue's windows: tasks arriving at workers, and the time one slot spends per task."""

    __slots__ = ("arrivals", "runtimes")

    def __init__(self, seconds: float) -> None:
        self.arrivals = CountWindow(seconds)
        self.runtimes = SampleWindow(seconds, RUNTIME_SAMPLES)


class QueueRates:
    """Per queue, its ``QueueRate``. The fold looks a queue's up in ``by_queue`` and adds to its
    windows itself (``of`` creates one): once per task received and per task finished, a
    method here around each would be one more Python call."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.by_queue: dict[str, QueueRate] = {}
        self._uncounted = QueueRate(seconds)  # what queues past the cap add to: never read

    def of(self, queue: str) -> QueueRate:
        rate = self.by_queue.get(queue)
        if rate is None:
            if len(self.by_queue) >= MAX_QUEUES:  # task-sent may name any queue: 1,000 busy ones at most
                return self._uncounted
            rate = self.by_queue[queue] = QueueRate(self.seconds)
        return rate

    def tidy(self, now: float) -> None:
        """Queues with nothing in their windows leave (once a tick), so the cap holds only
        queues busy within the window."""
        for queue in [q for q, r in self.by_queue.items() if r.runtimes.empty(now) and not r.arrivals.count(now)]:
            del self.by_queue[queue]

    def rates(self, now: float) -> Iterator[tuple[str, float, float | None]]:
        """(queue, arrivals per second, median runtime or None) over the window."""
        for queue, rate in self.by_queue.items():
            yield queue, rate.arrivals.count(now) / self.seconds, rate.runtimes.quantile(0.5, now)

"""Indexes over the in-flight tasks: who waits in which queue, who runs where.

State keeps in-flight tasks in one LRU (``state.max_tasks``); these indexes hold only
their ids, ordered so that the questions a scrape or a tick asks cost O(queues) or
O(task names), never O(in-flight tasks):

- ``Waiting``: per queue, the tasks sent and not started, oldest first; tasks with an
  eta in a heap until they are due (a countdown does not count as waiting before then).
- ``Running``: per task name, the tasks started and not finished, oldest first; and per
  worker, the ids it runs (what is lost when it dies).

Times are the sidecar's own clock (when it received the event), except an eta, which is
the producer's. Every entry leaves with its task: when it starts, finishes, or the LRU
evicts it; so the indexes are bounded by ``state.max_tasks`` like the LRU.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterator


class Waiting:
    def __init__(self) -> None:
        self._queued: dict[str, OrderedDict[str, float]] = {}  # queue -> uuid -> waiting since
        self._scheduled: dict[str, list[tuple[float, str]]] = {}  # queue -> heap of (eta, uuid)
        self._where: dict[str, str] = {}  # uuid -> queue

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, uuid: str) -> bool:
        return uuid in self._where

    def add(self, uuid: str, queue: str, since: float, eta: float | None) -> None:
        self.remove(uuid)
        self._where[uuid] = queue
        if eta is not None and eta > since:
            heap = self._scheduled.setdefault(queue, [])
            heapq.heappush(heap, (eta, uuid))
            if len(heap) > 2 * len(self._where) + 64:  # dead entries of tasks long gone: drop them
                heap[:] = [(e, u) for e, u in heap if self._where.get(u) == queue]
                heapq.heapify(heap)
        else:
            queued = self._queued.get(queue)
            if queued is None:  # not setdefault: it would build an OrderedDict per call
                queued = self._queued[queue] = OrderedDict()
            queued[uuid] = since

    def remove(self, uuid: str) -> None:
        queue = self._where.pop(uuid, None)
        if queue is not None:
            queued = self._queued.get(queue)
            if queued is not None:
                queued.pop(uuid, None)
            # A scheduled entry is left in its heap and dropped when it reaches the top.

    def oldest(self, queue: str, now: float) -> tuple[float, str | None]:
        """(seconds the oldest waiting task of ``queue`` has waited, its id); (0, None) if none."""
        age, uuid = 0.0, None
        queued = self._queued.get(queue)
        if queued:
            uuid, since = next(iter(queued.items()))
            age = now - since
        heap = self._scheduled.get(queue)
        while heap and self._where.get(heap[0][1]) != queue:
            heapq.heappop(heap)
        if heap and heap[0][0] <= now and now - heap[0][0] > age:
            age, uuid = now - heap[0][0], heap[0][1]
        return max(0.0, age), uuid

    def queues(self) -> list[str]:
        return [q for q in {*self._queued, *self._scheduled} if self._queued.get(q) or self._scheduled.get(q)]


class Running:
    def __init__(self) -> None:
        self._by_name: dict[str, OrderedDict[str, float]] = {}  # name -> uuid -> started at
        self._by_host: dict[str, set[str]] = {}
        self._of: dict[str, tuple[str, str, str]] = {}  # uuid -> (name, host, queue)
        self._per_queue: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._of)

    def start(self, uuid: str, name: str, host: str, at: float, queue: str = "unknown") -> None:
        if uuid in self._of:  # started again (a redelivery)
            self.finish(uuid)
        self._of[uuid] = (name, host, queue)
        self._per_queue[queue] = self._per_queue.get(queue, 0) + 1
        tasks = self._by_name.get(name)
        if tasks is None:
            tasks = self._by_name[name] = OrderedDict()
        tasks[uuid] = at
        on_host = self._by_host.get(host)
        if on_host is None:
            on_host = self._by_host[host] = set()
        on_host.add(uuid)

    def finish(self, uuid: str) -> bool:
        """Forget ``uuid``; whether it was running."""
        where = self._of.pop(uuid, None)
        if where is None:
            return False
        name, host, queue = where
        left = self._per_queue[queue] - 1
        if left:
            self._per_queue[queue] = left
        else:
            del self._per_queue[queue]
        tasks = self._by_name.get(name)
        if tasks is not None:
            tasks.pop(uuid, None)
            if not tasks:
                del self._by_name[name]
        on_host = self._by_host.get(host)
        if on_host is not None:
            on_host.discard(uuid)
            if not on_host:
                del self._by_host[host]
        return True

    def on_host(self, host: str) -> list[str]:
        return sorted(self._by_host.get(host, ()))

    def started_at(self, uuid: str) -> float | None:
        where = self._of.get(uuid)
        return None if where is None else self._by_name[where[0]][uuid]

    def host_of(self, uuid: str) -> str | None:
        where = self._of.get(uuid)
        return None if where is None else where[1]

    def hosts(self) -> list[str]:
        return list(self._by_host)

    def per_queue(self) -> dict[str, int]:
        return dict(self._per_queue)

    def by_name(self, now: float, limit: Callable[[str], float]) -> Iterator[tuple[str, int, float, int]]:
        """(name, running, oldest runtime, over their limit) per task name."""
        for name, tasks in self._by_name.items():
            oldest = now - next(iter(tasks.values()))
            cap = limit(name)
            stuck = 0
            if oldest > cap:
                for started in tasks.values():  # oldest first: stop at the first within its limit
                    if now - started <= cap:
                        break
                    stuck += 1
            yield name, len(tasks), oldest, stuck

    def stuck(self, now: float, limit: Callable[[str], float], most: int) -> Iterator[tuple[str, str, str, float]]:
        """(uuid, name, host, started at) of up to ``most`` tasks running longer than their limit."""
        found = 0
        for name, tasks in self._by_name.items():
            cap = limit(name)
            for uuid, started in tasks.items():
                if now - started <= cap or found >= most:
                    break
                found += 1
                yield uuid, name, self._of[uuid][1], started

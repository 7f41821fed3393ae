"""The queue fold: which queues exist, and what the broker probes last read of them.

Queues are discovered from task-sent events, configured in sidecar.yml, named by the app,
or listed by a worker's inspection. Bounds: 1,000 discovered queues; one reading (and, on
Redis, the ids at the oldest end of its lists) per known queue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from celery_sidecar.monitor.config.settings import LiveConfig
from celery_sidecar.monitor.fold.records import QueueReading, Unacked

if TYPE_CHECKING:
    from celery_sidecar.monitor.config.app_settings import AppDefaults

MAX_QUEUES = 1000  # discovered queues (and so queue label values) kept


class QueueFold:
    def __init__(self, config: LiveConfig, app: AppDefaults, clock: Callable[[], float],
                 worker_queues: Callable[[], Iterable[Iterable[str]]]) -> None:
        self._live = config
        self._app = app
        self._clock = clock
        self._worker_queues = worker_queues  # the worker fold's: the queues each worker consumes
        self.discovered: dict[str, float] = {}  # queue -> last seen
        self.readings: dict[str, QueueReading] = {}
        self.probe_at: float | None = None
        self.probe_errors: dict[str, int] = {}
        # Redis: queue -> {task id at the oldest end of one of its lists: (name, first seen there)}
        self.tails: dict[str, dict[str, tuple[str | None, float]]] = {}
        self.unacked: Unacked | None = None
        self.nonempty_since: dict[str, float] = {}  # queue -> since when the broker's list has held tasks

    def saw(self, queue: str) -> None:
        known = self.discovered
        if queue not in known and len(known) >= MAX_QUEUES:
            return
        known[queue] = self._clock()

    def known(self) -> list[str]:
        queues = set(self._live.current.queues) | set(self.discovered) | set(self._app.queues)
        for consumed in self._worker_queues():
            queues.update(consumed)
        return sorted(queues)

    def record(self, readings: dict[str, QueueReading], at: float, unacked: Unacked | None = None) -> None:
        known = set(self.known())
        self.readings = {q: r for q, r in {**self.readings, **readings}.items() if q in known}
        self.nonempty_since = {q: at for q, at in self.nonempty_since.items() if q in known}
        self.probe_at = at
        for queue, reading in readings.items():
            if reading.length > 0:
                self.nonempty_since.setdefault(queue, at)
            else:
                self.nonempty_since.pop(queue, None)
            if not reading.tails or queue not in known:
                self.tails.pop(queue, None)
                continue
            seen = self.tails.get(queue, {})
            self.tails[queue] = {tid: seen.get(tid, (name, at)) for tid, name in reading.tails}
        if unacked is not None:
            self.unacked = unacked

    def probe_failed(self, probe: str) -> None:
        self.probe_errors[probe] = self.probe_errors.get(probe, 0) + 1

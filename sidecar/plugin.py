"""Optional worker plugin: CPU %, memory % and RSS of a worker, sent as a custom event.

Add it to your Celery app with one line (plus its import)::

    from celery_sidecar.plugin import ResourceUsage
    app.steps["consumer"].add(ResourceUsage)

Every ``resource_usage_interval`` seconds (app config, default 5) the worker sends a
``worker-resources`` event with the CPU % and memory % of its main process plus its
pool children (CPU as a share of the host's total capacity, 0-100), the RSS in bytes
and the pool's max concurrency. The sidecar exports them as celery_worker_cpu_percent,
celery_worker_memory_percent and celery_worker_rss_bytes, and uses the pool size for
celery_worker_pool_utilization. It is sent in the 'worker' event group, so it works
even when task events are off.
"""

from __future__ import annotations

import logging
import os

import psutil
from celery import bootsteps

log = logging.getLogger(__name__)

EVENT_TYPE = "worker-resources"  # celery_sidecar.monitor.boundary.parse.RESOURCE_EVENT (tests/test_packaging.py)


class ResourceUsage(bootsteps.StartStopStep):
    requires = {"celery.worker.consumer.events:Events"}

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self._timer_ref = None
        self._main = psutil.Process(os.getpid())
        self._procs: dict[int, psutil.Process] = {}
        self._cpus = psutil.cpu_count() or 1

    def start(self, parent) -> None:
        interval = float(parent.app.conf.get("resource_usage_interval") or 5.0)
        self._sample()  # the first cpu_percent() call only primes psutil's counters
        self._timer_ref = parent.timer.call_repeatedly(interval, self._send, (parent,), priority=10)

    def stop(self, parent) -> None:
        if self._timer_ref is not None:
            self._timer_ref.cancel()
            self._timer_ref = None

    def _sample(self) -> tuple[float, float, int]:
        procs = [self._main]
        try:
            children = self._main.children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            procs.append(self._procs.setdefault(child.pid, child))
        alive = {p.pid for p in procs}
        self._procs = {pid: p for pid, p in self._procs.items() if pid in alive}
        cpu = mem = 0.0
        rss = 0
        for proc in procs:
            try:
                cpu += proc.cpu_percent(None)
                mem += proc.memory_percent()
                rss += proc.memory_info().rss
            except psutil.Error:
                continue
        return cpu / self._cpus, mem, rss

    def _send(self, parent) -> None:
        try:
            cpu, mem, rss = self._sample()
            pool = getattr(parent, "pool", None)
            pool_max = getattr(pool, "num_processes", None) or getattr(parent.controller, "concurrency", None)
            parent.event_dispatcher.send(
                EVENT_TYPE, cpu_percent=round(cpu, 2), memory_percent=round(mem, 2), rss_bytes=rss,
                pool_max=int(pool_max) if pool_max else None,
            )
        except Exception:  # monitoring must never break the worker
            log.debug("resource usage event failed", exc_info=True)

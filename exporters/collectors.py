"""Scrape-time collectors: gauges computed from state, probe readings and config.

Each reads a snapshot under the pipeline lock (short) and builds families outside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from exporters.probes import ProbeReadings
from monitor.config import Config, effective_thresholds
from monitor.pipeline import Pipeline
from monitor.status import Status


class WorkerCollector:
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        pipeline = self._pipeline
        now = pipeline.clock()
        with pipeline.lock:
            state = pipeline.state
            workers = [
                (w.hostname, w.alive, w.active, w.pool_max, w.cpu_percent, w.memory_percent, w.rss_bytes,
                 w.queues, not state.task_events_missing(w, now))
                for w in state.workers.values()
            ]
            ratios = [(name, window.ratio(now)) for name, window in state.retry_windows.items()]

        up = GaugeMetricFamily("celery_worker_up", "1 while the worker's heartbeats arrive.", labels=["hostname"])
        active = GaugeMetricFamily("celery_worker_tasks_active", "Tasks the worker is running.", labels=["hostname"])
        util = GaugeMetricFamily(
            "celery_worker_pool_utilization", "Active tasks / pool max concurrency.", labels=["hostname"]
        )
        cpu = GaugeMetricFamily("celery_worker_cpu_percent", "Worker CPU % (worker plugin).", labels=["hostname"])
        mem = GaugeMetricFamily(
            "celery_worker_memory_percent", "Worker memory % of host (worker plugin).", labels=["hostname"]
        )
        rss = GaugeMetricFamily("celery_worker_rss_bytes", "Worker RSS bytes (worker plugin).", labels=["hostname"])
        events_on = GaugeMetricFamily(
            "celery_sidecar_worker_task_events_enabled",
            "0 when a worker runs tasks but sends no task events (start it with -E).",
            labels=["hostname"],
        )
        per_queue_workers: dict[str, int] = {}
        per_queue_procs: dict[str, int] = {}
        for hostname, alive, n_active, pool_max, cpu_pct, mem_pct, rss_b, queues, events_enabled in workers:
            up.add_metric([hostname], 1.0 if alive else 0.0)
            active.add_metric([hostname], n_active)
            events_on.add_metric([hostname], 1.0 if events_enabled else 0.0)
            if pool_max:
                util.add_metric([hostname], min(1.0, n_active / pool_max) if alive else 0.0)
            for family, value in ((cpu, cpu_pct), (mem, mem_pct), (rss, rss_b)):
                if value is not None and alive:
                    family.add_metric([hostname], value)
            if alive:
                for queue in queues:
                    per_queue_workers[queue] = per_queue_workers.get(queue, 0) + 1
                    per_queue_procs[queue] = per_queue_procs.get(queue, 0) + (pool_max or 0)
        yield from (up, active, util, cpu, mem, rss, events_on)

        wcount = GaugeMetricFamily(
            "celery_active_worker_count", "Live workers consuming the queue.", labels=["queue_name"]
        )
        pcount = GaugeMetricFamily(
            "celery_active_process_count", "Pool processes of live workers consuming the queue.", labels=["queue_name"]
        )
        for queue, n in sorted(per_queue_workers.items()):
            wcount.add_metric([queue], n)
            pcount.add_metric([queue], per_queue_procs[queue])
        yield wcount
        yield pcount

        retry = GaugeMetricFamily(
            "celery_task_retry_ratio", "Retries / (retries + finished) over the retry window.", labels=["name"]
        )
        for name, ratio in ratios:
            if ratio is not None:
                retry.add_metric([name], ratio)
        yield retry


class QueueCollector:
    def __init__(self, readings: ProbeReadings, clock: Callable[[], float] = time.time) -> None:
        self._readings = readings
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        readings = self._readings
        queues = readings.queues
        length = GaugeMetricFamily("celery_queue_length", "Messages waiting in the queue.", labels=["queue_name"])
        consumers = GaugeMetricFamily(
            "celery_active_consumer_count", "Consumers of the queue (from the broker).", labels=["queue_name"]
        )
        for queue, reading in sorted(queues.items()):
            length.add_metric([queue], reading.length)
            if reading.consumers is not None:
                consumers.add_metric([queue], reading.consumers)
        yield length
        yield consumers
        if readings.at is not None:
            yield GaugeMetricFamily(
                "celery_queue_probe_age_seconds", "Seconds since queue lengths were read.",
                value=max(0.0, self._clock() - readings.at),
            )
        errors = CounterMetricFamily("celery_sidecar_probe_errors", "Failed broker probes.", labels=["probe"])
        for probe in ("queue_length", "inspect"):
            errors.add_metric([probe], readings.errors.get(probe, 0))
        yield errors


class ThresholdCollector:
    def __init__(self, config: Callable[[], Config], queues: Callable[[], list[str]]) -> None:
        self._config = config
        self._queues = queues

    def collect(self) -> Iterator[Metric]:
        fam = GaugeMetricFamily(
            "celery_threshold",
            "Configured thresholds; alert rules and dashboards compare signals against these.",
            labels=["signal", "level", "queue_name"],
        )
        for signal, level, extra, value in effective_thresholds(self._config(), self._queues()):
            fam.add_metric([signal, level, extra.get("queue_name", "")], value)
        yield fam


class SidecarCollector:
    """The sidecar's own health: intake, broker connection, config reloads."""

    def __init__(self, pipeline: Pipeline, status: Status) -> None:
        self._pipeline = pipeline
        self._status = status

    def collect(self) -> Iterator[Metric]:
        counters = self._pipeline.state.counters
        now = self._pipeline.clock()
        events = CounterMetricFamily("celery_sidecar_events", "Events consumed, by type.", labels=["type"])
        for etype, n in sorted(dict(counters.events_by_type).items()):
            events.add_metric([etype], n)
        yield events
        skipped = CounterMetricFamily(
            "celery_sidecar_events_skipped", "Malformed or unknown events skipped, by reason.", labels=["reason"]
        )
        for reason, n in sorted(dict(counters.skipped_by_reason).items()):
            skipped.add_metric([reason], n)
        yield skipped
        source = self._pipeline.state.latency_source(now)
        src = GaugeMetricFamily(
            "celery_sidecar_latency_source",
            "1 for the timestamp latency is measured from: sent (task-sent events) or received.",
            labels=["source"],
        )
        for name in ("sent", "received"):
            src.add_metric([name], 1.0 if name == source else 0.0)
        yield src
        status = self._status
        yield GaugeMetricFamily(
            "celery_sidecar_broker_connected", "1 while the event consumer is connected.",
            value=1.0 if status.connected else 0.0,
        )
        yield CounterMetricFamily("celery_sidecar_reconnects", "Broker reconnects.", value=status.reconnects)
        reloads = CounterMetricFamily(
            "celery_sidecar_config_reloads", "Config reloads by result.", labels=["result"]
        )
        for result in ("ok", "error"):
            reloads.add_metric([result], status.reloads.get(result, 0))
        yield reloads
        yield GaugeMetricFamily(
            "celery_sidecar_config_valid", "0 while the config file on disk is refused (previous one live).",
            value=0.0 if status.config_error else 1.0,
        )
        yield GaugeMetricFamily(
            "celery_sidecar_consumer_lag_seconds",
            "Local receive time minus event timestamp of the last event.",
            value=counters.last_event_lag,
        )
        if counters.last_event_at is not None:
            yield GaugeMetricFamily(
                "celery_sidecar_last_event_age_seconds", "Seconds since the last event arrived.",
                value=max(0.0, now - counters.last_event_at),
            )
        yield GaugeMetricFamily(
            "celery_sidecar_tasks_in_memory", "In-flight tasks tracked (bounded by state.max_tasks).",
            value=len(self._pipeline.state.tasks),
        )

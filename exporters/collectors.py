"""Scrape-time gauges: workers, queues, thresholds and the sidecar's own health.

One collector takes one state snapshot per scrape (monitor/view.py) and builds every
family from it outside any lock, so all of them describe the same moment.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from celery_sidecar.monitor.config import LiveConfig
from celery_sidecar.monitor.signals import thresholds
from celery_sidecar.monitor.view import Snapshot, StateView


class StateCollector:
    def __init__(self, view: StateView, config: LiveConfig) -> None:
        self._view = view
        self._config = config

    def collect(self) -> Iterator[Metric]:
        snap = self._view.snapshot()
        yield from worker_families(snap)
        yield from queue_families(snap)
        yield threshold_family(snap, self._config)
        yield from sidecar_families(snap)


def worker_families(snap: Snapshot) -> Iterator[Metric]:
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
    for w in snap.workers:
        host = [w.hostname]
        up.add_metric(host, 1.0 if w.alive else 0.0)
        active.add_metric(host, w.active)
        events_on.add_metric(host, 1.0 if w.task_events_enabled else 0.0)
        if w.pool_max:
            util.add_metric(host, min(1.0, w.active / w.pool_max) if w.alive else 0.0)
        for family, value in ((cpu, w.cpu_percent), (mem, w.memory_percent), (rss, w.rss_bytes)):
            if value is not None and w.alive:
                family.add_metric(host, value)
        if w.alive:
            for queue in w.queues:
                per_queue_workers[queue] = per_queue_workers.get(queue, 0) + 1
                per_queue_procs[queue] = per_queue_procs.get(queue, 0) + (w.pool_max or 0)
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
    for name in snap.retries:
        ratio = snap.retry_ratio(name)
        if ratio is not None:
            retry.add_metric([name], ratio)
    yield retry


def queue_families(snap: Snapshot) -> Iterator[Metric]:
    length = GaugeMetricFamily("celery_queue_length", "Messages waiting in the queue.", labels=["queue_name"])
    consumers = GaugeMetricFamily(
        "celery_active_consumer_count", "Consumers of the queue (from the broker).", labels=["queue_name"]
    )
    for queue, reading in sorted(snap.queues.items()):
        length.add_metric([queue], reading.length)
        if reading.consumers is not None:
            consumers.add_metric([queue], reading.consumers)
    yield length
    yield consumers
    if snap.queue_probe_at is not None:
        yield GaugeMetricFamily(
            "celery_queue_probe_age_seconds", "Seconds since queue lengths were read.",
            value=max(0.0, snap.at - snap.queue_probe_at),
        )
    errors = CounterMetricFamily("celery_sidecar_probe_errors", "Failed broker probes.", labels=["probe"])
    for probe in ("queue_length", "inspect"):
        errors.add_metric([probe], snap.probe_errors.get(probe, 0))
    yield errors


def threshold_family(snap: Snapshot, config: LiveConfig) -> Metric:
    fam = GaugeMetricFamily(
        "celery_threshold",
        "Configured thresholds; alert rules and dashboards compare signals against these.",
        labels=["signal", "level", "queue_name"],
    )
    for row in thresholds(config.current, snap.known_queues):
        fam.add_metric([row.signal, row.level, row.queue_name], row.value)
    return fam


def sidecar_families(snap: Snapshot) -> Iterator[Metric]:
    """The sidecar's own health: intake, broker connection, config reloads."""
    intake = snap.intake
    events = CounterMetricFamily("celery_sidecar_events", "Events consumed, by type.", labels=["type"])
    for etype, n in sorted(intake.events_by_type.items()):
        events.add_metric([etype], n)
    yield events
    skipped = CounterMetricFamily(
        "celery_sidecar_events_skipped", "Malformed or unknown events skipped, by reason.", labels=["reason"]
    )
    for reason, n in sorted(intake.skipped_by_reason.items()):
        skipped.add_metric([reason], n)
    yield skipped
    src = GaugeMetricFamily(
        "celery_sidecar_latency_source",
        "1 for the timestamp latency is measured from: sent (task-sent events) or received.",
        labels=["source"],
    )
    for name in ("sent", "received"):
        src.add_metric([name], 1.0 if name == intake.latency_source else 0.0)
    yield src
    yield GaugeMetricFamily(
        "celery_sidecar_broker_connected", "1 while the event consumer is connected.",
        value=1.0 if intake.connected else 0.0,
    )
    yield CounterMetricFamily("celery_sidecar_reconnects", "Broker reconnects.", value=intake.reconnects)
    reloads = CounterMetricFamily(
        "celery_sidecar_config_reloads", "Config reloads by result.", labels=["result"]
    )
    for result in ("ok", "error"):
        reloads.add_metric([result], snap.config.reloads.get(result, 0))
    yield reloads
    yield GaugeMetricFamily(
        "celery_sidecar_config_valid", "0 while the config file on disk is refused (previous one live).",
        value=0.0 if snap.config.error else 1.0,
    )
    yield GaugeMetricFamily(
        "celery_sidecar_consumer_lag_seconds",
        "Local receive time minus event timestamp of the last event.",
        value=intake.last_event_lag,
    )
    if intake.last_event_at is not None:
        yield GaugeMetricFamily(
            "celery_sidecar_last_event_age_seconds", "Seconds since the last event arrived.",
            value=max(0.0, snap.at - intake.last_event_at),
        )
    yield GaugeMetricFamily(
        "celery_sidecar_tasks_in_memory", "In-flight tasks tracked (bounded by state.max_tasks).",
        value=intake.tasks_in_memory,
    )
    if snap.last_tick_at is not None:
        yield GaugeMetricFamily(
            "celery_sidecar_last_tick_timestamp_seconds",
            "When worker liveness and time-based alerts were last evaluated (about every second).",
            value=snap.last_tick_at,
        )

"""Queue pressure on /metrics: each queue's whole demand (the broker's list, what its workers
prefetched, what they run) against its capacity, the workers it needs with every input of the
formula (monitor/load.py, docs/autoscaling.md), and per worker and queue whether it consumes."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from celery_sidecar.monitor.view import Snapshot

# What each queue-pressure family shows, read off a QueueLoad (monitor/load.py has the formula).
_PRESSURE = (
    ("celery_queue_tasks_reserved", "Tasks a worker received from the queue and has not started (prefetched), "
     "not counting those held for their eta or countdown.", lambda q: q.reserved),
    ("celery_queue_tasks_scheduled", "Tasks a worker received from the queue and holds until their eta or "
     "countdown.", lambda q: q.scheduled),
    ("celery_queue_tasks_running", "Tasks of the queue started and not finished.", lambda q: q.running),
    ("celery_queue_capacity", "Pool slots of the live workers consuming the queue (a worker consuming several "
     "queues counts its whole pool in each).", lambda q: q.capacity),
    ("celery_queue_pressure", "(waiting in the broker + reserved + running) / capacity; +Inf with no capacity "
     "and tasks demanded, 0 with nothing demanded.", lambda q: q.pressure),
    ("celery_queue_workers_desired", "Workers of the queue's typical pool size that keep its oldest waiting task "
     "under its latency threshold at the measured throughput per slot (docs/autoscaling.md).",
     lambda q: q.workers_desired),
    ("celery_queue_pool_size", "The typical (median) pool size of the workers consuming the queue.",
     lambda q: q.pool_size),
    ("celery_queue_arrival_rate", "Tasks of the queue received by workers per second, over "
     "state.pressure_window_seconds.", lambda q: q.arrival_rate),
    ("celery_queue_latency_threshold_seconds", "The latency threshold the queue is judged by (normal, or heavy "
     "for heavy_queues): what its oldest waiting task may wait.", lambda q: q.latency_limit),
)


def pressure_families(snap: Snapshot) -> Iterator[Metric]:
    """Each queue's whole demand (broker + reserved + running) against its capacity, and the
    workers it needs; per worker and queue, whether it takes tasks from it."""
    for name, doc, read in _PRESSURE:
        family = GaugeMetricFamily(name, doc, labels=["queue_name"])
        for queue, load in snap.loads.items():
            family.add_metric([queue], read(load))
        yield family
    runtime = GaugeMetricFamily(
        "celery_queue_task_runtime_median_seconds",
        "Median seconds one pool slot spends per task of the queue, over state.pressure_window_seconds "
        "(absent until a task of the queue finished in it).", labels=["queue_name"],
    )
    for queue, load in snap.loads.items():
        if load.runtime_median is not None:
            runtime.add_metric([queue], load.runtime_median)
    yield runtime
    consuming = GaugeMetricFamily(
        "celery_worker_consuming",
        "0 for a live worker with free pool slots that received nothing from a queue it lists while the "
        "queue's tasks waited thresholds.not_consuming_seconds (a zombie consumer); 1 otherwise.",
        labels=["hostname", "queue_name"],
    )
    for row in snap.consuming:
        consuming.add_metric([row.hostname, row.queue], 1.0 if row.consuming else 0.0)
    yield consuming


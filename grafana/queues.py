"""The overview's queue rows: the broker's view (length against its thresholds, the workers
consuming each queue), then one row per queue with its whole demand (what the workers
prefetched and run, beside what the broker holds), its capacity and the workers it needs
(monitor/load.py, docs/autoscaling.md)."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as builders

from celery_sidecar.grafana.panels import (
    QUEUE_SELECTOR,
    RowOfPanels,
    dedup,
    query,
    threshold_default,
    threshold_row,
    threshold_targets,
    timeseries_panel,
)

# In the repeated row, Grafana sets $queue to that row's one queue and regex-escapes it, so the
# same =~ selector as everywhere else picks exactly that queue.
ONE_QUEUE = QUEUE_SELECTOR


def queues_row() -> RowOfPanels:
    queue_normal, queue_peak = threshold_row("queue_length_normal"), threshold_row("queue_length_peak")
    return builders.Row("Queues"), [
        timeseries_panel(
            "Queue length vs thresholds",
            [query(dedup("celery_queue_length", selector=QUEUE_SELECTOR), "{{queue_name}}"),
             *threshold_targets("queue_length_normal", refs="B"), *threshold_targets("queue_length_peak", refs="C")],
            unit="short", description=(
                "Messages waiting in each queue, against its normal "
                f"({threshold_default('queue_length_normal', queue_normal)} by default) and peak "
                f"({threshold_default('queue_length_peak', queue_peak)}) thresholds; queue_overrides in the "
                "sidecar's config set them per queue.")),
        timeseries_panel(
            "Workers per queue",
            [query(dedup("celery_active_worker_count", selector=QUEUE_SELECTOR), "{{queue_name}} workers"),
             query(dedup("celery_active_process_count", selector=QUEUE_SELECTOR), "{{queue_name}} processes", "B")],
            unit="short", description="Workers and pool processes consuming each queue (from worker inspection). "
                                      "A queue with messages but no workers is stuck."),
    ]


def pressure_row() -> RowOfPanels:
    """One row per selected queue (Grafana repeats it over $queue)."""
    demand = [
        query(dedup("celery_queue_length", selector=ONE_QUEUE), "waiting in the broker"),
        query(dedup("celery_queue_tasks_reserved", selector=ONE_QUEUE), "reserved (prefetched)", "B"),
        query(dedup("celery_queue_tasks_running", selector=ONE_QUEUE), "running", "C"),
        query(dedup("celery_queue_tasks_scheduled", selector=ONE_QUEUE), "scheduled (eta, not yet due)", "D"),
        query(dedup("celery_queue_capacity", selector=ONE_QUEUE), "capacity (pool slots)", "E"),
    ]
    workers = [
        query(dedup("celery_active_worker_count", selector=ONE_QUEUE), "workers consuming"),
        query(dedup("celery_queue_workers_desired", selector=ONE_QUEUE), "workers desired", "B"),
    ]
    return builders.Row("Queue $queue: pressure").repeat("queue"), [
        timeseries_panel(
            "Demand by part vs capacity", demand, unit="short", min_value=0, width=8, description=(
                "Where the queue's tasks are: waiting in the broker, reserved by a worker that has not started "
                "them (prefetch hides these from the queue's length), running, and held for their eta; against "
                "the pool slots of the workers consuming it.")),
        timeseries_panel(
            "Pressure", [query(dedup("celery_queue_pressure", selector=ONE_QUEUE), "pressure")],
            unit="short", min_value=0, width=8, description=(
                "(waiting + reserved + running) / capacity: 1 is one task per slot; above 1, tasks wait. "
                "+Inf with no capacity while anything is demanded.")),
        timeseries_panel(
            "Workers: consuming vs desired", workers, unit="short", min_value=0, width=8, description=(
                "celery_queue_workers_desired: the workers that keep the oldest waiting task under the queue's "
                "latency threshold at the measured throughput per slot; what KEDA or an HPA should scale on "
                "(docs/autoscaling.md).")),
    ]

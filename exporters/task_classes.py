"""``celery_task_class{name, queue_name, task_class} 1``: which latency threshold a task is judged by.

The sidecar classes a task as heavy or normal from ``heavy_tasks`` / ``heavy_queues`` in
its config (``Config.is_heavy``); Prometheus cannot know that from a task name. This family
exports the class of every (name, queue) the task metrics hold, so a query can pick the
matching ``celery_threshold{signal="latency_seconds", level=<task_class>}`` (the per-task
dashboard's queue-wait panel does). Built at scrape time from the task counters' label sets
and the config in force, so a reload that changes the heavy patterns shows at the next
scrape. Names and queues are the counters' own, already capped (``other`` beyond the cap).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from celery_sidecar.exporters.event_metrics import EventMetrics
from celery_sidecar.monitor.config.settings import LiveConfig


class TaskClassCollector:
    def __init__(self, metrics: EventMetrics, config: LiveConfig) -> None:
        self._metrics = metrics
        self._config = config

    def collect(self) -> Iterator[Metric]:
        config = self._config.current
        family = GaugeMetricFamily(
            "celery_task_class",
            "1 per task name and queue: the latency threshold class the task is judged by (normal, or heavy "
            "by heavy_tasks / heavy_queues).",
            labels=["name", "queue_name", "task_class"],
        )
        # Every kind: a task only ever sent (no worker consumes its queue) has a class too.
        for name, queue in sorted(self._metrics.name_queue_pairs()):
            family.add_metric([name, queue, "heavy" if config.is_heavy(name, queue) else "normal"], 1.0)
        yield family

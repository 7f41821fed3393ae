"""Opt-in metric family of ovalmoney/celery-exporter (``--compat ovalmoney``).

Dashboards built for that exporter (grafana.com 11497 among them) query
``celery_tasks_total{name,state,queue,namespace}``, ``celery_tasks_runtime_seconds``,
``celery_tasks_latency_seconds`` and ``celery_workers``. These are derived from the
same counters at scrape time, summed over hostnames, so they cost nothing on the event path.
"""

from __future__ import annotations

from collections.abc import Iterator

from celery.events.state import TASK_EVENT_TO_STATE
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from celery_sidecar.exporters.event_metrics import EventMetrics
from celery_sidecar.exporters.series import Histogram
from celery_sidecar.monitor.view import StateView

# Celery's own map from event kind to task state, as that exporter labels them.
STATE_OF_KIND = TASK_EVENT_TO_STATE


class OvalMoneyCollector:
    def __init__(self, metrics: EventMetrics, view: StateView, namespace: str) -> None:
        self._metrics = metrics
        self._view = view
        self._namespace = namespace

    def collect(self) -> Iterator[Metric]:
        ns = self._namespace
        total = CounterMetricFamily(
            "celery_tasks", "Tasks by Celery state, summed over workers (as ovalmoney/celery-exporter serves it).",
            labels=["name", "state", "queue", "namespace"],
        )
        for kind, series in self._metrics.counts.items():
            summed: dict[tuple[str, str], float] = {}
            for labels, value in list(series.items()):
                key = (labels[0], labels[2] or "")  # no queue: cardinality.drop_labels drops it
                summed[key] = summed.get(key, 0) + value
            for (name, queue), value in sorted(summed.items()):
                total.add_metric([name, STATE_OF_KIND[kind], queue, ns], value)
        yield total
        yield self._histogram("celery_tasks_runtime_seconds",
                              "Task runtime in seconds, summed over workers (as ovalmoney/celery-exporter serves it).",
                              self._metrics.runtime)
        yield self._histogram("celery_tasks_latency_seconds",
                              "Task queue wait in seconds, summed over workers (as ovalmoney/celery-exporter serves "
                              "it).", self._metrics.queue_wait)
        alive = sum(1 for w in self._view.snapshot().workers if w.alive)
        workers = GaugeMetricFamily("celery_workers", "Live workers (as ovalmoney/celery-exporter serves it).",
                                    labels=["namespace"])
        workers.add_metric([ns], alive)
        yield workers

    def _histogram(self, metric: str, doc: str, hist: Histogram) -> Metric:
        merged = Histogram(hist.bounds)
        for labels, row in list(hist.series.items()):
            key = (labels[0], labels[2] or "")
            target = merged.series.setdefault(key, [0.0] * len(row))
            for i, value in enumerate(list(row)):
                target[i] += value
        return merged.family(metric, doc, ("name", "queue"), {"namespace": self._namespace})

"""The delivery layer's own metrics: sent, failed and dropped alerts, and how many are pending."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric


class DeliveryMetrics:
    def __init__(self, registry: CollectorRegistry, pending: Callable[[], int]) -> None:
        self.registry = registry
        self.sent = Counter(
            "celery_sidecar_alerts_sent",
            "Alerts delivered: Slack (or the console) accepted them, by channel (a Slack channel, webhook or console).",
            ["channel"],
            registry=registry,
        )
        self.failed = Counter(
            "celery_sidecar_alerts_failed",
            "Failed delivery attempts, by reason (each is retried).",
            ["reason"],
            registry=registry,
        )
        self.dropped = Counter(
            "celery_sidecar_alerts_dropped",
            "Alerts not sent on purpose, by reason: muted, excluded, suppressed, expired or overflow.",
            ["reason"],
            registry=registry,
        )
        registry.register(_PendingCollector(pending))


class _PendingCollector:
    def __init__(self, pending: Callable[[], int]) -> None:
        self._pending = pending

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "celery_sidecar_alerts_pending",
            "Alerts accepted and not yet delivered by this sidecar.",
            value=self._pending(),
        )

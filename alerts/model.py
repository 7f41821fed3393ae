"""What the alert engine hands to delivery, and what delivery keeps about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from celery_sidecar.monitor.signals import Severity

__all__ = ["Alert", "MessageRef", "Severity", "Status"]

Status = Literal["firing", "resolved", "info"]


@dataclass(frozen=True)
class Alert:
    """One notification to deliver.

    ``key`` identifies this notification: it is derived from event data (task id, the
    worker's last heartbeat, the breach's start), never from local time, so two sidecars
    reading the same stream produce the same key and the delivery layer posts it once.
    ``group`` identifies the alert it belongs to, so a "resolved" can edit or thread onto
    the "firing" message that has the same group.
    """

    key: str
    group: str
    kind: str  # task_failed | failure_summary | worker_offline | worker_online | worker_shutdown | threshold
    status: Status
    severity: Severity
    title: str
    text: str
    fields: dict[str, str] = field(default_factory=dict)
    task_name: str | None = None
    traceback: str | None = None
    link: str | None = None  # Flower's page of the task, when alerts.flower_url is set
    created_at: float = 0.0
    # The Grafana dashboard that shows it (monitor/config/dashboard_links.py), when alerts.grafana_url is
    # set. Last and defaulted, so outbox entries written before it existed still decode.
    dashboard: str | None = None


@dataclass(frozen=True)
class MessageRef:
    """Where Slack put a firing message (channel id as Slack returned it, and timestamp), so
    its resolution can edit it or reply in its thread. The outbox stores these."""

    channel: str
    ts: str

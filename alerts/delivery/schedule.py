"""When each pending alert is tried next, and how sends to one Slack channel are spaced.

`Schedule` holds the alerts the delivery thread owns, each with its due time on the
monotonic clock, in a heap: the next due alert is popped in O(log n), and an alert whose
due time changed leaves its old heap entry behind, skipped when popped. Alerts due at the
same moment go out in submission order. `Pacer` spaces sends per channel
(`rate_limit_per_second`) and holds a channel back after Slack's 429 until Retry-After.
Neither sends, logs or touches the outbox: alerts/delivery/dispatcher.py does.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass

from celery_sidecar.alerts.model import Alert


@dataclass
class Pending:
    alert: Alert
    seq: int  # submission order: breaks ties so a channel's alerts go out in order
    due: float
    attempts: int = 0
    persisted: bool = False
    sent_unrecorded: bool = False  # Slack took it but marking it delivered failed: only record it


class Schedule:
    def __init__(self) -> None:
        self._items: dict[str, Pending] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._firing_by_group: dict[str, str] = {}  # group -> key of its firing alert still pending
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def add(self, alert: Alert, persisted: bool) -> Pending:
        """Due at once."""
        item = Pending(alert, next(self._seq), due=time.monotonic(), persisted=persisted)
        self._items[alert.key] = item
        if alert.status == "firing":
            self._firing_by_group[alert.group] = alert.key
        heapq.heappush(self._heap, (item.due, item.seq, alert.key))
        return item

    def retry_at(self, item: Pending, due: float) -> None:
        item.due = due
        heapq.heappush(self._heap, (due, item.seq, item.alert.key))

    def forget(self, item: Pending) -> None:
        alert = item.alert
        self._items.pop(alert.key, None)
        if self._firing_by_group.get(alert.group) == alert.key:
            del self._firing_by_group[alert.group]

    def has_due(self) -> bool:
        return bool(self._heap) and self._heap[0][0] <= time.monotonic()

    def pop_due(self) -> Pending | None:
        while self.has_due():
            due, _, key = heapq.heappop(self._heap)
            item = self._items.get(key)
            if item is not None and item.due == due:
                return item
        return None

    def next_due(self) -> float | None:
        """The earliest due time in the heap (perhaps a stale entry's: waking early is harmless)."""
        return self._heap[0][0] if self._heap else None

    def firing_due(self, alert: Alert) -> float | None:
        """For a resolution: the due time of its group's firing alert, if that is still pending."""
        key = self._firing_by_group.get(alert.group)
        item = self._items.get(key) if key is not None else None
        return item.due if item is not None else None


class Pacer:
    """Per channel (a pace key), the earliest moment the next send may go."""

    def __init__(self) -> None:
        self._next_send: dict[str, float] = {}

    def wait(self, pace_key: str, now: float) -> float:
        """Seconds until a send to this channel may go (0 or less: now)."""
        return self._next_send.get(pace_key, 0.0) - now

    def sent(self, pace_key: str, rate_per_second: float) -> None:
        self._next_send[pace_key] = time.monotonic() + 1.0 / rate_per_second

    def hold(self, pace_key: str, seconds: float) -> float:
        """Slack said 429: nothing to this channel for `seconds`. Returns when it may send again."""
        until = max(self._next_send.get(pace_key, 0.0), time.monotonic() + seconds)
        self._next_send[pace_key] = until
        return until

"""The sidecar's own event queue on RabbitMQ: a burst buffer whose arguments we choose.

Celery's EventReceiver declares its event queue with ``x-message-ttl`` 5 s (celery's
``event_queue_ttl``): a consumer more than five seconds behind loses events in the broker.
The sidecar declares its own queue instead, on both of its AMQP paths:

- a message TTL long enough to ride out a burst (``ttl_seconds``, default 60);
- a bound on the broker memory it may take (``x-max-length-bytes``, ``max_bytes``, with
  ``x-overflow: drop-head``: when full, the oldest events go first);
- ``x-expires`` (``expires_seconds``): a queue no sidecar consumes (a crashed sidecar's) is
  deleted by the broker.

It is not exclusive and not auto-delete, so when the connection drops and the sidecar
reconnects, it consumes the same queue again and gets what arrived meanwhile. Redis has
no such queue (events are pub/sub there); these settings apply to AMQP brokers only.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

EXCHANGE = "celeryev"  # celery's event_exchange
QUEUE_PREFIX = "celeryev.sidecar"
# ~600 B per event message: 1 GiB is about three minutes of 10,000 events/s.
DEFAULT_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class EventQueue:
    ttl_seconds: float = 60.0
    max_bytes: int = DEFAULT_MAX_BYTES
    expires_seconds: float = 300.0
    name: str = field(default_factory=lambda: f"{QUEUE_PREFIX}.{uuid.uuid4().hex}")

    def __post_init__(self) -> None:
        if self.ttl_seconds <= 0 or self.expires_seconds <= 0 or self.max_bytes <= 0:
            raise ValueError("the event queue's TTL, expiry and size must be positive")
        if self.expires_seconds < self.ttl_seconds:
            raise ValueError("the event queue must not expire sooner than its messages (expires >= ttl)")

    def arguments(self) -> dict[str, Any]:
        return {
            "x-message-ttl": int(self.ttl_seconds * 1000),
            "x-max-length-bytes": int(self.max_bytes),
            "x-overflow": "drop-head",
            "x-expires": int(self.expires_seconds * 1000),
        }

"""The sidecar's own condition: the event consumer's connection, and the config file's.

One object, written by the intake (connection) and the reloader (config), read through
the state view for /health and the self-metrics. The connection is stored only here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Status:
    broker: str = ""  # redacted URL
    intake: str = "stock"  # which event path is in use: "stock", "redis-fast" or "amqp-fast"
    connected: bool = False
    reconnects: int = 0
    last_error: str | None = None  # while disconnected
    last_disconnect: str | None = None  # the error that ended the last connection, kept after a reconnect
    event_queue_messages: int | None = None  # the AMQP event queue's depth, read by the intake
    started_at: float = field(default_factory=time.time)
    config_path: str | None = None
    config_error: str | None = None
    reloads: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reload_result(self, ok: bool, error: str | None = None) -> None:
        with self._lock:
            key = "ok" if ok else "error"
            self.reloads[key] = self.reloads.get(key, 0) + 1
            self.config_error = error

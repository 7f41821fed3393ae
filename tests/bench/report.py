"""The results table: one row per measurement, with its target and whether it was met."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass

from tests.support.servers import redis_server_binary


@dataclass
class Row:
    measurement: str
    value: str
    target: str = ""
    met: bool | None = None  # None: informational

    @property
    def verdict(self) -> str:
        return {True: "ok", False: "MISSED", None: ""}[self.met]


def machine(broker: str = "redis") -> str:
    if broker == "amqp":
        from tests.bench.rabbit import rabbitmq_version

        server = f"RabbitMQ {rabbitmq_version()}"
    else:
        try:
            version = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True,
                                     timeout=10).stdout.split()[2].removeprefix("v=")
        except (OSError, IndexError, subprocess.SubprocessError):
            version = "?"
        server = f"redis-server {version}"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores, Python {platform.python_version()}, {server}, "
            f"load average at start {load}")


def render(rows: list[Row]) -> str:
    headers = ("measurement", "value", "target", "")
    widths = [max(len(headers[0]), *(len(r.measurement) for r in rows)),
              max(len(headers[1]), *(len(r.value) for r in rows)),
              max(len(headers[2]), *(len(r.target) for r in rows)), 6]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    for r in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip((r.measurement, r.value, r.target, r.verdict),
                                                         widths, strict=True)).rstrip())
    return "\n".join(out)

"""Publish pre-built traffic through real Redis pub/sub, flooded or paced.

The bytes are pre-built RESP ``PUBLISH`` commands written straight to a socket (what
``redis-cli --pipe`` does), so the producer costs almost nothing next to the consumer.
A thread drains the integer replies; each one is the number of subscribers that got
the message, which tells us whether the consumer was connected at the time.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable, Iterator

import redis

from tests.bench.traffic import Message, resp_publish


class Publisher:
    """A raw pipelined connection to Redis that sends PUBLISH commands."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self._sock = socket.create_connection((host, port))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.sent = 0
        self.replies = 0
        self.unheard = 0  # PUBLISH replies of 0: nobody was subscribed
        self._tail = b""
        self._reader = threading.Thread(target=self._drain_replies, daemon=True, name="publish-replies")
        self._reader.start()

    def _drain_replies(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            data = self._tail + data
            lines = data.split(b"\r\n")
            self._tail = lines.pop()
            self.replies += len(lines)
            self.unheard += lines.count(b":0")

    def send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def publish(self, messages: Iterable[Message]) -> int:
        """Flood: send everything as fast as the socket takes it; returns events sent."""
        events = 0
        batch: list[bytes] = []
        for message in messages:
            batch.append(resp_publish(message.channel, message.payload))
            events += message.events
            self.sent += 1
            if len(batch) >= 512:
                self.send(b"".join(batch))
                batch.clear()
        if batch:
            self.send(b"".join(batch))
        return events

    def wait_replies(self, timeout: float = 60.0) -> None:
        """Block until Redis has executed every PUBLISH sent so far."""
        deadline = time.monotonic() + timeout
        while self.replies < self.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.replies < self.sent:
            raise TimeoutError(f"Redis answered {self.replies} of {self.sent} PUBLISH commands")

    def close(self) -> None:
        self._sock.close()


def paced(messages: list[Message], rate: float, tick: float = 0.02) -> Iterator[list[Message]]:
    """Yield slices of ``messages`` on schedule so that ``rate`` events/s leave on average.

    Sleeps between slices; a slow tick is caught up on the next one, so the average
    holds even when the machine is busy.
    """
    start = time.monotonic()
    sent_events = 0
    index = 0
    while index < len(messages):
        due = (time.monotonic() - start + tick) * rate
        batch = []
        while index < len(messages) and sent_events < due:
            batch.append(messages[index])
            sent_events += messages[index].events
            index += 1
        if batch:
            yield batch
        time.sleep(max(0.0, start + sent_events / rate - time.monotonic()))


def subscriber_memory(client: redis.Redis) -> int:
    """Bytes queued in Redis for pub/sub subscribers (their output buffers)."""
    total = 0
    for entry in client.client_list(_type="pubsub"):
        total += int(entry.get("omem", 0))
    return total


def subscriber_count(client: redis.Redis) -> int:
    return len(client.client_list(_type="pubsub"))

"""Realistic Celery event traffic, encoded byte for byte as kombu's Redis transport sends it.

A task produces task-sent (from the client), then task-received, task-started and one of
task-succeeded (90 %), task-failed (5 %) or task-retried (5 %; the retry runs again and
succeeds). Half of the workers batch their task events into list bodies like prefork
workers do (celery's EventDispatcher ``buffer_group={'task'}``, up to 24 per message);
the other half send one message per event. Every worker sends worker-online and a
heartbeat every ``heartbeat_freq`` seconds of traffic time.

The envelope format is checked against a real ``EventDispatcher`` message in
tests/test_fast_path.py, so the benchmark cannot drift from what kombu publishes.
"""

from __future__ import annotations

import base64
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from kombu.utils.json import dumps

EXCHANGE = "celeryev"
BATCH_LIMIT = 24  # celery's EventDispatcher buffer_limit
EXCEPTIONS = ("ValueError('bad input')", "TimeoutError('upstream')", "KeyError('missing')")


def channel_for(routing_key: str, db: int = 0) -> bytes:
    """The pub/sub channel kombu publishes a celeryev message to (default fanout options)."""
    return f"/{db}.{EXCHANGE}/{routing_key}".encode()


def encode_message(body: dict | list, routing_key: str, hostname: str, delivery_tag: str) -> bytes:
    """One PUBLISH payload, exactly as kombu's Redis channel serialises a fanout message."""
    envelope = {
        "body": base64.b64encode(dumps(body).encode("utf-8")).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"hostname": hostname},
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {"exchange": EXCHANGE, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": delivery_tag,
        },
    }
    return dumps(envelope).encode("utf-8")


def resp_publish(channel: bytes, payload: bytes) -> bytes:
    """The RESP bytes of ``PUBLISH channel payload`` (what redis-cli --pipe would send)."""
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel), channel, len(payload), payload)


@dataclass
class Message:
    channel: bytes
    payload: bytes
    events: int


@dataclass
class Shape:
    """What the traffic looks like; the defaults are a realistic mix."""

    task_names: int = 50
    workers: int = 8
    queues: tuple[str, ...] = ("celery", "heavy", "io")
    fail_ratio: float = 0.05
    retry_ratio: float = 0.05
    batched_workers_ratio: float = 0.5
    heartbeat_freq: float = 2.0
    utcoffset: float = 0.0  # the senders' utcoffset field (hours, celery's sign convention)
    rate: float = 10_000.0  # events/s of traffic time, for timestamps only
    start: float | None = None  # first timestamp; None: now, so the sidecar sees live traffic
    seed: int = 0
    cover_all_workers: bool = False  # scrape-test shape: every (name, worker) pair is seen


@dataclass
class Totals:
    tasks: int = 0
    events: int = 0
    messages: int = 0
    by_type: Counter = field(default_factory=Counter)


class TrafficGenerator:
    """Yields ``Message`` objects; deterministic for a given ``Shape``."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.totals = Totals()
        self._rng = random.Random(shape.seed)
        self._clock = 0
        self.start = time.time() if shape.start is None else shape.start
        self._now = self.start
        self._tick = 1.0 / shape.rate
        self._names = [f"bench.task_{i:03d}" for i in range(shape.task_names)]
        self._workers = [f"worker{i:02d}@bench-host" for i in range(shape.workers)]
        batched = round(shape.workers * shape.batched_workers_ratio)
        self._batching = {w: i < batched for i, w in enumerate(self._workers)}
        self._buffers: dict[str, list[dict]] = {w: [] for w in self._workers}
        self._flush_at = {w: self._rng.randint(2, BATCH_LIMIT) for w in self._workers}
        self._next_heartbeat = self.start
        self._pids = {w: 1000 + i for i, w in enumerate(self._workers)}

    # -- public -------------------------------------------------------------------------

    def messages(self, tasks: int) -> Iterator[Message]:
        """The messages of ``tasks`` more tasks (plus heartbeats), buffers flushed at the end."""
        if self.totals.tasks == 0:
            for worker in self._workers:
                yield self._single(worker, "worker-online", self._worker_fields())
        for _ in range(tasks):
            yield from self._heartbeats_due()
            yield from self._task()
        for worker in self._workers:
            yield from self._flush(worker)

    # -- building blocks ----------------------------------------------------------------

    def _event(self, type_: str, hostname: str, fields: dict) -> dict:
        # Same key order as celery's Event(): dispatcher fields, caller fields, timestamp, type.
        self._clock += 1
        self._now += self._tick
        self.totals.events += 1
        self.totals.by_type[type_] += 1
        pid = self._pids.get(hostname, 999)
        return {"hostname": hostname, "utcoffset": self.shape.utcoffset, "pid": pid, "clock": self._clock,
                **fields, "timestamp": self._now, "type": type_}

    def _single(self, hostname: str, type_: str, fields: dict) -> Message:
        event = self._event(type_, hostname, fields)
        routing_key = type_.replace("-", ".")
        self.totals.messages += 1
        return Message(channel_for(routing_key),
                       encode_message(event, routing_key, hostname, self._tag()), 1)

    def _tag(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _worker_fields(self) -> dict:
        return {"freq": self.shape.heartbeat_freq, "active": self._rng.randint(0, 8),
                "processed": self.totals.tasks, "loadavg": [0.5, 0.4, 0.3],
                "sw_ident": "py-celery", "sw_ver": "5.7.0", "sw_sys": "Linux"}

    def _heartbeats_due(self) -> Iterator[Message]:
        if self._now < self._next_heartbeat:
            return
        self._next_heartbeat = self._now + self.shape.heartbeat_freq
        for worker in self._workers:
            yield self._single(worker, "worker-heartbeat", self._worker_fields())

    def _worker_event(self, worker: str, type_: str, fields: dict) -> Iterator[Message]:
        if not self._batching[worker]:
            yield self._single(worker, type_, fields)
            return
        self._buffers[worker].append(self._event(type_, worker, fields))
        if len(self._buffers[worker]) >= self._flush_at[worker]:
            yield from self._flush(worker)

    def _flush(self, worker: str) -> Iterator[Message]:
        buffer = self._buffers[worker]
        if not buffer:
            return
        self._buffers[worker] = []
        self._flush_at[worker] = self._rng.randint(2, BATCH_LIMIT)
        self.totals.messages += 1
        yield Message(channel_for("task.multi"),
                      encode_message(buffer, "task.multi", worker, self._tag()), len(buffer))

    def _task(self) -> Iterator[Message]:
        rng, shape = self._rng, self.shape
        index = self.totals.tasks
        self.totals.tasks += 1
        name = self._names[index % len(self._names)]
        if shape.cover_all_workers:
            worker = self._workers[(index // len(self._names)) % len(self._workers)]
        else:
            worker = self._workers[rng.randrange(len(self._workers))]
        queue = shape.queues[(index % len(self._names)) % len(shape.queues)]
        task_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        roll = rng.random()
        attempts = 2 if roll < shape.retry_ratio else 1
        for attempt in range(attempts):
            yield self._single("producer@bench-client", "task-sent", {
                "uuid": task_id, "root_id": task_id, "parent_id": None, "name": name,
                "args": "(1, 2)", "kwargs": "{}", "retries": attempt, "eta": None, "expires": None,
                "queue": queue, "exchange": "", "routing_key": queue})
            yield from self._worker_event(worker, "task-received", {
                "uuid": task_id, "name": name, "args": "(1, 2)", "kwargs": "{}", "root_id": task_id,
                "parent_id": None, "retries": attempt, "eta": None, "expires": None})
            yield from self._worker_event(worker, "task-started", {"uuid": task_id})
            runtime = round(rng.expovariate(20.0), 6)
            if attempt + 1 < attempts:
                yield from self._worker_event(worker, "task-retried", {
                    "uuid": task_id, "exception": "TimeoutError('upstream')",
                    "traceback": "Traceback (most recent call last):\n  ...\nTimeoutError: upstream\n"})
            elif shape.retry_ratio <= roll < shape.retry_ratio + shape.fail_ratio:
                exception = EXCEPTIONS[rng.randrange(len(EXCEPTIONS))]
                yield from self._worker_event(worker, "task-failed", {
                    "uuid": task_id, "exception": exception,
                    "traceback": f"Traceback (most recent call last):\n  ...\n{exception}\n"})
            else:
                yield from self._worker_event(worker, "task-succeeded", {
                    "uuid": task_id, "result": "3", "runtime": runtime})


def build(tasks: int, shape: Shape | None = None) -> tuple[list[Message], Totals]:
    """All messages of ``tasks`` tasks, in memory (for streams up to a few hundred MB)."""
    generator = TrafficGenerator(shape or Shape())
    messages = list(generator.messages(tasks))
    return messages, generator.totals

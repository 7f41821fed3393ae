"""Broker probes, the second kind of intake: queue lengths and worker inspection.

Nothing here runs on the event path or inside a scrape: poller threads ask the broker
every ``interval`` seconds and hand the answers to the pipeline, which folds them into
state like events; the collectors export the last ones. Every network call has a
timeout; a failed probe is counted and logged, and the previous reading is kept (marked
by ``celery_queue_probe_age_seconds``).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import orjson
import redis
from celery import Celery
from kombu import Connection

from celery_sidecar.monitor.boundary import parse
from celery_sidecar.monitor.fold.pipeline import Pipeline
from celery_sidecar.monitor.fold.records import QueueReading, Unacked, WorkerInfo
from celery_sidecar.monitor.intake import broker_ssl, redis_connect
from celery_sidecar.monitor.intake.broker_url import normalize
from celery_sidecar.monitor.intake.redis_endpoint import RedisEndpoint, resolve

log = logging.getLogger(__name__)

VERIFY_POLL = 0.5  # seconds between looks at what the fold wants verified

DEFAULT_PRIORITY_STEPS = [0, 3, 6, 9]
DEFAULT_SEP = "\x06\x16"


def redis_queue_keys(queue: str, transport_options: dict[str, Any]) -> list[str]:
    """Every key that holds messages of ``queue``: the queue and its priority sub-queues.

    Mirrors kombu's Redis transport (``_q_for_pri``): priority 0 is the plain name, every
    other step is ``{queue}{sep}{step}``, and ``global_keyprefix`` prefixes all keys.
    """
    steps = sorted(transport_options.get("priority_steps") or DEFAULT_PRIORITY_STEPS)
    sep = transport_options.get("sep", DEFAULT_SEP)
    prefix = transport_options.get("global_keyprefix", "") or ""
    keys = []
    for step in steps:
        pri = steps[bisect.bisect(steps, step) - 1]
        keys.append(f"{prefix}{queue}" if not pri else f"{prefix}{queue}{sep}{pri}")
    return list(dict.fromkeys(keys))


class RedisQueueProbe:
    """Per queue: LLEN of every key, and the task at the oldest end (LINDEX -1: kombu LPUSHes
    and BRPOPs) of each; kombu's unacked hash and index. One pipelined round trip."""

    def __init__(self, client: redis.Redis, transport_options: dict[str, Any]) -> None:
        self._options = transport_options
        self._client = client
        prefix = transport_options.get("global_keyprefix", "") or ""
        self._unacked = prefix + transport_options.get("unacked_key", "unacked")
        self._unacked_index = prefix + transport_options.get("unacked_index_key", "unacked_index")

    def read(self, queues: list[str]) -> tuple[dict[str, QueueReading], Unacked]:
        pipe = self._client.pipeline(transaction=False)
        plan = [(q, redis_queue_keys(q, self._options)) for q in queues]
        for _, keys in plan:
            for key in keys:
                pipe.llen(key)
                pipe.lindex(key, -1)
        pipe.hlen(self._unacked)
        pipe.zrange(self._unacked_index, 0, 0, withscores=True)
        replies = iter(pipe.execute())
        readings = {}
        for queue, keys in plan:
            length, tails = 0, []
            for _ in keys:  # one key per priority step: each tail is that priority's oldest
                length += next(replies)
                tail = _task_of(next(replies))
                if tail is not None:
                    tails.append(tail)
            readings[queue] = QueueReading(length, None, tuple(tails))
        count = next(replies)
        index = next(replies)
        return readings, Unacked(int(count), float(index[0][1]) if index else None)

    def close(self) -> None:
        self._client.close()


class AmqpQueueProbe:
    """Passive declare: message and consumer counts; a queue that does not exist reads 0."""

    def __init__(self, broker_url: str, transport_options: dict[str, Any], timeout: float,
                 ssl_options: Any = None) -> None:
        extra = {"ssl": ssl_options} if ssl_options else {}
        self._conn = Connection(
            broker_url, connect_timeout=timeout, transport_options=transport_options, heartbeat=0, **extra
        )
        self._timeout = timeout

    def read(self, queues: list[str]) -> tuple[dict[str, QueueReading], None]:
        conn = self._conn
        conn.ensure_connection(max_retries=1, timeout=self._timeout)
        sock = getattr(getattr(conn.connection, "transport", None), "sock", None)
        if sock is not None:
            sock.settimeout(self._timeout)
        readings = {}
        channel = conn.channel()
        try:
            for queue in queues:
                try:
                    _, length, consumers = channel.queue_declare(queue=queue, passive=True)
                    readings[queue] = QueueReading(int(length), int(consumers))
                except conn.channel_errors:
                    # 404: the broker closed this channel; the queue simply has no messages yet.
                    readings[queue] = QueueReading(0, 0)
                    channel = conn.channel()
        finally:
            with contextlib.suppress(Exception):  # closing a broken channel is best effort
                channel.close()
        return readings, None

    def close(self) -> None:
        self._conn.release()


def redis_client(broker_url: str, transport_options: dict[str, Any], ssl_options: Any,
                 timeout: float) -> redis.Redis | None:
    """A redis-py client to the server the event path reads (the master Sentinel names, a unix
    socket, TLS with the broker's options), or None when the broker is not Redis."""
    broker_url, ssl_options = normalize(broker_url), broker_ssl.normalize(ssl_options)
    endpoint = resolve(broker_url, transport_options, ssl_options)
    if isinstance(endpoint, RedisEndpoint):
        return redis_connect.client(endpoint, timeout)
    if urlparse(broker_url).scheme in ("redis", "rediss", "unix"):  # what only the stock path reads
        return redis.Redis.from_url(broker_url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                    health_check_interval=30)
    return None


def make_queue_probe(broker_url: str, transport_options: dict[str, Any], timeout: float, ssl_options: Any = None):
    client = redis_client(broker_url, transport_options, ssl_options, timeout)
    if client is not None:
        return RedisQueueProbe(client, transport_options)
    scheme = urlparse(broker_url).scheme
    if scheme.startswith("amqp") or scheme in ("pyamqp", "librabbitmq"):
        return AmqpQueueProbe(broker_url, transport_options, timeout, broker_ssl.normalize(ssl_options))
    return None


def inspect_workers(app: Celery, timeout: float) -> dict[str, WorkerInfo]:
    """Ask live workers for their queues and pool size (remote control, like Flower).

    Replies come from anything that answers on the broker: what is not shaped like a
    worker's reply (a queue name that is not a label, a pool size that is not a count) is
    left out, as the schema leaves out such events.
    """
    inspector = app.control.inspect(timeout=timeout)
    active_queues = _mapping(inspector.active_queues())
    stats = _mapping(inspector.stats())
    info = {}
    for hostname in set(active_queues) | set(stats):
        if not _is_label(hostname):
            continue
        replies = active_queues.get(hostname)
        queues = tuple(q["name"] for q in (replies if isinstance(replies, list) else [])
                       if isinstance(q, dict) and _is_label(q.get("name")))
        stat = stats.get(hostname)
        pool = stat.get("pool") if isinstance(stat, dict) else None
        max_conc = pool.get("max-concurrency") if isinstance(pool, dict) else None
        info[hostname] = WorkerInfo(queues, max_conc if type(max_conc) is int and max_conc > 0 else None)
    return info


def held_tasks(app: Celery, hostnames: list[str], timeout: float) -> dict[str, set[str] | None]:
    """Per worker, the ids of the tasks it runs now (inspect ``active``), or None for a worker
    that did not answer within ``timeout``. The evidence that closes a running record whose
    end event never came, and that confirms a stuck task before anyone is paged."""
    replies = _mapping(app.control.inspect(destination=hostnames, timeout=timeout).active())
    held: dict[str, set[str] | None] = {}
    for hostname in hostnames:
        reply = replies.get(hostname)
        if not isinstance(reply, list):
            held[hostname] = None
            continue
        held[hostname] = {r["id"] for r in reply if isinstance(r, dict) and _is_label(r.get("id"))}
    return held


def _task_of(message: bytes | None) -> tuple[str, str | None] | None:
    """(task id, task name) of a kombu Redis message (protocol 2 headers), or None."""
    if not message:
        return None
    try:
        headers = orjson.loads(message).get("headers") or {}
        task_id, name = headers.get("id"), headers.get("task")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not _is_label(task_id):
        return None
    return task_id, name if _is_label(name) else None


def _mapping(reply: Any) -> dict:
    return reply if isinstance(reply, dict) else {}


def _is_label(value: Any) -> bool:
    try:
        return bool(parse.label(value))
    except parse.Refused:
        return False


class Poller:
    """Runs the probes every ``interval`` seconds on its own thread."""

    def __init__(
        self,
        *,
        queue_probe,
        app: Celery | None,
        pipeline: Pipeline,
        interval: float,
        inspect_interval: float,
        timeout: float,
    ) -> None:
        self._probe = queue_probe
        self._app = app
        self._pipeline = pipeline
        self._timeout = timeout
        self._stop = threading.Event()
        # Separate threads: an inspect round waits its whole reply timeout and must not
        # delay queue readings.
        self._threads = [
            threading.Thread(target=self._loop, args=(self.poll_queues, interval), name="queue-probe", daemon=True),
            threading.Thread(
                target=self._loop, args=(self.inspect, inspect_interval), name="worker-inspect", daemon=True
            ),
            # Its own thread: a check the fold asks for (a stuck task to confirm, running
            # records a worker's heartbeat no longer accounts for) must not wait for a round.
            threading.Thread(target=self._loop, args=(self.verify, VERIFY_POLL), name="worker-verify", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        # An inspect broadcast waits out its reply timeout; the threads are daemons, so a
        # short join is enough and shutdown does not wait for a broadcast nobody reads.
        for thread in self._threads:
            thread.join(0.5)
        if self._probe is not None:
            self._probe.close()

    def _loop(self, step: Callable[[], None], interval: float) -> None:
        while not self._stop.is_set():
            step()
            self._stop.wait(interval)

    def poll_queues(self) -> None:
        if self._probe is None:
            return
        try:
            readings, unacked = self._probe.read(self._pipeline.known_queues())
        except Exception as exc:  # noqa: BLE001 - any broker error: count, keep last value
            if self._stop.is_set():
                return  # shutting down: the client may be closed under us
            self._pipeline.probe_failed("queue_length")
            self._say("queue length probe failed: %s", _short(exc))
            return
        self._pipeline.record_queues(readings, unacked)

    def inspect(self) -> None:
        if self._app is None:
            return
        try:
            info = inspect_workers(self._app, self._timeout)
        except Exception as exc:  # noqa: BLE001
            if self._stop.is_set():
                return  # shutting down: the broker may already be gone
            self._pipeline.probe_failed("inspect")
            self._say("worker inspection failed: %s", _short(exc))
            return
        self._pipeline.record_inspection(info)

    def _say(self, message: str, error: str) -> None:
        # While the event consumer has no connection, it has said why (once, in plain words):
        # the probes failing against the same broker add nothing but noise; the count stays.
        level = logging.WARNING if self._pipeline.status.connected else logging.DEBUG
        log.log(level, message, error)

    def verify(self) -> None:
        """Ask the workers the fold wants to hear from which tasks they run."""
        hostnames = self._pipeline.take_verifications()
        if not hostnames or self._app is None:
            return
        asked_at = self._pipeline.clock()
        try:
            held = held_tasks(self._app, hostnames, self._timeout)
        except Exception as exc:  # noqa: BLE001 - as inspect: count, and the fold hears "no answer"
            if self._stop.is_set():
                return
            self._pipeline.probe_failed("verify")
            log.warning("asking workers for their running tasks failed: %s", _short(exc))
            held = dict.fromkeys(hostnames)
        self._pipeline.record_held(held, asked_at)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"

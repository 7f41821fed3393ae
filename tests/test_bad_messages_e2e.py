"""One bad message never costs a reconnect, against real brokers, on all four event paths.

The real sidecar, a real worker and real tasks, with a bad message published raw on the event
channel (Redis) or exchange (RabbitMQ) between every two tasks: JSON nested 100,000 levels deep
in the body and in the kombu envelope, envelope fields of the wrong JSON type, bodies of
several MB. Every task is counted, every bad message is one skip with its reason, and the
sidecar never reconnects. The same input in-process, as properties: tests/test_bad_messages.py.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import pytest
from kombu.utils.json import dumps

from tests.bench.publish import Publisher
from tests.bench.traffic import Message, channel_for
from tests.hostile import envelope, valid_event
from tests.support.brokers import publish_raw
from tests.support.clients import producer
from tests.support.servers import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

DEPTH = 100_000
MB = 4 << 20


def nested(kind: str) -> bytes:
    return b"[" * DEPTH + b"]" * DEPTH if kind == "array" else b'{"a":' * DEPTH + b"1" + b"}" * DEPTH


def _event_body() -> bytes:
    return dumps({**valid_event("task-started", 1), "uuid": f"bad-{uuid.uuid4()}"}).encode()


def _raw_envelope(**changes: object) -> bytes:
    env = orjson.loads(envelope(None, raw=_event_body()))
    for key, value in changes.items():
        (env["properties"] if key == "body_encoding" else env)[key] = value
    return orjson.dumps(env)


# (a message body, the reason it is skipped): the same on both brokers' paths.
BAD_BODIES: list[tuple[bytes, str]] = [
    (nested("array"), "too_deep"),
    (nested("object"), "too_deep"),
    (b"[" + _event_body() + b", " + nested("array") + b"]", "too_deep"),  # a list body, one item too deep
    (dumps("s" * MB).encode(), "not_an_event"),
    (b"{" + b"x" * MB, "undecodable"),
]
# Whole Redis pub/sub payloads (kombu envelopes), and the reason each is skipped.
BAD_ENVELOPES: list[tuple[bytes, str]] = [
    (_raw_envelope(headers=orjson.Fragment(nested("array"))), "too_deep"),
    (_raw_envelope(properties=orjson.Fragment(b'{"delivery_tag": 1, "x": ' + nested("object") + b"}")),
     "too_deep"),
    (_raw_envelope(headers=["a list"]), "undecodable"),
    (_raw_envelope(body=[]), "not_an_event"),
    (_raw_envelope(body_encoding=["base64"]), "undecodable"),
    (_raw_envelope(body_encoding="gzip"), "undecodable"),
    (_raw_envelope(**{"content-encoding": ["utf-8"]}), "undecodable"),
    (_raw_envelope(headers={"compression": "application/x-gzip"}), "undecodable"),
]


@dataclass
class Broker:
    url: str
    publish_bad: Callable[[int], str]  # publishes the n-th bad message; its skip reason
    bad_messages: int
    fast_path: bool


def _redis(server: RedisServer, fast_path: bool) -> Broker:
    bad = [(envelope(None, raw=body), reason) for body, reason in BAD_BODIES] + BAD_ENVELOPES

    def publish(n: int) -> str:
        payload, reason = bad[n % len(bad)]
        publisher = Publisher(server.port)
        publisher.publish([Message(channel_for("task.multi"), payload, 0)])
        publisher.wait_replies(timeout=60)
        publisher.close()
        return reason

    return Broker(server.url, publish, len(bad), fast_path)


def _rabbitmq(url: str, fast_path: bool) -> Broker:
    def publish(n: int) -> str:
        body, reason = BAD_BODIES[n % len(BAD_BODIES)]
        publish_raw(url, [(body, "application/json", "task.multi")])
        return reason

    return Broker(url, publish, len(BAD_BODIES), fast_path)


@pytest.fixture(params=["redis-fast", "redis-stock", "rabbitmq-fast", "rabbitmq-stock"])
def broker(request: pytest.FixtureRequest) -> Broker:
    fast_path = request.param.endswith("fast")
    if request.param.startswith("redis"):
        return _redis(request.getfixturevalue("redis_srv"), fast_path)
    return _rabbitmq(request.getfixturevalue("amqp_url"), fast_path)


def test_a_real_task_between_every_two_bad_messages_is_counted_and_nothing_reconnects(broker, sidecar, worker):
    side = sidecar(broker.url, *(() if broker.fast_path else ("--no-fast-path",)), "--no-alerts")
    assert side.health()[1]["broker"]["intake"] == ("stock" if not broker.fast_path else
                                                   "redis-fast" if broker.url.startswith("redis") else "amqp-fast")
    queue = f"bad_{uuid.uuid4().hex[:6]}"
    worker(broker.url, name=f"real-{uuid.uuid4().hex[:6]}", queues=queue)
    app = producer(broker.url)
    expected: Counter[str] = Counter()
    tasks = 2 * broker.bad_messages + 1  # every bad message twice, a task on each side of each
    app.send_task("demo.ok", kwargs={"x": 1, "y": 2}, queue=queue)
    for n in range(tasks - 1):
        expected[broker.publish_bad(n)] += 1
        app.send_task("demo.ok", kwargs={"x": 1, "y": 2}, queue=queue)
    side.wait_metric("celery_task_succeeded_total", lambda v: v == tasks, timeout=120, queue_name=queue)
    side.wait_metric("celery_sidecar_events_skipped_total", lambda v: v == tasks - 1, timeout=60)
    metrics = side.metrics()
    assert metrics.sum("celery_task_sent_total", queue_name=queue) == tasks
    assert metrics.sum("celery_task_received_total", queue_name=queue) == tasks
    skipped = {reason: int(metrics.get("celery_sidecar_events_skipped_total", reason=reason) or 0)
               for reason in expected}
    assert skipped == dict(expected)
    assert metrics.get("celery_sidecar_reconnects_total") == 0
    status, health = side.health()
    assert status == 200 and health["broker"]["reconnects"] == 0

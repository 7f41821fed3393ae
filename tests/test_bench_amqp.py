"""The AMQP mode of the benchmark sends what a real worker sends (tests/bench/rabbit.py).

Mirrors tests/test_fast_path.py's check of the Redis traffic: the raw-frame publisher's
messages must be indistinguishable from an ``EventDispatcher``'s, or the benchmark
measures something no cluster produces.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid

import amqp
from celery import Celery
from celery.events import EventDispatcher
from kombu import Connection

from tests.bench.rabbit import Publisher, to_publishes
from tests.bench.traffic import Message, Shape, TrafficGenerator, channel_for, encode_message


def _probe_queue(url: str) -> tuple[Connection, amqp.Channel, str]:
    """A queue bound to every event, read with basic.get."""
    conn = Connection(url, connect_timeout=10)
    conn.connect()
    channel = conn.connection.channel()
    channel.exchange_declare("celeryev", "topic", durable=True, auto_delete=False)
    name = f"bench-probe-{uuid.uuid4().hex[:8]}"
    channel.queue_declare(name, exclusive=True, auto_delete=True)
    channel.queue_bind(name, "celeryev", "#")
    return conn, channel, name


def _get_all(channel: amqp.Channel, queue: str, expected: int) -> list[amqp.Message]:
    got: list[amqp.Message] = []
    deadline = time.monotonic() + 10
    while len(got) < expected and time.monotonic() < deadline:
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            got.append(message)
        time.sleep(0.02)
    return got


def test_benchmark_publishes_are_encoded_like_a_real_event_dispatcher(amqp_url: str) -> None:
    conn, channel, queue = _probe_queue(amqp_url)
    try:
        app = Celery(broker=amqp_url, set_as_current=False)
        with app.connection_for_write() as write:
            dispatcher = EventDispatcher(write, hostname="w1@h", app=app, buffer_group={"task"}, buffer_limit=2)
            dispatcher.send("task-received", uuid="u1", name="t.a", args="()", kwargs="{}")
            dispatcher.send("task-started", uuid="u1")  # the second one flushes the list body
            dispatcher.send("worker-heartbeat", freq=2.0, active=0, processed=0)
        real = _get_all(channel, queue, 2)
        assert [m.delivery_info["routing_key"] for m in real] == ["task.multi", "worker.heartbeat"]
        for message in real:
            body = message.body if isinstance(message.body, bytes) else message.body.encode()
            routing_key = message.delivery_info["routing_key"]
            redis_payload = encode_message(json.loads(body), routing_key, "w1@h", str(uuid.uuid4()))
            (ours,) = to_publishes([_message(routing_key, redis_payload)])
            assert ours.exchange == message.delivery_info["exchange"].encode() == b"celeryev"
            assert ours.routing_key == routing_key.encode()
            assert ours.body == body  # kombu's JSON, byte for byte
            # The content header's property flags and values, byte for byte.
            assert ours.properties == message._serialize_properties()
    finally:
        conn.release()


def test_event_receiver_gets_the_benchmark_traffic_exactly_as_generated(amqp_url: str) -> None:
    messages = list(TrafficGenerator(Shape(seed=5, workers=4)).messages(40))
    expected = []
    for message in messages:
        body = json.loads(base64.b64decode(json.loads(message.payload)["body"]))
        expected += body if isinstance(body, list) else [body]
    publishes = to_publishes(messages)
    frame_max = 4096  # small body frames, so that batched bodies are split over several
    assert any(len(p.body) > frame_max - 8 for p in publishes)

    app = Celery(broker=amqp_url, set_as_current=False)
    received: list[dict] = []
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": received.append})
        with receiver.consumer_context(wakeup=False) as (connection, _channel, _consumers):
            publisher = Publisher(amqp_url, frame_max=frame_max)
            try:
                publisher.publish(publishes)
                publisher.wait_confirms(timeout=30)
            finally:
                publisher.close()
            for _ in range(200):
                if len(received) >= len(expected):
                    break
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=0.1)
    assert len(received) == len(expected)
    for got, want in zip(received, expected, strict=True):
        got = dict(got)
        got.pop("local_received")
        if want["type"] == "task-sent":  # EventReceiver replaces a task-sent's clock with its own
            got["clock"] = want["clock"]
        assert got == want


def _message(routing_key: str, payload: bytes) -> Message:
    return Message(channel_for(routing_key), payload, 1)

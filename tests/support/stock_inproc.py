"""The stock path's per-message code in-process, no broker and no thread: each message goes
through the same kombu and celery code a real one goes through, and any exception it raises
reaches the test.

- Redis: a raw pub/sub payload goes to kombu's own ``redis.Channel._receive_one`` (which parses
  the envelope's JSON), then ``Transport._deliver``, kombu's virtual Message and Consumer, and the
  sidecar's EventReceiver, each guarded as monitor/intake/event_receiver.py guards them on a
  real connection. The transport under it is kombu's memory transport: the same virtual
  transport code as Redis, without the socket.
- RabbitMQ: an AMQP message (body and properties as py-amqp reads them off the wire) goes to
  kombu's Consumer callback, then the receiver.
"""

from __future__ import annotations

import threading
from typing import Any

import amqp
from celery import Celery
from kombu.transport import pyamqp
from kombu.transport import redis as kombu_redis

from celery_sidecar.monitor.fold.pipeline import Pipeline
from celery_sidecar.monitor.intake import event_receiver
from celery_sidecar.monitor.intake.event_queue import EventQueue

PATTERN = b"/0.celeryev/*"
CHANNEL = b"/0.celeryev/task.multi"


class _PubSubReply:
    """What kombu's Redis channel reads a message from: one pmessage reply."""

    def __init__(self, payload: bytes) -> None:
        self._reply = [b"pmessage", PATTERN, CHANNEL, payload]

    def parse_response(self) -> list[bytes]:
        return self._reply


class StockPath:
    """The stock path's receiver on kombu's memory transport, consuming, ready for messages."""

    def __init__(self, pipeline: Pipeline) -> None:
        app = Celery("stock-inproc", broker="memory://", set_as_current=False)
        self._conn = app.connection_for_read()
        self.receiver = event_receiver._GuardedReceiver(
            self._conn, handlers={"*": pipeline.handle}, app=app, pipeline=pipeline, stop=threading.Event(),
            on_ready=lambda: None, event_queue=EventQueue(), on_backlog=lambda _n: None, patch=True)
        self._context = self.receiver.consumer_context(wakeup=False)
        _, channel, consumers = self._context.__enter__()  # on_consume_ready: the guards go in
        self._consumer = consumers[0]
        # kombu's Redis channel, reading for this transport: only its per-message code runs.
        redis_channel = kombu_redis.Channel.__new__(kombu_redis.Channel)
        redis_channel.connection = _RedisTransport(channel.connection)
        redis_channel._fanout_to_queue = {"celeryev": self.receiver.queue.name}
        redis_channel._in_listen = False
        redis_channel.connection_errors = redis_channel.connection.connection_errors
        event_receiver.guard_receive_one(redis_channel, self.receiver._failures, pipeline.skip)
        self._redis_channel = redis_channel

    def feed_redis(self, payload: bytes) -> None:
        """One pub/sub message on the event channel, as kombu's Redis transport reads it."""
        self._redis_channel._receive_one(_PubSubReply(payload))

    def feed_amqp(self, body: bytes, content_type: str | None = "application/json",
                  content_encoding: str | None = "utf-8", **properties: Any) -> None:
        """One delivery, as py-amqp hands it to kombu (JSON by default, as celery sends events;
        ``properties``: ``application_headers`` and the like)."""
        if content_type is not None:
            properties["content_type"] = content_type
        if content_encoding is not None:
            properties["content_encoding"] = content_encoding
        message = amqp.Message(body, **properties)
        message.delivery_info = {"delivery_tag": 1, "routing_key": "task.multi", "exchange": "celeryev"}
        consumer = self._consumer
        channel, consumer.channel = consumer.channel, _AmqpChannel()
        try:
            consumer._receive_callback(message)
        finally:
            consumer.channel = channel

    def close(self) -> None:
        self._context.__exit__(None, None, None)
        self._conn.release()


class _RedisTransport:
    """The Redis transport as its channel sees it: its error classes, and ``_deliver`` (kombu's
    virtual transport code, here the memory transport's, guarded as on a real connection)."""

    def __init__(self, virtual_transport: Any) -> None:
        self.connection_errors, self.channel_errors = kombu_redis.get_redis_error_classes()
        self._virtual = virtual_transport

    def _deliver(self, message: Any, queue: str) -> None:
        self._virtual._deliver(message, queue)


class _AmqpChannel:
    """What kombu's Consumer asks of a py-amqp channel for one message: to build the Message."""

    def message_to_python(self, raw: amqp.Message) -> pyamqp.Message:
        return pyamqp.Message(raw, channel=self)

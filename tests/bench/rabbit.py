"""RabbitMQ for the benchmark: the traffic as AMQP publishes, a raw-frame publisher, queue depths.

The traffic generator builds kombu's Redis envelopes (tests/bench/traffic.py). On AMQP a
worker's ``EventDispatcher`` sends the same kombu-JSON body with its properties in a
content header instead: ``to_publish`` turns one into the other. What a real dispatcher
sets, as RabbitMQ hands it to consumers: content_type ``application/json``,
content_encoding ``utf-8``, headers ``{"hostname": ...}``, delivery_mode 1 (transient),
priority 0, in that order (property flags 0xF800); exchange ``celeryev`` (topic), routing
key ``task.multi``, ``worker.heartbeat`` ... (checked in tests/test_bench_amqp.py).

``Publisher`` opens a py-amqp connection and channel (handshake, exchange declare,
``confirm.select``), then writes pre-built ``basic.publish`` + content header + body
frames on that channel, many messages per ``sendall``: publishing costs almost nothing
next to the consumer. A thread reads what the server sends back: publisher confirms
(``basic.ack``, so ``wait_confirms`` knows when every message is in the queues, like
Redis' PUBLISH replies), ``connection.blocked`` (RabbitMQ's memory or disk alarm), and
``channel.close``/``connection.close``, which make the next call fail loudly.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import orjson
from kombu import Connection

from tests.bench.traffic import EXCHANGE, Message

_FRAME = struct.Struct(">BHI")  # type, channel, payload size; then the payload and 0xCE
_METHOD = struct.Struct(">HH")  # class id, method id
_HEADER = struct.Struct(">HHQ")  # class id, weight, body size; then property flags and values
_FRAME_END = b"\xce"
_METHOD_FRAME, _HEADER_FRAME, _BODY_FRAME, _HEARTBEAT_FRAME = 1, 2, 3, 8
# Property flags, AMQP 0-9-1 basic class: the ones an EventDispatcher's message carries.
_CONTENT_TYPE, _CONTENT_ENCODING, _HEADERS, _DELIVERY_MODE, _PRIORITY = 0x8000, 0x4000, 0x2000, 0x1000, 0x0800

_BASIC_ACK = (60, 80)
_BASIC_NACK = (60, 120)
_CHANNEL_CLOSE = (20, 40)
_CONNECTION_CLOSE = (10, 50)
_CONNECTION_CLOSE_OK = (10, 51)
_BLOCKED = (10, 60)
_UNBLOCKED = (10, 61)


# -- the traffic as AMQP publishes ------------------------------------------------------------


@dataclass
class Publish:
    """One ``basic.publish``: what a worker's EventDispatcher sends for one traffic ``Message``."""

    exchange: bytes
    routing_key: bytes
    properties: bytes  # property flags + values, as in the content header frame
    body: bytes  # the kombu-JSON bytes (one event or a list)
    events: int


def shortstr(value: bytes) -> bytes:
    if len(value) > 255:
        raise ValueError(f"AMQP short strings hold 255 bytes at most: {value[:40]!r}...")
    return bytes([len(value)]) + value


def longstr(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def field_table(table: dict[str, str]) -> bytes:
    """A field table of string values (type ``S``, as py-amqp encodes a str)."""
    entries = b"".join(shortstr(k.encode()) + b"S" + longstr(v.encode()) for k, v in table.items())
    return longstr(entries)


def encode_properties(content_type: str | None, content_encoding: str | None, headers: dict[str, str] | None,
                      delivery_mode: int | None, priority: int | None) -> bytes:
    """Property flags and values of a basic content header (the properties kombu sets)."""
    flags, values = 0, []
    if content_type is not None:
        flags |= _CONTENT_TYPE
        values.append(shortstr(content_type.encode()))
    if content_encoding is not None:
        flags |= _CONTENT_ENCODING
        values.append(shortstr(content_encoding.encode()))
    if headers is not None:
        flags |= _HEADERS
        values.append(field_table(headers))
    if delivery_mode is not None:
        flags |= _DELIVERY_MODE
        values.append(bytes([delivery_mode]))
    if priority is not None:
        flags |= _PRIORITY
        values.append(bytes([priority]))
    return struct.pack(">H", flags) + b"".join(values)


class Converter:
    """Redis envelopes -> ``Publish``; the properties are built once per (hostname, ...)."""

    def __init__(self) -> None:
        self._properties: dict[tuple, bytes] = {}

    def __call__(self, message: Message) -> Publish:
        envelope = orjson.loads(message.payload)
        props = envelope["properties"]
        info = props["delivery_info"]
        key = (envelope["content-type"], envelope["content-encoding"], envelope["headers"]["hostname"],
               props["delivery_mode"], props["priority"])
        properties = self._properties.get(key)
        if properties is None:
            properties = self._properties[key] = encode_properties(
                key[0], key[1], dict(envelope["headers"]), key[3], key[4])
        return Publish(info["exchange"].encode(), info["routing_key"].encode(), properties,
                       base64.b64decode(envelope["body"]), message.events)


def to_publishes(messages: Iterable[Message]) -> list[Publish]:
    convert = Converter()
    return [convert(m) for m in messages]


def frames(publish: Publish, channel: int, frame_max: int) -> bytes:
    """The bytes of one publish: method frame, content header frame, body frame(s)."""
    method = _METHOD.pack(60, 40) + b"\x00\x00" + shortstr(publish.exchange) + shortstr(publish.routing_key) + b"\x00"
    header = _HEADER.pack(60, 0, len(publish.body)) + publish.properties
    out = [_FRAME.pack(_METHOD_FRAME, channel, len(method)), method, _FRAME_END,
           _FRAME.pack(_HEADER_FRAME, channel, len(header)), header, _FRAME_END]
    body, chunk = publish.body, frame_max - 8  # frame-max counts the 7-byte header and the end byte
    for start in range(0, len(body), chunk):
        part = body[start : start + chunk]
        out += [_FRAME.pack(_BODY_FRAME, channel, len(part)), part, _FRAME_END]
    return b"".join(out)


# -- the publisher ----------------------------------------------------------------------------


class BrokerRefused(RuntimeError):
    """RabbitMQ closed the publisher's channel or connection (or nacked a message)."""


class Publisher:
    """Raw ``basic.publish`` frames on a channel py-amqp opened, with publisher confirms.

    ``publish`` sends messages as fast as the socket takes them (RabbitMQ's flow control
    slows the socket down when its queues cannot keep up); ``wait_confirms`` blocks until
    RabbitMQ has routed every one of them to the queues bound at the time.
    """

    def __init__(self, url: str, frame_max: int | None = None, confirms: bool = True, batch: int = 512) -> None:
        self._conn = Connection(url, heartbeat=0, connect_timeout=10)
        self._conn.connect()
        amqp = self._conn.connection
        channel = amqp.channel()
        # What EventDispatcher declares before publishing (celery's event exchange).
        channel.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=False)
        if confirms:
            channel.confirm_select()
        self.confirms = confirms
        self.channel = channel.channel_id
        # Body frames may be smaller than the negotiated frame-max (``frame_max`` forces splits).
        self.frame_max = min(int(amqp.frame_max), frame_max or int(amqp.frame_max))
        self.batch = batch
        self._sock: socket.socket = amqp.transport.sock
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self._buffer = bytes(getattr(amqp.transport, "_read_buffer", b"") or b"")
        self.sent = 0  # messages
        self.confirmed = 0  # every delivery tag up to this one is confirmed (tags count messages from 1)
        self._confirmed_beyond: set[int] = set()  # single confirms past ``confirmed``
        self.nacked = 0
        self.blocked: str | None = None  # connection.blocked's reason while RabbitMQ blocks us
        self.blocked_seconds = 0.0
        self._blocked_at = 0.0
        self.error: str | None = None
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True, name="amqp-publish-replies")
        self._reader.start()

    # -- sending ------------------------------------------------------------------------

    def publish(self, publishes: Iterable[Publish]) -> int:
        """Flood: send everything as fast as the socket takes it; returns events sent."""
        events = 0
        batch: list[bytes] = []
        channel, frame_max = self.channel, self.frame_max
        for p in publishes:
            batch.append(frames(p, channel, frame_max))
            events += p.events
            if len(batch) >= self.batch:
                self._send(b"".join(batch), len(batch))
                batch.clear()
        if batch:
            self._send(b"".join(batch), len(batch))
        return events

    def _send(self, data: bytes, messages: int) -> None:
        self.check()
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise BrokerRefused(f"publishing to RabbitMQ failed: {exc} ({self.error or 'no reason given'})") from exc
        self.sent += messages

    def check(self) -> None:
        if self.error is not None:
            raise BrokerRefused(self.error)
        if self.nacked:
            raise BrokerRefused(f"RabbitMQ nacked {self.nacked} published messages")

    def wait_confirms(self, timeout: float = 120.0) -> None:
        """Block until RabbitMQ has confirmed every message sent so far."""
        if not self.confirms:
            raise RuntimeError("this publisher was opened without confirms")
        deadline = time.monotonic() + timeout
        while self.confirmed < self.sent and time.monotonic() < deadline and self.error is None:
            time.sleep(0.01)
        self.check()
        if self.confirmed < self.sent:
            state = f"; connection blocked: {self.blocked}" if self.blocked else ""
            raise TimeoutError(f"RabbitMQ confirmed {self.confirmed:,} of {self.sent:,} messages{state}")

    def close(self) -> None:
        """connection.close, wait for close-ok (a few seconds at most), then drop the socket."""
        if self.error is None and not self._closed.is_set():
            payload = _METHOD.pack(10, 50) + struct.pack(">H", 200) + shortstr(b"bench done") + struct.pack(">HH", 0, 0)
            with contextlib.suppress(OSError):
                self._sock.sendall(_FRAME.pack(_METHOD_FRAME, 0, len(payload)) + payload + _FRAME_END)
                self._closed.wait(5)
        with contextlib.suppress(OSError):
            self._sock.close()
        self._conn._connection = None  # py-amqp's reader is no longer in step with the socket
        self._reader.join(5)

    # -- what the server sends back -----------------------------------------------------

    def _read(self) -> None:
        buf = self._buffer
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except OSError as exc:
                if not self._closed.is_set():
                    self.error = self.error or f"connection to RabbitMQ lost: {exc}"
                return
            if not data:
                if not self._closed.is_set():
                    self.error = self.error or "RabbitMQ closed the publisher's connection"
                return
            buf += data
            start = 0
            while len(buf) - start >= 8:
                kind, _channel, size = _FRAME.unpack_from(buf, start)
                end = start + 7 + size
                if end >= len(buf):
                    break
                if buf[end] != _FRAME_END[0]:
                    self.error = f"AMQP framing error in what RabbitMQ sent the publisher (frame type {kind})"
                    return
                if kind == _METHOD_FRAME:
                    self._method(buf[start + 7 : end])
                elif kind != _HEARTBEAT_FRAME:
                    self.error = f"RabbitMQ sent an unexpected frame of type {kind} to the publisher"
                start = end + 1
            buf = buf[start:]

    def _method(self, payload: bytes) -> None:
        method = _METHOD.unpack_from(payload)
        if method in (_BASIC_ACK, _BASIC_NACK):
            tag, bits = struct.unpack_from(">QB", payload, 4)
            if method == _BASIC_NACK:
                self.nacked += 1
            self._confirm(tag, multiple=bool(bits & 1))
        elif method == _BLOCKED:
            self.blocked = payload[5 : 5 + payload[4]].decode(errors="replace")
            self._blocked_at = time.monotonic()
        elif method == _UNBLOCKED:
            self.blocked_seconds += time.monotonic() - self._blocked_at
            self.blocked = None
        elif method in (_CHANNEL_CLOSE, _CONNECTION_CLOSE):
            code = struct.unpack_from(">H", payload, 4)[0]
            text = payload[7 : 7 + payload[6]].decode(errors="replace")
            what = "channel" if method == _CHANNEL_CLOSE else "connection"
            self.error = f"RabbitMQ closed the publisher's {what}: {code} {text}"
            self._closed.set()
        elif method == _CONNECTION_CLOSE_OK:
            self._closed.set()


    def _confirm(self, tag: int, multiple: bool) -> None:
        beyond = self._confirmed_beyond
        if multiple:
            self.confirmed = max(self.confirmed, tag)
        elif tag > self.confirmed:
            beyond.add(tag)
        upto = self.confirmed
        while upto + 1 in beyond:
            upto += 1
        if beyond:
            beyond.difference_update([t for t in beyond if t <= upto])
        self.confirmed = upto


# -- the broker's side ------------------------------------------------------------------------


@contextmanager
def bench_vhost() -> Iterator[str]:
    """A private vhost on the local RabbitMQ for one benchmark run (deleted afterwards)."""
    from tests.support.brokers import private_vhost

    if shutil.which("rabbitmqctl") is None:
        raise SystemExit("--broker amqp needs rabbitmqctl (rabbitmq-server) and permission to run it")
    with private_vhost() as url:
        yield url


def vhost_of(url: str) -> str:
    return Connection(url).virtual_host


@dataclass
class QueueInfo:
    name: str
    messages: int
    consumers: int


def list_queues(url: str) -> list[QueueInfo]:
    """The vhost's queues as ``rabbitmqctl list_queues`` reports them (about half a second)."""
    out = subprocess.run(["rabbitmqctl", "list_queues", "-p", vhost_of(url), "--no-table-headers", "--quiet",
                          "name", "messages", "consumers"], capture_output=True, text=True, timeout=60, check=True)
    queues = []
    for line in out.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[1].isdigit():
            queues.append(QueueInfo(parts[0], int(parts[1]), int(parts[2])))
    return queues


def rabbitmq_version() -> str:
    try:
        out = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


class QueueDepth:
    """Queue depths by passive ``queue.declare`` on a connection of our own (cheap, unlike
    rabbitmqctl). An exclusive queue of another connection cannot be inspected this way
    (RESOURCE_LOCKED): ``messages`` returns None for it."""

    def __init__(self, url: str) -> None:
        self._conn = Connection(url, heartbeat=0, connect_timeout=10)
        self._conn.connect()
        self._channel = self._conn.connection.channel()

    def messages(self, queue: str) -> int | None:
        try:
            return int(self._channel.queue_declare(queue, passive=True).message_count)
        except self._conn.channel_errors:
            self._channel = self._conn.connection.channel()
            return None

    def delete(self, queue: str) -> None:
        try:
            self._channel.queue_delete(queue)
        except self._conn.channel_errors:
            self._channel = self._conn.connection.channel()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.release()

"""The AMQP fast path: read RabbitMQ's event deliveries off the socket, without kombu.

On RabbitMQ the stock EventReceiver spends most of its time in py-amqp reading frames
(several exact-size ``recv`` calls per message) and in kombu building a Message and
looking up a serializer for every event. Here py-amqp (through kombu's Connection, so every
URL form and TLS option the stock path accepts works the same) does what it does well: the
handshake, the event queue's declaration and binding, ``basic.consume``. Then this module
owns the socket: it reads it in big chunks, splits the AMQP 0-9-1 frames itself, and hands
each delivery's body to the shared decoder (monitor/intake/decoder.py, orjson), so the pipeline
gets the same event dicts EventReceiver would produce.

What the server can send besides deliveries is handled: heartbeats (answered, and a silent
server is a lost connection), bodies split over several frames (frame-max as negotiated),
``connection.blocked``/``unblocked`` (logged: a consumer that never publishes is not held
up), ``channel.close`` and ``connection.close`` (acknowledged, then a ``ConnectionError``),
and ``basic.cancel`` (the queue was deleted: a ``ConnectionError``, so the intake
reconnects and declares it again). Anything that breaks the framing is a
``ConnectionError`` too: the intake logs it, shows it on /health and reconnects with backoff.

Only ``amqp://``/``amqps://``/``pyamqp://`` URLs with one broker take this path; a failover
list (``;``) or another AMQP client library stays on the stock path (``fast_path_serves``).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from kombu import Connection

from celery_sidecar.monitor.boundary.parse import UNDECODABLE
from celery_sidecar.monitor.intake.decoder import EventDecoder, undecoded_body_reason
from celery_sidecar.monitor.intake.event_queue import EXCHANGE, EventQueue

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 60  # unless the URL says (?heartbeat=N); negotiated: the smaller of ours and the server's
BACKLOG_SECONDS = 5.0  # how often the queue's depth is asked for (celery_sidecar_event_queue_messages)
_POLL_SECONDS = 0.5
_RECV_BUFFER = 1 << 20
_COALESCE_BELOW = 64 << 10  # after a short read, let 100 ms of light traffic gather (see redis_pubsub.py)
_COALESCE_SECONDS = 0.1
# Content types kombu hands over undecoded (none at all reads as application/data): no event.
_RAW_CONTENT = (b"", b"application/data", b"application/text")

_FRAME = struct.Struct(">BHI")  # type, channel, payload size; then the payload and 0xCE
_METHOD = struct.Struct(">HH")  # class id, method id
_SIZE_FLAGS = struct.Struct(">QH")  # content header: body size, property flags (after class id, weight)
_FRAME_END = 0xCE
_METHOD_FRAME, _HEADER_FRAME, _BODY_FRAME, _HEARTBEAT_FRAME = 1, 2, 3, 8
_HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"

_DELIVER = (60, 60)
_CANCEL = (60, 30)
_DECLARE_OK = (50, 11)
_CHANNEL_CLOSE = (20, 40)
_CONNECTION_CLOSE = (10, 50)
_BLOCKED = (10, 60)
_UNBLOCKED = (10, 61)


def fast_path_serves(broker_url: str, transport_options: dict | None = None) -> bool:
    """Whether this path can consume from ``broker_url`` (else the stock path does)."""
    conn = Connection(broker_url, transport_options=dict(transport_options or {}))
    try:
        return conn.transport_cls in ("amqp", "amqps", "pyamqp") and len(conn.alt) <= 1
    finally:
        conn.release()


def stream_events(broker_url: str, transport_options: dict | None, queue: EventQueue,
                  on_event: Callable[[dict], None], on_skip: Callable[[str], None], stop: threading.Event,
                  on_connected: Callable[[], None] | None = None,
                  on_backlog: Callable[[int], None] | None = None,
                  on_checked: Callable[[str, tuple, float], None] | None = None, ssl_options: Any = None) -> None:
    """Consume the event stream until ``stop`` is set.

    Raises ``ConnectionError`` when the connection cannot be made, breaks, or the server
    closes it or the queue (the caller owns reconnecting). ``on_connected`` runs once the
    consumer is registered; ``on_backlog`` gets the queue's depth every few seconds.
    ``ssl_options``: py-amqp's TLS options (celery's ``broker_use_ssl``: a CA, a client
    certificate and key, ``cert_reqs``), for the handshake py-amqp does.
    """
    extra = {"ssl": ssl_options} if ssl_options else {}
    conn = Connection(broker_url, transport_options=dict(transport_options or {}), connect_timeout=10, **extra)
    if not conn.heartbeat:  # the URL may ask for another interval (?heartbeat=10)
        conn.heartbeat = HEARTBEAT_SECONDS
    try:
        try:
            conn.connect()
            amqp = conn.connection
            channel = amqp.channel()
            channel.exchange_declare(EXCHANGE, "topic", durable=True, auto_delete=False)
            channel.queue_declare(queue.name, durable=False, exclusive=False, auto_delete=False,
                                  arguments=queue.arguments())
            channel.queue_bind(queue.name, EXCHANGE, routing_key="#")
            channel.basic_consume(queue.name, no_ack=True)
        except conn.connection_errors + conn.channel_errors + (OSError,) as exc:
            raise ConnectionError(f"AMQP setup failed: {type(exc).__name__}: {exc}") from exc
        if on_connected is not None:
            on_connected()
        decoder = EventDecoder(on_event, on_skip, on_checked=on_checked)
        reader = FrameReader(amqp.transport, channel.channel_id, queue.name, decoder, on_skip,
                             heartbeat=float(amqp.heartbeat or 0), frame_max=int(amqp.frame_max),
                             on_backlog=on_backlog)
        reader.run(stop)
        reader.goodbye()
    finally:
        _drop(conn)


def _drop(conn: Connection) -> None:
    """Close the socket without py-amqp's close handshake: its reader is no longer in step
    with the stream (we read past it), so its close() could wait on frames it misreads."""
    amqp = getattr(conn, "_connection", None)  # not conn.connection: that would reconnect
    sock = getattr(getattr(amqp, "transport", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
    conn._connection = None


class FrameReader:
    """Reads AMQP 0-9-1 frames from a connection py-amqp has opened, and decodes deliveries."""

    def __init__(self, transport, channel_id: int, queue: str, decoder: EventDecoder,
                 on_skip: Callable[[str], None], *, heartbeat: float, frame_max: int,
                 on_backlog: Callable[[int], None] | None = None) -> None:
        self._transport = transport
        # No SO_RCVBUF here: set on a connected socket it shrinks the window TCP already
        # advertised, and after a pause the kernel drops segments (RabbitMQ then backs off
        # for seconds). The kernel's autotuned buffer is the right one.
        self._sock: socket.socket = transport.sock
        self._channel = channel_id
        self._queue = queue.encode()
        self._decoder = decoder
        self._on_skip = on_skip
        self._heartbeat = heartbeat
        self._on_backlog = on_backlog
        size = max(_RECV_BUFFER, frame_max + 8)
        self._buf = bytearray(size)
        # py-amqp reads exact sizes, but keep anything it buffered (a partial read).
        leftover = bytes(getattr(transport, "_read_buffer", b"") or b"")
        self._buf[: len(leftover)] = leftover
        self._end = len(leftover)
        # The delivery being assembled: its body size, JSON or not, and its frames so far.
        self._body_left = -1  # -1: no delivery started; 0..n: bytes of body still to come
        self._body_json = False
        self._content_type = self._encoding = b""
        self._parts: list[bytes] = []
        self._expect_header = False
        now = time.monotonic()
        self._last_recv = self._last_send = now
        self._next_backlog = now if on_backlog is not None else float("inf")

    # -- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        sock, decoder = self._sock, self._decoder
        sock.settimeout(_POLL_SECONDS)
        while not stop.is_set():
            self._frames()
            now = time.monotonic()
            self._keep_alive(now)
            if now >= self._next_backlog:
                self._ask_backlog()
                self._next_backlog = now + BACKLOG_SECONDS
            buf = self._buf
            if self._end == len(buf):  # one frame larger than the buffer: grow it (frame-max bounds it)
                buf.extend(bytes(len(buf)))
            try:
                size = sock.recv_into(memoryview(buf)[self._end:])
            except TimeoutError:
                continue
            except OSError as exc:
                raise ConnectionError(f"AMQP connection lost: {exc}") from exc
            if not size:
                raise ConnectionError("RabbitMQ closed the connection")
            self._end += size
            self._last_recv = time.monotonic()
            decoder.refresh()
            if size < _COALESCE_BELOW and not self._more_here():
                self._frames()
                stop.wait(_COALESCE_SECONDS)

    def _more_here(self) -> bool:
        """Whether more of the stream has already arrived. A TLS read returns one record (16 KB
        at most, often less), so on amqps:// a short read does not mean the traffic is light."""
        sock = self._sock
        if not isinstance(sock, ssl.SSLSocket):
            return False
        return bool(sock.pending() or select.select([sock], [], [], 0)[0])

    def _frames(self) -> None:
        """Handle every complete frame in the buffer, then move the rest to its start."""
        buf, end = self._buf, self._end
        view = memoryview(buf)
        start = 0
        unpack_frame = _FRAME.unpack_from
        try:
            while end - start >= 8:
                kind, _channel, size = unpack_frame(buf, start)
                frame_end = start + 7 + size
                if frame_end >= end:
                    break
                if buf[frame_end] != _FRAME_END:
                    raise ConnectionError(f"AMQP framing error: frame of type {kind} does not end with 0xCE")
                payload = view[start + 7 : frame_end]
                if kind == _BODY_FRAME:
                    self._body(payload)
                elif kind == _HEADER_FRAME:
                    self._header(payload)
                elif kind == _METHOD_FRAME:
                    self._method(payload)
                elif kind != _HEARTBEAT_FRAME:
                    raise ConnectionError(f"AMQP protocol error: unknown frame type {kind}")
                start = frame_end + 1
        finally:
            del view
        if start:
            rest = end - start
            buf[:rest] = buf[start:end]
            self._end = rest

    # -- frames ---------------------------------------------------------------------------

    def _method(self, payload: memoryview) -> None:
        method = _METHOD.unpack_from(payload)
        if method == _DELIVER:
            self._expect_header = True
        elif method == _DECLARE_OK:
            name_len = payload[4]
            count = struct.unpack_from(">I", payload, 5 + name_len)[0]
            if self._on_backlog is not None:
                self._on_backlog(count)
        elif method == _CHANNEL_CLOSE:
            code, text = _reply(payload)
            self._send_method(self._channel, 20, 41)
            raise ConnectionError(f"RabbitMQ closed the event channel: {code} {text}")
        elif method == _CONNECTION_CLOSE:
            code, text = _reply(payload)
            self._send_method(0, 10, 51)
            raise ConnectionError(f"RabbitMQ closed the connection: {code} {text}")
        elif method == _CANCEL:
            raise ConnectionError("RabbitMQ cancelled the consumer (the event queue was deleted); redeclaring it")
        elif method == _BLOCKED:
            log.warning("RabbitMQ blocked this connection (%s); the sidecar does not publish, so it reads on",
                        _shortstr(payload, 4))
        elif method == _UNBLOCKED:
            log.info("RabbitMQ unblocked this connection")

    def _header(self, payload: memoryview) -> None:
        if not self._expect_header:
            raise ConnectionError("AMQP protocol error: a content header outside a delivery")
        self._expect_header = False
        body_size, flags = _SIZE_FLAGS.unpack_from(payload, 4)
        pos, content_type, encoding = 14, b"", b""
        if flags & 0x8000:
            content_type, pos = _read_shortstr(payload, pos)
        if flags & 0x4000:
            encoding, pos = _read_shortstr(payload, pos)
        # EventReceiver decodes JSON whatever the encoding says; kombu refuses other content types.
        self._body_json = content_type == b"application/json"
        self._content_type, self._encoding = content_type, encoding
        self._parts = []
        self._body_left = body_size
        if body_size == 0:
            self._delivered(b"")

    def _body(self, payload: memoryview) -> None:
        left = self._body_left - len(payload)
        if self._body_left < 0 or left < 0:
            raise ConnectionError("AMQP protocol error: body frame outside a delivery or past its size")
        if left == 0 and not self._parts:
            self._body_left = -1
            self._delivered(payload)  # the usual case: the whole body in one frame, decoded in place
            return
        self._parts.append(bytes(payload))
        self._body_left = left
        if left == 0:
            self._body_left = -1
            body, self._parts = b"".join(self._parts), []
            self._delivered(body)

    def _delivered(self, body: bytes | memoryview) -> None:
        if self._body_json:
            self._decoder.feed_body(body)
        elif self._content_type in _RAW_CONTENT:
            self._on_skip(undecoded_body_reason(bytes(body), self._encoding.decode(errors="replace")))
        else:
            self._on_skip(UNDECODABLE)

    # -- writing --------------------------------------------------------------------------

    def _keep_alive(self, now: float) -> None:
        beat = self._heartbeat
        if not beat:
            return
        if now - self._last_recv > 2 * beat:
            raise ConnectionError(f"no data nor heartbeat from RabbitMQ for {now - self._last_recv:.0f}s")
        if now - self._last_send > beat / 2:
            self._write(_HEARTBEAT)

    def _ask_backlog(self) -> None:
        # queue.declare, passive: the depth comes back in declare-ok (handled in _method). On
        # this connection because celery's event queues may be exclusive to it.
        args = struct.pack(">H", 0) + bytes([len(self._queue)]) + self._queue + b"\x01" + struct.pack(">I", 0)
        self._send_method(self._channel, 50, 10, args)

    def goodbye(self) -> None:
        """On a clean stop: delete the queue (nothing will consume it) and close, without waiting."""
        args = struct.pack(">H", 0) + bytes([len(self._queue)]) + self._queue + b"\x04"  # no-wait
        try:
            self._send_method(self._channel, 50, 40, args)
            self._send_method(0, 10, 50, struct.pack(">HB", 200, 0) + struct.pack(">HH", 0, 0))
        except ConnectionError:
            pass

    def _send_method(self, channel: int, class_id: int, method_id: int, args: bytes = b"") -> None:
        payload = _METHOD.pack(class_id, method_id) + args
        self._write(_FRAME.pack(_METHOD_FRAME, channel, len(payload)) + payload + b"\xce")

    def _write(self, data: bytes) -> None:
        try:
            self._transport.write(data)
        except OSError as exc:
            raise ConnectionError(f"AMQP connection lost: {exc}") from exc
        self._last_send = time.monotonic()


def _read_shortstr(payload: memoryview, pos: int) -> tuple[bytes, int]:
    length = payload[pos]
    return bytes(payload[pos + 1 : pos + 1 + length]), pos + 1 + length


def _shortstr(payload: memoryview, pos: int) -> str:
    return _read_shortstr(payload, pos)[0].decode(errors="replace")


def _reply(payload: memoryview) -> tuple[int, str]:
    """reply-code and reply-text of channel.close / connection.close."""
    return struct.unpack_from(">H", payload, 4)[0], _shortstr(payload, 6)

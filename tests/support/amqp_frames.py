"""The AMQP fast path's frame reader in-process: deliveries as RabbitMQ frames them, no socket read.

``AmqpFrames.deliver`` writes one delivery (basic.deliver, the content header, the body in
frames of at most frame-max) into the reader's buffer as a read from the socket would, and
lets the reader handle every complete frame, as its loop does after each read.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from celery_sidecar.monitor.intake.amqp_socket import FrameReader
from celery_sidecar.monitor.intake.decoder import EventDecoder
from tests.support.amqp_proxy import method_frame, shortstr

FRAME_MAX = 131_072  # RabbitMQ's default


class _Transport:
    def __init__(self) -> None:
        self.sock, self._peer = socket.socketpair()
        self._read_buffer = b""

    def write(self, data: bytes) -> None:  # heartbeats and the like: nobody reads them here
        pass

    def close(self) -> None:
        self.sock.close()
        self._peer.close()


def delivery(body: bytes, content_type: str | None = "application/json", content_encoding: str | None = "utf-8",
             frame_max: int = FRAME_MAX) -> bytes:
    """The frames of one delivery on channel 1."""
    deliver = method_frame(1, 60, 60, shortstr("ctag") + struct.pack(">QB", 1, 0) + shortstr("celeryev")
                           + shortstr("task.multi"))
    flags, props = 0, b""
    if content_type is not None:
        flags |= 0x8000
        props += shortstr(content_type)
    if content_encoding is not None:
        flags |= 0x4000
        props += shortstr(content_encoding)
    header = struct.pack(">HHQH", 60, 0, len(body), flags) + props
    frames = [deliver, struct.pack(">BHI", 2, 1, len(header)) + header + b"\xce"]
    step = frame_max - 8
    for start in range(0, len(body), step):
        chunk = body[start:start + step]
        frames.append(struct.pack(">BHI", 3, 1, len(chunk)) + chunk + b"\xce")
    return b"".join(frames)


class AmqpFrames:
    """A FrameReader over a socket nobody writes to, fed deliveries by hand."""

    def __init__(self, decoder: EventDecoder, on_skip: Any) -> None:
        self._transport = _Transport()
        self.reader = FrameReader(self._transport, 1, "celeryev.test", decoder, on_skip, heartbeat=0,
                                  frame_max=FRAME_MAX)

    def deliver(self, body: bytes, **properties: Any) -> None:
        data = memoryview(delivery(body, **properties))
        reader = self.reader
        while data:
            room = len(reader._buf) - reader._end
            taken = data[:room]
            reader._buf[reader._end:reader._end + len(taken)] = taken
            reader._end += len(taken)
            data = data[len(taken):]
            reader._frames()

    def close(self) -> None:
        self._transport.close()

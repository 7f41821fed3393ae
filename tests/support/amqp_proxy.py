"""A TCP proxy in front of the real RabbitMQ that can misbehave on cue, frame by frame.

Client → server bytes pass through untouched. Server → client bytes are split into AMQP
frames, so a test can slip a frame of its own in between two of the server's (the
server's ``connection.blocked``, a ``channel.close`` ...), or go silent (a half-open
connection: nothing reaches the client, heartbeats included).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections import deque

from tests.support.servers import free_port

PROTOCOL_HEADER = 8  # b"AMQP\x00\x00\x09\x01", client to server


def method_frame(channel: int, class_id: int, method_id: int, args: bytes = b"") -> bytes:
    payload = struct.pack(">HH", class_id, method_id) + args
    return struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce"


def shortstr(text: str) -> bytes:
    data = text.encode()
    return bytes([len(data)]) + data


def close_args(code: int, text: str) -> bytes:
    return struct.pack(">H", code) + shortstr(text) + struct.pack(">HH", 0, 0)


class AmqpProxy:
    def __init__(self, upstream_port: int = 5672) -> None:
        self.port = free_port()
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._inject: deque[bytes] = deque()
        self._lock = threading.Lock()
        self.silent = threading.Event()  # set: drop everything the server sends
        self.connections = 0
        self.consumers = 0  # connections that started consuming (got basic.consume-ok)
        self._consumer = 0  # the number of the newest of them
        self._closing = False
        threading.Thread(target=self._accept, daemon=True, name="amqp-proxy").start()

    def url(self, vhost_url: str) -> str:
        """``vhost_url`` (amqp://user:pass@127.0.0.1:5672/vhost) through this proxy."""
        return vhost_url.replace(f":{self._upstream[1]}/", f":{self.port}/", 1)

    def inject(self, frame: bytes) -> None:
        """Send ``frame`` to the consumer between two of the server's frames.

        The consumer's connection is the newest one that got ``basic.consume-ok`` (the
        sidecar also opens short connections of its own, to broadcast to workers).
        """
        with self._lock:
            self._inject.append(frame)

    def close(self) -> None:
        self._closing = True
        self._listener.close()

    # -- plumbing -----------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            self.connections += 1
            number = self.connections
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._frames, args=(upstream, client, number), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(src, dst)

    def _frames(self, src: socket.socket, dst: socket.socket, number: int) -> None:
        """Server to client, a frame at a time: drops them while silent, slips in injections."""
        buf = b""
        src.settimeout(0.05)
        try:
            while True:
                try:
                    data = src.recv(65536)
                    if not data:
                        break
                    buf += data
                except TimeoutError:
                    pass
                while len(buf) >= 7:
                    kind, _channel, size = struct.unpack_from(">BHI", buf)
                    if len(buf) < size + 8:
                        break
                    frame, buf = buf[: size + 8], buf[size + 8 :]
                    if kind == 1 and struct.unpack_from(">HH", frame, 7) == (60, 21):
                        with self._lock:
                            self.consumers += 1
                            self._consumer = number
                    if not self.silent.is_set():
                        dst.sendall(frame)
                with self._lock:
                    pending = list(self._inject) if number == self._consumer else []
                    if pending:
                        self._inject.clear()
                for frame in pending:
                    dst.sendall(frame)
        except OSError:
            pass
        finally:
            _shut(src, dst)


def _shut(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

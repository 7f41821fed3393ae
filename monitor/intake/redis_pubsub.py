"""The Redis fast path: read Celery's event pub/sub stream in bulk, without kombu.

On Redis, Celery events are pub/sub messages, and Redis drops a subscriber that falls
about 32 MB behind (``client-output-buffer-limit pubsub 32mb 8mb 60``). kombu reads one
message per ``parse_response`` call and builds a ``Message`` object for each; that tops
out near 11k events/s on a small machine. Here we read the socket in big chunks, let
hiredis split the RESP replies, and decode only the envelope's ``body`` with orjson.

The events handed to ``on_event`` are the dicts ``EventReceiver.event_from_message``
would produce (timestamps adjusted with ``utcoffset``, ``clock`` and ``local_received``
set), so the pipeline cannot tell which path fed it. tests/test_fast_path.py holds the
two paths to that.

Every Redis URL form takes this path (monitor/intake/redis_endpoint.py): ``redis://``, TLS
(``rediss://``, with the app's ``broker_use_ssl``), unix sockets (``redis+socket://``,
``socket://``) and Sentinel (``sentinel://``, the master asked for on every connection, so a
failover is followed by the reconnect it causes). What only kombu can serve (a credential
provider, say) stays on the stock path: ``endpoint_for`` returns None, ``resolve`` says why.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import hiredis

from celery_sidecar.monitor.intake.broker_url import redact
from celery_sidecar.monitor.intake.decoder import EventDecoder
from celery_sidecar.monitor.intake.redis_connect import connect
from celery_sidecar.monitor.intake.redis_endpoint import RedisEndpoint, resolve

__all__ = [
    "RedisEndpoint",
    "endpoint_for",
    "stream_events",
]


_RECV_BUFFER = 1 << 20  # one recv() may return a few thousand messages; fewer syscalls
# hiredis' reader memmoves its unread buffer each time it has consumed 1 KB, so feeding it
# a whole megabyte at once is quadratic (5.8 us/message at 1 MB vs 0.5 us at 16 KB).
_FEED_SLICE = 16 << 10
_POLL_SECONDS = 0.5  # how often an idle reader checks ``stop``
# Under light traffic a read returns a handful of messages, and each wake-up costs more per
# event than a long batch does (about 20 us an event at 4,000 events/s vs 14 us when
# draining). After a short read the reader lets 100 ms of traffic gather first: about a
# quarter less CPU at 1,000 tasks/s (10-11 % of a core -> 7.5-8 %), for at most 100 ms more
# latency. Heavy traffic keeps every read long, so this never waits; and 100 ms even at
# 30,000 events/s is ~1.5 MB waiting in Redis, far below its 8 MB pubsub soft limit.
_COALESCE_BELOW = 64 << 10
_COALESCE_SECONDS = 0.1


def endpoint_for(broker_url: str, transport_options: dict | None = None,
                 ssl_options: Any = None) -> RedisEndpoint | None:
    """The endpoint for ``broker_url``, or None when only the stock kombu path can serve it."""
    endpoint = resolve(broker_url, transport_options, ssl_options)
    return endpoint if isinstance(endpoint, RedisEndpoint) else None


def stream_events(broker_url: str, transport_options: dict | None,
                  on_event: Callable[[dict], None], on_skip: Callable[[str], None],
                  stop: threading.Event, on_connected: Callable[[], None] | None = None,
                  on_checked: Callable[[str, tuple, float], None] | None = None, ssl_options: Any = None) -> None:
    """Consume the event stream until ``stop`` is set.

    Returns when ``stop`` is set. Raises ``ConnectionError`` when the connection cannot be
    made or is lost (the caller owns reconnect and backoff), ``ValueError`` when the URL
    needs the stock path (check ``endpoint_for`` first). ``on_connected`` runs once the
    subscription is confirmed, i.e. from then on no published event is missed.
    """
    endpoint = resolve(broker_url, transport_options, ssl_options)
    if not isinstance(endpoint, RedisEndpoint):
        raise ValueError(f"the Redis fast path cannot serve {redact(broker_url)} ({endpoint}); use the stock path")
    decoder = EventDecoder(on_event, on_skip, on_checked=on_checked)
    sock, where = connect(endpoint)
    try:
        reader = hiredis.Reader()
        _subscribe(sock, reader, endpoint, where)
        if on_connected is not None:
            on_connected()
        _read_loop(sock, reader, decoder, endpoint, stop)
    finally:
        sock.close()


def _command(*args: str | bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _subscribe(sock: socket.socket, reader: hiredis.Reader, endpoint: RedisEndpoint, where: str) -> None:
    """AUTH, ROLE (a master Sentinel named), name the client, PSUBSCRIBE; wait for each reply
    so failures are explicit."""
    commands: list[tuple[str, bytes]] = []
    if endpoint.password is not None:
        auth = ("AUTH", endpoint.username, endpoint.password) if endpoint.username else (
            "AUTH", endpoint.password)
        commands.append(("AUTH", _command(*auth)))
    if endpoint.sentinels:
        commands.append(("ROLE", _command("ROLE")))
    if endpoint.client_name:
        commands.append(("CLIENT SETNAME", _command("CLIENT", "SETNAME", endpoint.client_name)))
    commands.append(("PSUBSCRIBE", _command("PSUBSCRIBE", endpoint.pattern)))
    _send(sock, b"".join(cmd for _, cmd in commands))
    for name, _ in commands:
        reply = _read_reply(sock, reader)
        if name == "ROLE":
            # Sentinel may still name a master it demoted a moment ago: asked again, after backoff.
            # A ROLE the ACL forbids (an error) proves nothing either way.
            if isinstance(reply, list) and reply and reply[0] != b"master":
                raise ConnectionError(f"Sentinel named {where} the master of {endpoint.master_name!r}, "
                                      f"but it is a {reply[0].decode(errors='replace')}")
        elif isinstance(reply, hiredis.ReplyError):
            raise ConnectionError(f"Redis refused {name}: {reply}")


def _read_reply(sock: socket.socket, reader: hiredis.Reader) -> object:
    while (reply := reader.gets()) is False:
        try:
            data = sock.recv(65536)
        except OSError as exc:
            raise ConnectionError(f"Redis connection lost during handshake: {exc}") from exc
        if not data:
            raise ConnectionError("Redis closed the connection during handshake")
        reader.feed(data)
    return reply


def _read_loop(sock: socket.socket, reader: hiredis.Reader, decoder: EventDecoder,
               endpoint: RedisEndpoint, stop: threading.Event) -> None:
    sock.settimeout(_POLL_SECONDS)
    buffer = bytearray(_RECV_BUFFER)
    receive = _tls_receiver(sock, buffer) if isinstance(sock, ssl.SSLSocket) else sock.recv_into
    feed, gets, decode = reader.feed, reader.gets, decoder.feed
    health = endpoint.health_check_interval
    last_data = time.monotonic()
    ping_sent = False
    while not stop.is_set():
        try:
            size = receive(buffer)
        except TimeoutError:
            # Idle: PING so a half-open connection (NAT/firewall timeout, failover) is noticed.
            idle = time.monotonic() - last_data
            if health and idle > health and not ping_sent:
                _send(sock, _command("PING"))
                ping_sent = True
            elif health and ping_sent and idle > 2 * health:
                raise ConnectionError(f"no reply from Redis for {idle:.0f}s (PING unanswered)") from None
            continue
        except OSError as exc:
            raise ConnectionError(f"Redis connection lost: {exc}") from exc
        if not size:
            raise ConnectionError("Redis closed the connection (restart, failover, or pubsub output buffer limit)")
        last_data = time.monotonic()
        ping_sent = False
        decoder.refresh()
        for offset in range(0, size, _FEED_SLICE):
            feed(buffer, offset, min(_FEED_SLICE, size - offset))
            while (reply := gets()) is not False:
                # pmessage replies are [b"pmessage", pattern, channel, payload].
                if type(reply) is list and len(reply) == 4:
                    decode(reply[3])
                elif isinstance(reply, hiredis.ReplyError):
                    raise ConnectionError(f"Redis error on the subscription: {reply}")
                # Anything else is a PING's pong or a (p)subscribe confirmation.
        if size < _COALESCE_BELOW:
            stop.wait(_COALESCE_SECONDS)


def _tls_receiver(sock: ssl.SSLSocket, buffer: bytearray) -> Callable[[bytearray], int]:
    """``recv_into`` for TLS: one TLS read returns one record (16 KB at most), so it reads on
    while more has arrived, up to the buffer, as one plain read would return it. Without that,
    every short read under load would look like light traffic and wait to coalesce."""
    view = memoryview(buffer)
    room = len(buffer) - (16 << 10)

    def receive(_buffer: bytearray) -> int:
        size = sock.recv_into(view)
        while size and size < room and (sock.pending() or select.select([sock], [], [], 0)[0]):
            try:
                more = sock.recv_into(view[size:])
            except TimeoutError:  # a record only partly here: the rest comes with the next read
                break
            if not more:
                break
            size += more
        return size

    return receive


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as exc:
        raise ConnectionError(f"Redis connection lost: {exc}") from exc


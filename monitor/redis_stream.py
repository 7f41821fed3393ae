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

Only plain ``redis://`` URLs take this path. Sentinel, unix sockets, TLS (``rediss://``)
and credential providers stay on the stock kombu path: see ``endpoint_for``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import hiredis
from kombu import Connection

from celery_sidecar.monitor.decoder import EventDecoder

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
_DEFAULT_HEALTH_CHECK = 25.0  # kombu's default health_check_interval
_EVENT_EXCHANGE = "celeryev"


@dataclass(frozen=True)
class RedisEndpoint:
    """Where to connect and which pattern to PSUBSCRIBE to."""

    host: str
    port: int
    username: str | None
    password: str | None
    pattern: bytes
    connect_timeout: float
    health_check_interval: float
    client_name: str | None = None


def endpoint_for(broker_url: str, transport_options: dict | None = None,
                 exchange: str = _EVENT_EXCHANGE) -> RedisEndpoint | None:
    """The endpoint for ``broker_url``, or None when only the stock kombu path can serve it.

    The subscribe pattern is built exactly as kombu's Redis channel builds it for the
    queue EventReceiver binds to the ``celeryev`` fanout exchange with routing key ``#``:
    ``global_keyprefix + keyprefix_fanout.format(db=db) + exchange + "/*"``.
    """
    options = dict(transport_options or {})
    conn = Connection(broker_url, transport_options=options)
    # 'redis' only: rediss (TLS), sentinel and redis+socket keep the stock path, which
    # already gets certificates, failover and unix sockets right.
    if conn.transport_cls != "redis" or conn.ssl or "://" in (conn.hostname or ""):
        return None
    if options.get("credential_provider"):
        return None
    return RedisEndpoint(
        host=conn.hostname or "127.0.0.1",
        port=int(conn.port or 6379),
        username=conn.userid or None,
        password=conn.password or None,
        pattern=_subscribe_pattern(options, _db_number(conn.virtual_host), exchange).encode(),
        connect_timeout=float(options.get("socket_connect_timeout") or 5.0),
        health_check_interval=float(options.get("health_check_interval", _DEFAULT_HEALTH_CHECK) or 0),
        client_name=options.get("client_name"),
    )


def _db_number(virtual_host: object) -> int:
    # Same rules as kombu's Channel._prepare_virtual_host.
    if isinstance(virtual_host, int):
        return virtual_host
    text = str(virtual_host or "")
    if not text or text == "/":
        return 0
    return int(text.lstrip("/"))


def _subscribe_pattern(options: dict, db: int, exchange: str) -> str:
    fanout_prefix = options.get("fanout_prefix", True)
    if isinstance(fanout_prefix, str):
        prefix = fanout_prefix
    elif fanout_prefix:
        prefix = "/{db}."
    else:
        prefix = ""
    prefix = prefix.format(db=db)
    # kombu turns the binding key '#' into the glob '*' (Channel._queue_bind);
    # without fanout_patterns the routing key is not part of the topic at all.
    topic = f"{prefix}{exchange}/*" if options.get("fanout_patterns", True) else f"{prefix}{exchange}"
    return options.get("global_keyprefix", "") + topic


def stream_events(broker_url: str, transport_options: dict | None,
                  on_event: Callable[[dict], None], on_skip: Callable[[str], None],
                  stop: threading.Event, on_connected: Callable[[], None] | None = None,
                  on_checked: Callable[[str, tuple, float], None] | None = None) -> None:
    """Consume the event stream until ``stop`` is set.

    Returns when ``stop`` is set. Raises ``ConnectionError`` when the connection cannot be
    made or is lost (the caller owns reconnect and backoff), ``ValueError`` when the URL
    needs the stock path (check ``endpoint_for`` first). ``on_connected`` runs once the
    subscription is confirmed, i.e. from then on no published event is missed.
    """
    endpoint = endpoint_for(broker_url, transport_options)
    if endpoint is None:
        raise ValueError(f"the Redis fast path cannot serve {_redact(broker_url)}; use the stock path")
    decoder = EventDecoder(on_event, on_skip, on_checked=on_checked)
    sock = _connect(endpoint)
    try:
        reader = hiredis.Reader()
        _subscribe(sock, reader, endpoint)
        if on_connected is not None:
            on_connected()
        _read_loop(sock, reader, decoder, endpoint, stop)
    finally:
        sock.close()


def _connect(endpoint: RedisEndpoint) -> socket.socket:
    error: OSError | None = None
    try:
        addresses = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectionError(f"cannot resolve Redis host {endpoint.host}: {exc}") from exc
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        # A bigger kernel buffer absorbs bursts while Python is busy in the pipeline. Set
        # before connecting: the window scale is agreed in the handshake, and growing the
        # buffer of a connected socket can make the kernel drop segments instead.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.settimeout(endpoint.connect_timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock
    raise ConnectionError(f"cannot connect to Redis at {endpoint.host}:{endpoint.port}: {error}")


def _command(*args: str | bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _subscribe(sock: socket.socket, reader: hiredis.Reader, endpoint: RedisEndpoint) -> None:
    """AUTH, name the client, PSUBSCRIBE; wait for each reply so failures are explicit."""
    commands: list[tuple[str, bytes]] = []
    if endpoint.password is not None:
        auth = ("AUTH", endpoint.username, endpoint.password) if endpoint.username else (
            "AUTH", endpoint.password)
        commands.append(("AUTH", _command(*auth)))
    if endpoint.client_name:
        commands.append(("CLIENT SETNAME", _command("CLIENT", "SETNAME", endpoint.client_name)))
    commands.append(("PSUBSCRIBE", _command("PSUBSCRIBE", endpoint.pattern)))
    sock.sendall(b"".join(cmd for _, cmd in commands))
    for name, _ in commands:
        reply = _read_reply(sock, reader)
        if isinstance(reply, hiredis.ReplyError):
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
    feed, gets, decode = reader.feed, reader.gets, decoder.feed
    health = endpoint.health_check_interval
    last_data = time.monotonic()
    ping_sent = False
    while not stop.is_set():
        try:
            size = sock.recv_into(buffer)
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
            raise ConnectionError("Redis closed the connection (restart, or pubsub output buffer limit)")
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


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as exc:
        raise ConnectionError(f"Redis connection lost: {exc}") from exc


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest

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

import binascii
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import hiredis
import orjson
from celery.utils.time import utcoffset
from kombu import Connection

from celery_sidecar.monitor.schema import MALFORMED, MISSING_TYPE, NOT_AN_EVENT, UNDECODABLE, envelope_ok

__all__ = [
    "EventDecoder",
    "RedisEndpoint",
    "endpoint_for",
    "stream_events",
]


# Matches EventReceiver: clients never sync their clock, so task-sent gets ours minus one.
_CLIENT_CLOCK_SKEW = -1
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


class EventDecoder:
    """Turns one pub/sub payload into event dicts, as ``EventReceiver`` would.

    Never raises on bad input: every message or event it cannot use goes to ``on_skip``
    with a reason, and decoding carries on.
    """

    def __init__(self, on_event: Callable[[dict], None], on_skip: Callable[[str], None],
                 now: Callable[[], float] = time.time) -> None:
        self._on_event = on_event
        self._on_skip = on_skip
        self._now = now
        # A private Lamport clock with the same arithmetic as app.clock in
        # event_from_message; one thread owns it, so no mutex.
        self.clock = 0
        # utcoffset() calls localtime(); refresh() once per socket read instead of per event.
        self._here = utcoffset()

    def refresh(self) -> None:
        """Re-read the local UTC offset (called once per chunk read from the socket)."""
        self._here = utcoffset()

    def feed(self, payload: bytes) -> None:
        """Decode one published message (a kombu JSON envelope) and emit its events."""
        try:
            envelope = orjson.loads(payload)
            if not envelope_ok(envelope):  # what kombu could not build a Message from
                self._on_skip(UNDECODABLE)
                return
            # kombu accepts only the event serializer, json; anything else is a decode error.
            if envelope.get("content-type", "application/json") != "application/json":
                self._on_skip(UNDECODABLE)
                return
            body = envelope.get("body")
            if envelope["properties"].get("body_encoding") == "base64":
                body = binascii.a2b_base64(body)
            body = orjson.loads(body)
        except (orjson.JSONDecodeError, binascii.Error, TypeError, ValueError):
            self._on_skip(UNDECODABLE)
            return
        if type(body) is dict:
            self._emit(body)
        elif type(body) is list:  # celery 4+: a worker's buffered task events, up to 24
            for event in body:
                if type(event) is dict:
                    self._emit(event)
                else:
                    self._on_skip(NOT_AN_EVENT)
        else:
            self._on_skip(NOT_AN_EVENT)

    def _emit(self, event: dict) -> None:
        # Mirrors EventReceiver.event_from_message step by step, including where it would
        # raise: those become skips, exactly as monitor/stock_stream.py's receiver does.
        if "type" not in event:
            self._on_skip(MISSING_TYPE)
            return
        is_sent = event["type"] == "task-sent"
        has_clock = "clock" in event
        if has_clock and not is_sent and type(event["clock"]) is not int:
            # Refused before it reaches our Lamport clock: a float or a string there would
            # make every later event's clock wrong too (stock_stream.py refuses the same).
            self._on_skip(MALFORMED)
            return
        try:
            if is_sent:
                # Clients never sync their clock, so EventReceiver ignores theirs.
                sent_clock = event["clock"] = (self.clock or 1) + _CLIENT_CLOCK_SKEW
                self.clock = max(self.clock, sent_clock) + 1
            elif has_clock:
                self.clock = max(self.clock, event["clock"]) + 1
            else:
                self.clock += 1
                event["clock"] = self.clock
            if "utcoffset" in event and "timestamp" in event:
                event["timestamp"] = event["timestamp"] - (event["utcoffset"] - self._here) * 3600
        except (TypeError, OverflowError):
            self._on_skip(MALFORMED)
            return
        event["local_received"] = self._now()
        self._on_event(event)


def stream_events(broker_url: str, transport_options: dict | None,
                  on_event: Callable[[dict], None], on_skip: Callable[[str], None],
                  stop: threading.Event, on_connected: Callable[[], None] | None = None) -> None:
    """Consume the event stream until ``stop`` is set.

    Returns when ``stop`` is set. Raises ``ConnectionError`` when the connection cannot be
    made or is lost (the caller owns reconnect and backoff), ``ValueError`` when the URL
    needs the stock path (check ``endpoint_for`` first). ``on_connected`` runs once the
    subscription is confirmed, i.e. from then on no published event is missed.
    """
    endpoint = endpoint_for(broker_url, transport_options)
    if endpoint is None:
        raise ValueError(f"the Redis fast path cannot serve {_redact(broker_url)}; use the stock path")
    decoder = EventDecoder(on_event, on_skip)
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
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=endpoint.connect_timeout)
    except OSError as exc:
        raise ConnectionError(f"cannot connect to Redis at {endpoint.host}:{endpoint.port}: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # A bigger kernel buffer absorbs bursts while Python is busy in the pipeline.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return sock


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

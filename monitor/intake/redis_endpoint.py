"""Where the Redis fast path connects and what it subscribes to, read as kombu's Redis transport reads it.

One broker URL, its transport options and its TLS options (monitor/intake/broker_ssl.py) give:

- ``redis://`` and ``rediss://``: a host and port, with TLS when kombu would use it (``rediss://``,
  or any Redis URL with TLS options);
- ``redis+socket://`` (and ``socket://``, the same): a unix socket, its database from the
  ``virtual_host`` query parameter, as kombu reads it;
- ``sentinel://host:26379;sentinel://host2:26379/0``: the sentinels to ask for the current
  master of ``master_name`` (a transport option), with ``sentinel_kwargs`` and
  ``min_other_sentinels`` as kombu passes them to redis-py's Sentinel.

The subscribe pattern is built exactly as kombu's Redis channel builds it for the queue
EventReceiver binds to the ``celeryev`` fanout exchange with routing key ``#``:
``global_keyprefix + keyprefix_fanout.format(db=db) + exchange + "/*"``. What only the stock
path can serve (a credential provider, kombu's legacy Sentinel fanout topic, TLS options the
fast path does not build a context from) is said, as the reason the stock path is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kombu import Connection
from kombu.utils.url import url_to_parts

from celery_sidecar.monitor.intake import broker_ssl
from celery_sidecar.monitor.intake.broker_url import normalize

__all__ = ["EVENT_EXCHANGE", "RedisEndpoint", "resolve"]

EVENT_EXCHANGE = "celeryev"
DEFAULT_HEALTH_CHECK = 25.0  # kombu's default health_check_interval
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class RedisEndpoint:
    """Where to connect (a host and port, a unix socket, or a master Sentinel names), how, and
    which pattern to PSUBSCRIBE to."""

    scheme: str
    pattern: bytes
    db: int = 0  # where the queues are (pub/sub channels are the same in every database)
    username: str | None = None
    password: str | None = None
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None
    sentinel_kwargs: dict[str, Any] | None = field(default=None, hash=False)
    min_other_sentinels: int = 0
    tls: dict[str, Any] | None = field(default=None, hash=False)  # redis-py TLS options; None: plain TCP
    connect_timeout: float = 5.0
    health_check_interval: float = DEFAULT_HEALTH_CHECK
    client_name: str | None = None

    def describe(self) -> str:
        """Why the fast path serves it, for the log and /health."""
        tls = " with TLS" if self.tls is not None else ""
        if self.path is not None:
            return f"Redis on the unix socket {self.path}"
        if self.sentinels:
            count = len(self.sentinels)
            return (f"sentinel:// URL: the master {self.master_name!r}, asked of "
                    f"{count} sentinel{'s' if count > 1 else ''} at each connection{tls}")
        return f"{self.scheme}:// URL{tls}"


def resolve(broker_url: str, transport_options: dict[str, Any] | None = None,
            ssl_options: Any = None, exchange: str = EVENT_EXCHANGE) -> RedisEndpoint | str:
    """The endpoint for ``broker_url``, or why only the stock kombu path can serve it."""
    options = dict(transport_options or {})
    conn = Connection(normalize(broker_url), transport_options=options, ssl=ssl_options or None)
    scheme = conn.transport_cls if isinstance(conn.transport_cls, str) else ""
    if scheme not in ("redis", "rediss", "sentinel"):
        return "not a Redis URL"
    if options.get("credential_provider") or "credential_provider" in (conn.hostname or ""):
        return "a credential provider: the stock path asks it for each connection"
    tls = _tls(conn.ssl)
    if tls is not None and (odd := broker_ssl.unsupported(tls)):
        return f"TLS options the fast path does not build a context from ({', '.join(odd)})"
    common: dict[str, Any] = {
        "scheme": scheme,
        "tls": tls,
        "connect_timeout": float(options.get("socket_connect_timeout") or 5.0),
        "health_check_interval": float(options.get("health_check_interval", DEFAULT_HEALTH_CHECK) or 0),
        "client_name": options.get("client_name"),
    }
    host = conn.hostname or ""
    if "://" in host:
        return _unix(host, options, exchange, common)
    if scheme == "sentinel":
        return _sentinel(conn, options, exchange, common)
    db = _db_number(conn.virtual_host)
    return RedisEndpoint(host=host or "127.0.0.1", port=int(conn.port or 6379), username=conn.userid or None,
                         password=conn.password or None, db=db, pattern=_pattern(options, db, exchange), **common)


def _tls(ssl: Any) -> dict[str, Any] | None:
    # kombu's Connection folds the URL's ssl_* query and the ssl argument into ``ssl``; True is
    # TLS with redis-py's defaults.
    if isinstance(ssl, dict):
        return broker_ssl.normalize(ssl)
    return {} if ssl else None


def _unix(host: str, options: dict[str, Any], exchange: str, common: dict[str, Any]) -> RedisEndpoint | str:
    # kombu keeps redis+socket://... whole as the host: socket:///path?virtual_host=N.
    parts = url_to_parts(host)
    if parts.scheme != "socket":
        return f"a {parts.scheme}:// host inside the URL"
    db = _db_number(parts.query.get("virtual_host"))
    return RedisEndpoint(path="/" + parts.path, username=parts.username or None, password=parts.password or None,
                         db=db, pattern=_pattern(options, db, exchange), **common)


def _sentinel(conn: Connection, options: dict[str, Any], exchange: str,
              common: dict[str, Any]) -> RedisEndpoint | str:
    master_name = options.get("master_name")
    if not master_name:
        return "sentinel:// without master_name in the transport options"
    if options.get("sentinel_fanout_compat"):
        return "sentinel_fanout_compat: the stock path also reads kombu's legacy fanout topic"
    sentinels = [(conn.hostname or "127.0.0.1", int(conn.port or DEFAULT_SENTINEL_PORT))]
    if conn.alt:  # sentinel://a:26379;sentinel://b:26379: each one, as kombu lists them
        sentinels = [(p.hostname or "127.0.0.1", int(p.port or DEFAULT_SENTINEL_PORT))
                     for p in map(url_to_parts, conn.alt)]
    return RedisEndpoint(
        sentinels=tuple(sentinels), master_name=str(master_name), sentinel_kwargs=options.get("sentinel_kwargs"),
        min_other_sentinels=int(options.get("min_other_sentinels") or 0), username=conn.userid or None,
        password=conn.password or None, db=(db := _db_number(conn.virtual_host)),
        pattern=_pattern(options, db, exchange), **common)


def _db_number(virtual_host: object) -> int:
    # Same rules as kombu's Channel._prepare_virtual_host.
    if isinstance(virtual_host, int):
        return virtual_host
    text = str(virtual_host or "")
    if not text or text == "/":
        return 0
    return int(text.lstrip("/"))


def _pattern(options: dict[str, Any], db: int, exchange: str) -> bytes:
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
    return (options.get("global_keyprefix", "") + topic).encode()

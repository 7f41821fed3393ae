"""The Redis fast path's socket: TCP, TLS or a unix socket, to the master Sentinel names.

A Sentinel endpoint is asked for its master on every connection (redis-py's ``Sentinel``
discovery: each sentinel in turn, the master's state checked), so reconnecting after a failover
finds the new master; the subscription then checks the master's ``ROLE`` before it trusts it
(monitor/intake/redis_pubsub.py). Every failure is a ``ConnectionError`` naming where it was
going, and the intake reconnects with backoff.
"""

from __future__ import annotations

import socket
import ssl

import redis
from redis.sentinel import MasterNotFoundError, Sentinel

from celery_sidecar.monitor.intake import broker_ssl
from celery_sidecar.monitor.intake.redis_endpoint import RedisEndpoint

__all__ = ["client", "connect", "master_of"]

# A bigger kernel buffer absorbs bursts while Python is busy in the pipeline. Set before
# connecting: the window scale is agreed in the handshake, and growing the buffer of a
# connected socket can make the kernel drop segments instead.
RECEIVE_BUFFER = 4 << 20


def connect(endpoint: RedisEndpoint) -> tuple[socket.socket, str]:
    """A connected socket (TLS done when the endpoint says so), and where it goes, for messages."""
    if endpoint.path is not None:
        return _unix(endpoint), f"the unix socket {endpoint.path}"
    host, port = master_of(endpoint) if endpoint.sentinels else (endpoint.host, endpoint.port)
    sock = _tcp(host, port, endpoint.connect_timeout)
    where = f"{host}:{port}"
    if endpoint.tls is None:
        return sock, where
    try:
        sock = broker_ssl.redis_context(endpoint.tls).wrap_socket(sock, server_hostname=host)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise ConnectionError(f"TLS handshake with Redis at {where} failed: {exc}") from exc
    return sock, where


def master_of(endpoint: RedisEndpoint) -> tuple[str, int]:
    """The address of the master the endpoint's sentinels name now."""
    # Without sentinel_kwargs, redis-py reaches the sentinels with the socket_* options alone (no
    # password, no TLS), as kombu does.
    timeouts = {"socket_timeout": endpoint.connect_timeout, "socket_connect_timeout": endpoint.connect_timeout}
    sentinel = Sentinel(list(endpoint.sentinels), min_other_sentinels=endpoint.min_other_sentinels,
                        sentinel_kwargs=endpoint.sentinel_kwargs, **timeouts)
    try:
        host, port = sentinel.discover_master(endpoint.master_name)
    except MasterNotFoundError as exc:
        raise ConnectionError(f"no Sentinel names a master {endpoint.master_name!r}: {exc}") from exc
    except redis.RedisError as exc:
        raise ConnectionError(f"asking Sentinel for the master {endpoint.master_name!r} failed: {exc}") from exc
    finally:
        for client in sentinel.sentinels:
            client.close()
    return str(host), int(port)


def _tcp(host: str, port: int, timeout: float) -> socket.socket:
    error: OSError | None = None
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectionError(f"cannot resolve Redis host {host}: {exc}") from exc
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock
    raise ConnectionError(f"cannot connect to Redis at {host}:{port}: {error}")


def _unix(endpoint: RedisEndpoint) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.settimeout(endpoint.connect_timeout)
    try:
        sock.connect(endpoint.path)
    except OSError as exc:
        sock.close()
        raise ConnectionError(f"cannot connect to Redis at the unix socket {endpoint.path}: {exc}") from exc
    return sock


def client(endpoint: RedisEndpoint, timeout: float) -> redis.Redis:
    """A redis-py client to the server the fast path reads (the probes' connection): the master
    Sentinel names (asked again on each new connection), a unix socket, TLS with the same options."""
    common: dict = {"username": endpoint.username, "password": endpoint.password, "db": endpoint.db,
                    "socket_timeout": timeout, "socket_connect_timeout": timeout, "health_check_interval": 30}
    tls = {} if endpoint.tls is None else {"ssl": True, **endpoint.tls}
    if endpoint.path is not None:
        return redis.Redis(unix_socket_path=endpoint.path, **common)
    if endpoint.sentinels:
        sentinel = Sentinel(list(endpoint.sentinels), min_other_sentinels=endpoint.min_other_sentinels,
                            sentinel_kwargs=endpoint.sentinel_kwargs, socket_timeout=timeout,
                            socket_connect_timeout=timeout)
        return sentinel.master_for(endpoint.master_name, **common, **tls)
    return redis.Redis(host=endpoint.host, port=endpoint.port, **common, **tls)

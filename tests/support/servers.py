"""Real servers for tests: each starts on a free loopback port and is torn down after."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from celery_sidecar.embedded_redis import EmbeddedRedis, free_port, redis_binary
from tests.support.tier import require_e2e

T = TypeVar("T")

__all__ = ["RedisServer", "free_port", "rabbitmq_url", "redis_server", "wait_for"]


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition") -> T:
    """Poll until predicate() is truthy; return its value, or raise TimeoutError naming ``what``.

    An AssertionError from the predicate is a verdict, not "not yet": it propagates at once,
    so a process that died says so now rather than after the timeout. A predicate that means
    "not yet" returns something falsy. Any other exception (a connection refused while a
    server starts) is retried, and the last one is named in the TimeoutError.
    """
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - polling: the last error is reported below
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")


def redis_server_binary() -> str:
    return redis_binary("redis-server")


RedisServer = EmbeddedRedis


@contextmanager
def redis_server(*extra_args: str) -> Iterator[EmbeddedRedis]:
    """A private redis-server on a free port; ``restart()`` simulates a broker restart."""
    require_e2e("a redis-server")
    server = EmbeddedRedis(None, *extra_args).start()
    try:
        yield server
    finally:
        server.cleanup()


RABBITMQ_URL_ENV = "SIDECAR_TEST_AMQP_URL"


def rabbitmq_url() -> str | None:
    """The AMQP broker for tests, if one answers: $SIDECAR_TEST_AMQP_URL or the local default.

    scripts/test installs and starts rabbitmq-server when it is missing.
    """
    require_e2e("a RabbitMQ connection")
    url = os.environ.get(RABBITMQ_URL_ENV, "amqp://guest:guest@127.0.0.1:5672//")
    host_port = url.split("@")[-1].split("/")[0]
    host, _, port = host_port.partition(":")
    try:
        with socket.create_connection((host, int(port or 5672)), timeout=1):
            return url
    except OSError:
        return None

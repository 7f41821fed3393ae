"""Fixtures: private servers and processes, all torn down after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.brokers import private_vhost
from tests.support.fake_slack import FakeSlack, fake_slack
from tests.support.procs import Process, SidecarProcess, start_worker
from tests.support.servers import RedisServer, redis_server


@pytest.fixture
def redis_srv() -> Iterator[RedisServer]:
    """A private redis-server for this test."""
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    """A private redis-server shared by a module's tests (each must not depend on its contents)."""
    with redis_server() as server:
        yield server


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    """The Slack stand-in on loopback; the sidecar's real slack-sdk client posts to it."""
    with fake_slack() as server:
        yield server


@pytest.fixture
def procs() -> Iterator[list[Process]]:
    """Processes registered here are stopped (and their process groups killed) after the test."""
    started: list[Process] = []
    yield started
    for proc in reversed(started):
        proc.stop(timeout=5)


@pytest.fixture
def sidecar(procs):
    def start(broker_url: str, *args: str, **kwargs) -> SidecarProcess:
        proc = SidecarProcess(broker_url, *args, **kwargs)
        procs.append(proc)
        return proc

    return start


@pytest.fixture
def worker(procs):
    def start(broker_url: str, **kwargs) -> Process:
        proc = start_worker(broker_url, **kwargs)
        procs.append(proc)
        return proc

    return start


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A private vhost on the machine's RabbitMQ (scripts/test installs and starts one), so
    nothing else on the broker sees our events or we theirs; deleted afterwards."""
    with private_vhost() as url:
        yield url

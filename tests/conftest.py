"""Fixtures: private servers and processes, all torn down after each test.

The fixtures that start something real are ``@e2e_fixture``: a test that uses one is in the
e2e tier (tests/support/tier.py), and ``pytest -m "not e2e"`` leaves it out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support import tier
from tests.support.brokers import private_vhost
from tests.support.fake_slack import FakeSlack, fake_slack
from tests.support.procs import Process, SidecarProcess, start_worker
from tests.support.servers import RedisServer, redis_server
from tests.support.tier import e2e_fixture


def pytest_configure(config: pytest.Config) -> None:
    tier.install()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if tier.is_e2e(item):
            item.add_marker(tier.E2E)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    tier.enter(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    result = yield
    tier.check_refused()
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    tier.leave()


@pytest.fixture
@e2e_fixture
def redis_srv() -> Iterator[RedisServer]:
    """A private redis-server for this test."""
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
@e2e_fixture
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
@e2e_fixture
def procs() -> Iterator[list[Process]]:
    """Processes registered here are stopped (and their process groups killed) after the test."""
    started: list[Process] = []
    yield started
    for proc in reversed(started):
        proc.stop(timeout=5)


@pytest.fixture
@e2e_fixture
def sidecar(procs: list[Process]) -> Callable[..., SidecarProcess]:
    def start(broker_url: str, *args: str, **kwargs: Any) -> SidecarProcess:
        proc = SidecarProcess(broker_url, *args, **kwargs)
        procs.append(proc)
        return proc

    return start


@pytest.fixture
@e2e_fixture
def worker(procs: list[Process]) -> Callable[..., Process]:
    def start(broker_url: str, **kwargs: Any) -> Process:
        proc = start_worker(broker_url, **kwargs)
        procs.append(proc)
        return proc

    return start


@pytest.fixture(scope="session")
@e2e_fixture
def amqp_url() -> Iterator[str]:
    """A private vhost on the machine's RabbitMQ (scripts/test installs and starts one), so
    nothing else on the broker sees our events or we theirs; deleted afterwards."""
    with private_vhost() as url:
        yield url

"""The harness itself: how wait_for waits, and the guard that keeps real servers out of the
quick tier (tests/support/tier.py). These are quick tests, so the guard is live in them."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.support import tier
from tests.support.servers import redis_server, wait_for


def test_wait_for_returns_the_first_truthy_value() -> None:
    answers = iter([None, 0, [], "ready"])
    assert wait_for(lambda: next(answers), timeout=5, interval=0.01) == "ready"


def test_wait_for_retries_other_errors_and_names_the_last_one_when_it_gives_up() -> None:
    calls = 0

    def refused_twice() -> str:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ConnectionRefusedError("not listening yet")
        return "up"

    assert wait_for(refused_twice, timeout=5, interval=0.01) == "up"

    def never() -> bool:
        raise ConnectionRefusedError("still not listening")

    with pytest.raises(TimeoutError, match=r"waiting for the server .*still not listening"):
        wait_for(never, timeout=0.2, interval=0.01, what="the server")


def test_wait_for_lets_an_assertion_error_through_at_once() -> None:
    calls = 0

    def crashed() -> bool:
        nonlocal calls
        calls += 1
        raise AssertionError("sidecar exited with 1")

    started = time.monotonic()
    with pytest.raises(AssertionError, match="sidecar exited with 1"):
        wait_for(crashed, timeout=30, interval=0.01)
    assert calls == 1 and time.monotonic() - started < 1


def test_a_quick_test_that_starts_a_redis_server_fails_before_it_starts(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker(tier.E2E) is None
    with pytest.raises(pytest.fail.Exception, match="starts a redis-server but is not an e2e test"), redis_server():
        pass


def test_a_quick_test_cannot_connect_to_a_broker() -> None:
    with pytest.raises(tier.NotE2E, match=r"connects to a broker at 127\.0\.0\.1:5672"):
        socket.create_connection(("127.0.0.1", 5672), timeout=1)
    # Refused as expected: without this, the test is failed after its call, as one that swallowed it.
    tier.refused.clear()


def test_a_quick_test_cannot_run_the_sidecars_cli() -> None:
    with pytest.raises(tier.NotE2E, match="runs the sidecar or Celery"):
        subprocess.run([sys.executable, "-m", "celery_sidecar", "config", "example"], capture_output=True)
    tier.refused.clear()  # as above

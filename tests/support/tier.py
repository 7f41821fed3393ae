"""The suite's two tiers, and the guard that keeps them apart.

An ``e2e`` test needs something besides the Python packages: it starts a redis-server, a
broker connection, a Celery worker or Beat, the sidecar (any ``celery-sidecar`` command,
``config check`` included), nginx (``nginx -t`` too), Prometheus or its tools, Flower,
Chromium or docker-compose; or, marked by hand, it runs the data path at a scale that takes
minutes. Every other test runs in-process, so ``pytest -m "not e2e"`` takes under a minute
and needs none of them.

A test is e2e by its mark (``@pytest.mark.e2e``, or a module's ``pytestmark``) or, set at
collection, by using a fixture made with ``@e2e_fixture``: a test that asks for ``redis_srv``
or ``worker`` is e2e without saying so. A test that starts something real some other way
cannot slip into the quick tier unmarked: the helpers that start real things call
``require_e2e``, which fails a test that is not e2e at once, and such a test's connections to
a broker's port, and its subprocesses that are one of those things, are refused.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import pytest

E2E = "e2e"

F = TypeVar("F", bound=Callable[..., Any])

# The brokers' usual ports, and the test RabbitMQ's own: the quick tier never talks to a broker.
_BROKER_PORTS = {5671, 5672, 6379}
if os.environ.get("SIDECAR_TEST_AMQP_URL"):
    _BROKER_PORTS.add(urlsplit(os.environ["SIDECAR_TEST_AMQP_URL"]).port or 5672)

# Programs only an e2e test runs: not every machine has them.
_PROGRAMS = {"redis-server", "rabbitmq-server", "rabbitmqctl", "socat", "nginx", "prometheus", "promtool", "amtool",
             "chromium", "docker-compose"}
_PRODUCT = re.compile(r"(^|\s)(-m celery_sidecar|\S*celery-sidecar)(\s|$)|-m celery .*\b(worker|beat|sidecar|flower)\b")

_quick_test: str | None = None  # the node id of the test being set up or run, when it is not e2e
refused: list[str] = []  # what the running test was refused


class NotE2E(RuntimeError):
    """Raised into a test that is not e2e and opened a broker connection or ran a real program.

    Not an OSError, so that no client takes it for a network error and retries."""


def e2e_fixture(func: F) -> F:
    """Mark a fixture (put it under ``@pytest.fixture``) as starting something real: every
    test that uses it, even through another fixture, is e2e."""
    func.__e2e__ = True  # type: ignore[attr-defined]
    return func


def is_e2e(item: pytest.Item) -> bool:
    if item.get_closest_marker(E2E) is not None:
        return True
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    for name in info.names_closure:
        # The closest definition is the one in use; it may in turn ask for the one it overrides.
        for fixturedef in reversed(info.name2fixturedefs.get(name, ())):
            if getattr(fixturedef.func, "__e2e__", False):
                return True
            if name not in fixturedef.argnames:
                break
    return False


def require_e2e(what: str) -> None:
    """Fail the running test if it is not e2e: it is about to start ``what``."""
    if _quick_test is not None:
        import pytest  # here: tests.bench uses these helpers without pytest

        pytest.fail(f"{_quick_test} starts {what} but is not an e2e test: mark it with @pytest.mark.e2e "
                    "(or a module's pytestmark), or use an e2e fixture", pytrace=False)


def enter(item: pytest.Item) -> None:
    global _quick_test
    _quick_test = None if item.get_closest_marker(E2E) else item.nodeid
    refused.clear()


def leave() -> None:
    global _quick_test
    _quick_test = None


def check_refused() -> None:
    """Fail the test if a refusal was swallowed (by a client's retry loop, say)."""
    if refused:
        import pytest

        pytest.fail(refused[0], pytrace=False)


def _real_program(argv: Sequence[str]) -> str | None:
    """What ``argv`` runs, when only an e2e test may run it."""
    program = os.path.basename(str(argv[0])) if argv else ""
    if program in _PROGRAMS:
        return program
    return "the sidecar or Celery" if _PRODUCT.search(" ".join(map(str, argv))) else None


def _refuse_real_things(event: str, args: tuple[Any, ...]) -> None:
    if event not in ("socket.connect", "subprocess.Popen") or _quick_test is None:
        return
    # Only the test's own thread: threads an earlier e2e test left behind may still reconnect.
    if threading.current_thread() is not threading.main_thread():
        return
    if event == "socket.connect":
        address = args[1]
        if not (isinstance(address, tuple) and len(address) >= 2 and address[1] in _BROKER_PORTS):
            return
        what = f"connects to a broker at {address[0]}:{address[1]}"
    else:
        argv = [args[1]] if isinstance(args[1], str | bytes) else list(args[1] or ())
        program = _real_program(argv)
        if program is None:
            return
        what = f"runs {program} ({' '.join(map(str, argv))[:200]})"
    message = f"{_quick_test} {what} but is not an e2e test: mark it with @pytest.mark.e2e, or use an e2e fixture"
    refused.append(message)
    raise NotE2E(message)


def install() -> None:
    """Refuse quick tests their broker connections and real programs, for the rest of this
    process (an audit hook cannot be removed: only pytest installs it, never a benchmark)."""
    sys.addaudithook(_refuse_real_things)

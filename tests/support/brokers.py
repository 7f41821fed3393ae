"""RabbitMQ for tests: a private vhost per test session, and raw publishing to the event exchange."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
from kombu import Connection, Exchange

from tests.support.servers import rabbitmq_url
from tests.support.tier import require_e2e

EVENT_EXCHANGE = Exchange("celeryev", type="topic")


def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.fail("rabbitmqctl is missing: scripts/test installs rabbitmq-server", pytrace=False)
    subprocess.run([ctl, *args], check=True, capture_output=True, text=True, timeout=120)


@contextmanager
def private_vhost() -> Iterator[str]:
    base = rabbitmq_url()
    if base is None:
        pytest.fail("RabbitMQ is not reachable on 127.0.0.1:5672: scripts/test starts it", pytrace=False)
    vhost = f"sidecar-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield urlsplit(base)._replace(path="/" + vhost).geturl()
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def publish_raw(url: str, messages: list[tuple[bytes, str, str]]) -> None:
    """Publish (body, content_type, routing_key) to the celeryev exchange as they are: no
    serializer touches the bytes, so anything a buggy producer could send, we can."""
    require_e2e("a broker connection")
    with Connection(url, connect_timeout=10) as conn:
        producer = conn.Producer(exchange=EVENT_EXCHANGE)
        producer.declare()
        for body, content_type, routing_key in messages:
            producer.publish(body, routing_key=routing_key, content_type=content_type,
                             content_encoding="utf-8", retry=True)

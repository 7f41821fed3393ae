"""The AMQP fast path against the real RabbitMQ: the same events as the stock path, and
correct on everything the protocol can send.

Each test runs in the session's private vhost. Protocol cases the real server will not
produce on cue (connection.blocked, channel.close, a server gone silent) are slipped in
by a proxy in front of it (tests/support/amqp_proxy.py); everything else is RabbitMQ's own.
"""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from kombu import Connection
from kombu.utils.json import dumps
from prometheus_client import CollectorRegistry, generate_latest

from celery_sidecar.exporters.collectors import StateCollector
from celery_sidecar.monitor.intake.amqp_socket import fast_path_serves
from celery_sidecar.monitor.intake.consumer import choose_path
from tests.bench.traffic import Shape, TrafficGenerator
from tests.hostile import valid_event
from tests.support import tls
from tests.support.amqp_proxy import AmqpProxy, close_args, method_frame, shortstr
from tests.support.brokers import publish_raw
from tests.support.inproc import Consumer
from tests.support.servers import wait_for

pytestmark = pytest.mark.timeout(180)


def events_of(messages) -> list[tuple[bytes, str, str]]:
    """Traffic generator messages as (kombu JSON body, content type, routing key) for AMQP."""
    import base64

    import orjson

    out = []
    for message in messages:
        envelope = orjson.loads(message.payload)
        routing_key = envelope["properties"]["delivery_info"]["routing_key"]
        out.append((base64.b64decode(envelope["body"]), envelope["content-type"], routing_key))
    return out


def heartbeat_of(hostname: str) -> tuple[bytes, str, str]:
    event = {**valid_event("worker-heartbeat", 1), "hostname": hostname}
    return dumps(event).encode(), "application/json", "worker.heartbeat"


def settle(url: str, consumers: list[Consumer], timeout: float = 30) -> None:
    """A sentinel heartbeat: once every consumer has it, it has everything published before."""
    name = f"sentinel-{uuid.uuid4().hex[:8]}@host"
    publish_raw(url, [heartbeat_of(name)])
    wait_for(lambda: all(name in c.state.workers for c in consumers), timeout=timeout, what="the sentinel")


@pytest.fixture
def fast(amqp_url: str) -> Iterator[Consumer]:
    with Consumer(amqp_url, fast_path=True) as consumer:
        assert consumer.status.intake == "amqp-fast"
        wait_for(lambda: consumer.status.connected, timeout=20, what="the AMQP fast path to connect")
        yield consumer


def exposition(consumer: Consumer) -> list[str]:
    registry = CollectorRegistry()
    registry.register(consumer.metrics)
    registry.register(StateCollector(consumer.path.view, consumer.path.config))
    keep = ("celery_task_", "celery_sidecar_events")
    timing = ("celery_task_oldest_running_seconds",)  # when each path received the events differs
    return [line for line in generate_latest(registry).decode().splitlines()
            if line.startswith(keep) and not line.startswith(timing)]


def test_fast_and_stock_paths_export_identical_metrics_for_the_same_stream(amqp_url):
    generator = TrafficGenerator(Shape(seed=5, utcoffset=-5.5, heartbeat_freq=0.05))
    stream = events_of(generator.messages(300))
    bad = [(b"{not json", "application/json", "task.multi"), (b"\x80\x04K\x01.", "application/x-python-serialize",
           "task.multi"), (b'"a string"', "application/json", "task.multi"), (b"", "application/json", "x")]
    for i, message in enumerate(bad):
        stream.insert(20 + 41 * i, message)
    with Consumer(amqp_url, fast_path=True) as fast, Consumer(amqp_url, fast_path=False) as stock:
        assert (fast.status.intake, stock.status.intake) == ("amqp-fast", "stock")
        wait_for(lambda: fast.status.connected and stock.status.connected, timeout=20, what="both paths")
        settle(amqp_url, [fast, stock])  # both queues bound
        publish_raw(amqp_url, stream)
        settle(amqp_url, [fast, stock])
        assert exposition(fast) == exposition(stock)
        assert fast.events() == stock.events() == generator.totals.events + 2
        assert fast.state.counters.skipped_by_reason == stock.state.counters.skipped_by_reason
        assert fast.skipped() == len(bad)
        assert (fast.status.reconnects, stock.status.reconnects) == (0, 0)
        # Both read their queue's depth on the consuming connection.
        wait_for(lambda: fast.status.event_queue_messages == 0 and stock.status.event_queue_messages == 0,
                 timeout=15, what="the event queue depth from both paths")


def test_a_1mb_event_body_is_split_over_frames_and_decoded(amqp_url, fast):
    event = {**valid_event("task-failed", 1), "exception": "ValueError('big')", "traceback": "x" * (1 << 20)}
    publish_raw(amqp_url, [(dumps(event).encode(), "application/json", "task.failed")])
    settle(amqp_url, [fast])
    assert fast.state.counters.events_by_type.get("task-failed") == 1
    assert fast.status.reconnects == 0


def test_a_deleted_event_queue_is_declared_again(amqp_url, fast, caplog):
    settle(amqp_url, [fast])
    with Connection(amqp_url) as conn:
        conn.channel().queue_delete(fast.intake.event_queue.name)
    # RabbitMQ cancels the consumer; the path reconnects and declares its queue again.
    wait_for(lambda: fast.status.reconnects == 1 and fast.status.connected, timeout=30,
             what="a reconnect after the queue was deleted")
    settle(amqp_url, [fast])
    assert "cancelled the consumer" in " ".join(r.getMessage() for r in caplog.records)


def test_a_connection_the_broker_closes_mid_stream_is_resumed_without_restarting_the_sidecar(amqp_url, fast):
    """What a consumer sees of a broker restart, a failover or an operator's close: the broker
    closes its connection (CONNECTION_FORCED), and its exclusive event queue goes with it.
    Closed for this test's vhost alone, so the suite's other tests on the shared RabbitMQ
    (run in parallel) keep theirs."""
    publish_raw(amqp_url, [heartbeat_of("before@host")])
    wait_for(lambda: "before@host" in fast.state.workers, timeout=20, what="the first event")
    vhost = urlsplit(amqp_url).path.lstrip("/")
    subprocess.run(["rabbitmqctl", "close_all_connections", "--vhost", vhost, "sidecar test: going away"],
                   check=True, capture_output=True, timeout=120)
    wait_for(lambda: fast.status.reconnects >= 1 and fast.status.connected, timeout=60,
             what="the path to reconnect")
    assert "going away" in (fast.status.last_disconnect or ""), fast.status
    publish_raw(amqp_url, [heartbeat_of("after@host")])
    wait_for(lambda: "after@host" in fast.state.workers, timeout=30, what="an event after the reconnect")


@pytest.fixture
def proxy() -> Iterator[AmqpProxy]:
    proxy = AmqpProxy()
    yield proxy
    proxy.close()


def through(proxy: AmqpProxy, amqp_url: str, heartbeat: int | None = None) -> Consumer:
    url = proxy.url(amqp_url) + (f"?heartbeat={heartbeat}" if heartbeat else "")
    consumer = Consumer(url, fast_path=True).__enter__()
    wait_for(lambda: consumer.status.connected, timeout=20, what="the path to connect through the proxy")
    return consumer


def test_connection_blocked_and_unblocked_are_read_and_consumption_goes_on(amqp_url, proxy, caplog):
    consumer = through(proxy, amqp_url)
    try:
        caplog.set_level(logging.INFO)
        proxy.inject(method_frame(0, 10, 60, shortstr("low on memory")))
        publish_raw(amqp_url, [heartbeat_of("during@host")])
        wait_for(lambda: "during@host" in consumer.state.workers, timeout=20, what="an event while blocked")
        proxy.inject(method_frame(0, 10, 61))
        settle(amqp_url, [consumer])
        messages = " ".join(r.getMessage() for r in caplog.records)
        assert "blocked this connection (low on memory)" in messages and "unblocked" in messages
        assert consumer.status.reconnects == 0
    finally:
        consumer.close()


@pytest.mark.parametrize(("frame", "said"), [
    (method_frame(1, 20, 40, close_args(406, "PRECONDITION_FAILED - injected")), "closed the event channel: 406"),
    (method_frame(0, 10, 50, close_args(320, "CONNECTION_FORCED - injected")), "closed the connection: 320"),
], ids=["channel.close", "connection.close"])
def test_a_close_from_the_server_is_a_reconnect(amqp_url, proxy, frame, said, caplog):
    consumer = through(proxy, amqp_url)
    try:
        proxy.inject(frame)
        wait_for(lambda: consumer.status.reconnects == 1 and consumer.status.connected, timeout=30,
                 what="a reconnect")
        assert said in " ".join(r.getMessage() for r in caplog.records)
        assert proxy.consumers == 2, "one consumer connection before the close, one after"
        settle(amqp_url, [consumer])
    finally:
        consumer.close()


def test_heartbeats_keep_an_idle_connection_and_a_silent_server_is_noticed(amqp_url, proxy):
    consumer = through(proxy, amqp_url, heartbeat=2)
    try:
        # Idle for several heartbeat intervals: we beat, so RabbitMQ keeps the connection.
        deadline = time.monotonic() + 7
        wait_for(lambda: time.monotonic() > deadline, timeout=10, interval=0.5)
        assert consumer.status.reconnects == 0 and consumer.status.connected
        # The server goes silent (a half-open connection): noticed after two intervals.
        proxy.silent.set()
        wait_for(lambda: not consumer.status.connected, timeout=15, what="the silence to be noticed")
        assert "no data nor heartbeat" in (consumer.status.last_error or "")
        proxy.silent.clear()
        wait_for(lambda: consumer.status.connected, timeout=30, what="the reconnect")
        settle(amqp_url, [consumer])
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def tls_relay(tmp_path_factory) -> Iterator[tuple[int, str]]:
    """amqps:// in front of the real RabbitMQ: socat terminates TLS with a certificate from a
    private CA and relays to 5672. Yields (port, the CA's PEM file)."""
    pki = tls.make_pki(tmp_path_factory.mktemp("tls"))
    with tls.tls_relay(pki, 5672, verify_clients=False) as port:
        yield port, pki.ca


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "stock"])
def test_amqps_is_read_through_tls(amqp_url, tls_relay, fast_path, monkeypatch):
    """The fast path reads what py-amqp's TLS socket decrypts, records over 16 KB included."""
    port, ca = tls_relay
    monkeypatch.setenv("SSL_CERT_FILE", ca)  # the private CA, as OpenSSL's default trust store
    url = amqp_url.replace("amqp://", "amqps://", 1).replace(":5672/", f":{port}/", 1)
    with Consumer(url, fast_path=fast_path) as consumer:
        assert consumer.status.intake == ("amqp-fast" if fast_path else "stock")
        wait_for(lambda: consumer.status.connected, timeout=20, what="amqps to connect")
        generator = TrafficGenerator(Shape(seed=5, batched_workers_ratio=0))
        messages = events_of(generator.messages(300))
        big = {**valid_event("task-failed", 1), "exception": "ValueError('big')", "traceback": "x" * 100_000}
        publish_raw(amqp_url, [*messages, (dumps(big).encode(), "application/json", "task.failed")])
        settle(amqp_url, [consumer])
        assert consumer.events() == generator.totals.events + 1 + 1  # the big event, the sentinel
        assert consumer.status.reconnects == 0


def test_amqps_with_an_untrusted_certificate_is_a_clear_error(amqp_url, tls_relay):
    port, _ca = tls_relay  # SSL_CERT_FILE not set: the private CA is not trusted
    url = amqp_url.replace("amqp://", "amqps://", 1).replace(":5672/", f":{port}/", 1)
    with Consumer(url, fast_path=True) as consumer:
        wait_for(lambda: consumer.status.last_error is not None, timeout=20, what="the TLS error")
        assert "CERTIFICATE_VERIFY_FAILED" in consumer.status.last_error
        assert not consumer.status.connected
        assert "guest:guest" not in consumer.status.last_error


@pytest.mark.parametrize(("url", "path"), [
    ("amqp://guest:guest@127.0.0.1:5672//", "amqp-fast"),
    ("amqps://guest:guest@127.0.0.1:5671//", "amqp-fast"),
    ("pyamqp://guest:guest@127.0.0.1:5672//", "amqp-fast"),
    ("amqp://guest:guest@10.0.0.1:5672//;amqp://guest:guest@10.0.0.2:5672//", "stock"),
])
def test_which_urls_take_the_fast_path(url, path):
    assert choose_path(url, {}, fast_path=True)[0] == path
    assert fast_path_serves(url) == (path == "amqp-fast")
    assert choose_path(url, {}, fast_path=False)[0] == "stock"

"""amqps:// with a client certificate, on both RabbitMQ paths and the queue probe.

socat terminates TLS in front of the real RabbitMQ, as in tests/test_amqp_fast_path.py, but here
it also checks the client: only a certificate from the private CA gets through (``verify=1``).
The sidecar is given the certificate as celery's ``broker_use_ssl`` (py-amqp's keys).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kombu import Connection
from kombu.utils.json import dumps

from celery_sidecar.monitor.fold.records import QueueReading
from celery_sidecar.monitor.intake.probes import AmqpQueueProbe, make_queue_probe
from tests.hostile import valid_event
from tests.support.brokers import publish_raw
from tests.support.inproc import Consumer
from tests.support.servers import wait_for
from tests.support.tls import Pki, make_pki, tls_relay

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def relay(pki: Pki) -> Iterator[int]:
    """socat's TLS listener in front of RabbitMQ, requiring a client certificate from the CA."""
    with tls_relay(pki, 5672) as port:
        yield port


def _amqps(amqp_url: str, port: int) -> str:
    return amqp_url.replace("amqp://", "amqps://", 1).replace(":5672/", f":{port}/", 1)


def _heartbeat(hostname: str) -> tuple[bytes, str, str]:
    return dumps({**valid_event("worker-heartbeat", 1), "hostname": hostname}).encode(), "application/json", \
        "worker.heartbeat"


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "stock"])
def test_amqps_with_a_client_certificate_is_read_on_both_paths(amqp_url, relay, pki, fast_path):
    with Consumer(_amqps(amqp_url, relay), fast_path=fast_path, ssl_options=pki.amqp_client_options()) as consumer:
        assert consumer.status.intake == ("amqp-fast" if fast_path else "stock")
        wait_for(lambda: consumer.status.connected, timeout=20, what="amqps with a client certificate")
        # The event queue is bound once connected; each heartbeat proves it, the last all before it.
        first = f"first-{uuid.uuid4().hex[:6]}@host"
        wait_for(lambda: publish_raw(amqp_url, [_heartbeat(first)]) or first in consumer.state.workers,
                 timeout=20, what="the first heartbeat through TLS")
        names = [f"tls-{n}-{uuid.uuid4().hex[:6]}@host" for n in range(50)]
        publish_raw(amqp_url, [_heartbeat(name) for name in names])
        wait_for(lambda: all(n in consumer.state.workers for n in names), timeout=20, what="every heartbeat")
        assert consumer.status.reconnects == 0 and consumer.skipped() == 0


def test_the_queue_probe_reads_through_the_same_certificate(amqp_url, relay, pki):
    probe = make_queue_probe(_amqps(amqp_url, relay), {}, 5.0, pki.amqp_client_options())
    assert isinstance(probe, AmqpQueueProbe)
    queue, missing = f"tls-{uuid.uuid4().hex[:6]}", f"missing-{uuid.uuid4().hex[:6]}"
    with Connection(amqp_url) as conn:  # a queue holding two messages, declared on the plain port
        conn.SimpleQueue(queue).put({"n": 1})
        conn.SimpleQueue(queue).put({"n": 2})
    try:
        readings, _ = probe.read([queue, missing])
        assert (readings[queue].length, readings[missing]) == (2, QueueReading(0, 0))
    finally:
        probe.close()


@pytest.mark.parametrize("who", ["no certificate", "a certificate of another CA"])
def test_without_the_client_certificate_the_error_is_clear_and_retried(amqp_url, relay, pki, who):
    options = {"ca_certs": pki.ca, "cert_reqs": "required"}
    if who != "no certificate":
        options.update(certfile=pki.other_client_cert, keyfile=pki.other_client_key)
    with Consumer(_amqps(amqp_url, relay), fast_path=True, ssl_options=options) as consumer:
        wait_for(lambda: consumer.status.last_error is not None, timeout=30, what="the TLS error")
        assert not consumer.status.connected
        assert consumer.status.last_error.startswith(f"the TLS handshake with 127.0.0.1:{relay} failed")
        assert "guest:guest" not in consumer.status.last_error
        wait_for(lambda: consumer.intake.failed_attempts >= 2, timeout=30, what="a retry")

"""Production Redis on the fast path: Sentinel (and its failover), TLS with client certificates,
unix sockets; the queue-length probe on each; /health and the log say which path and why.

The quick tests read URLs and settings only. The e2e ones run the real sidecar, a real worker
and real tasks against redis-server's own TLS listener (a private CA, ``--tls-auth-clients
yes``), a unix socket, and a master, a replica and a sentinel (``redis-server --sentinel``) made
to fail over mid-stream (tests/support/redis_production.py).
"""

from __future__ import annotations

import json
import ssl
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from celery import Celery

from celery_sidecar.app import read
from celery_sidecar.monitor.intake import broker_url
from celery_sidecar.monitor.intake.consumer import choose_path
from celery_sidecar.monitor.intake.probes import RedisQueueProbe, make_queue_probe
from celery_sidecar.monitor.intake.redis_endpoint import RedisEndpoint, resolve
from celery_sidecar.monitor.intake.redis_pubsub import stream_events
from celery_sidecar.running import parse_broker_use_ssl
from tests.bench.publish import Publisher
from tests.bench.traffic import Message, Shape, TrafficGenerator, channel_for
from tests.hostile import envelope, valid_event
from tests.support import production_app
from tests.support.clients import producer
from tests.support.procs import SidecarProcess
from tests.support.redis_production import MASTER_NAME, sentinel_group, tls_redis, unix_redis
from tests.support.servers import wait_for
from tests.support.tls import Pki, make_pki

APP = "tests.support.production_app"


# -- which path, and why (no server) --------------------------------------------------------------


@pytest.mark.parametrize(("url", "options", "ssl_options", "why"), [
    ("redis://127.0.0.1:6379/0", {}, None, "redis:// URL"),
    ("rediss://127.0.0.1:6380/0", {}, {"ssl_ca_certs": "/ca.pem"}, "rediss:// URL with TLS"),
    ("rediss://127.0.0.1:6380/0?ssl_cert_reqs=required", {}, None, "rediss:// URL with TLS"),
    ("redis://127.0.0.1:6379/0", {}, {"ssl_certfile": "/c.pem"}, "redis:// URL with TLS"),  # as kombu: TLS
    ("redis+socket:///run/redis.sock", {}, None, "Redis on the unix socket /run/redis.sock"),
    ("socket:///run/redis.sock", {}, None, "Redis on the unix socket /run/redis.sock"),
    ("sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/0", {"master_name": "m"}, None,
     "sentinel:// URL: the master 'm', asked of 2 sentinels at each connection"),
])
def test_every_redis_url_form_takes_the_fast_path_and_says_why(url, options, ssl_options, why):
    assert choose_path(url, options, True, ssl_options) == ("redis-fast", why)
    assert choose_path(url, options, False, ssl_options) == ("stock", "--no-fast-path")


def test_the_endpoint_is_read_as_kombu_reads_each_url_form():
    sentinel = resolve("sentinel://:s3cret@10.0.0.1:26379;sentinel://10.0.0.2/2",
                       {"master_name": "m", "sentinel_kwargs": {"password": "x"}, "min_other_sentinels": 1})
    assert isinstance(sentinel, RedisEndpoint)
    assert sentinel.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    # kombu takes the password and the database from the first URL of the list.
    assert (sentinel.password, sentinel.db, sentinel.pattern) == ("s3cret", 0, b"/0.celeryev/*")
    assert (sentinel.sentinel_kwargs, sentinel.min_other_sentinels) == ({"password": "x"}, 1)
    unix = resolve("redis+socket://:pw@/run/redis.sock?virtual_host=3")
    assert (unix.path, unix.password, unix.db, unix.pattern) == ("/run/redis.sock", "pw", 3, b"/3.celeryev/*")
    tls = resolve("rediss://127.0.0.1:6380/1", {}, {"ssl_cert_reqs": "required", "ssl_ca_certs": "/ca.pem"})
    assert tls.tls == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem"} and tls.db == 1
    # A URL's own ssl_* query wins over broker_use_ssl, as kombu has it.
    assert resolve("rediss://h:1/0?ssl_cert_reqs=none", {}, {"ssl_ca_certs": "/x"}).tls == {
        "ssl_cert_reqs": ssl.CERT_NONE}


def test_socket_urls_are_redis_unix_sockets():
    broker_url.check("socket:///run/redis.sock")
    assert broker_url.normalize("socket:///run/redis.sock") == "redis+socket:///run/redis.sock"
    assert broker_url.normalize("redis://h/0") == "redis://h/0"
    assert broker_url.endpoint("socket:///run/redis.sock") == "/run/redis.sock"


def test_broker_use_ssl_takes_json_with_cert_reqs_in_words():
    options = parse_broker_use_ssl('{"ssl_cert_reqs": "required", "ssl_ca_certs": "/ca.pem", "cert_reqs": '
                                   '"CERT_OPTIONAL", "ssl_min_version": "TLSv1_2"}')
    assert options == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem", "cert_reqs": ssl.CERT_OPTIONAL,
                       "ssl_min_version": ssl.TLSVersion.TLSv1_2}
    for bad, says in (("not json", "must be a JSON object"), ("[1]", "must be a JSON object"),
                      ('{"ssl_cert_reqs": "maybe"}', "required, optional, none")):
        with pytest.raises(click.BadParameter, match=says):
            parse_broker_use_ssl(bad)


def test_the_apps_broker_use_ssl_is_read_with_its_other_broker_settings():
    app = Celery("tls-app", broker="rediss://redis.internal:6380/0", set_as_current=False)
    app.conf.broker_use_ssl = {"ssl_ca_certs": "/ca.pem", "ssl_certfile": "/c.pem", "ssl_keyfile": "/c.key"}
    app.conf.broker_transport_options = {"master_name": "m"}
    settings = read(app)
    assert settings.broker_use_ssl == app.conf.broker_use_ssl
    assert settings.transport_options == {"master_name": "m"}
    assert read(Celery("plain", broker="redis://h/0", set_as_current=False)).broker_use_ssl is None


@pytest.mark.parametrize(("url", "options", "ssl_options", "kind"), [
    ("sentinel://127.0.0.1:26379/2", {"master_name": "m"}, None, "SentinelManagedConnection"),
    ("redis+socket:///run/redis.sock?virtual_host=2", {}, None, "UnixDomainSocketConnection"),
    ("socket:///run/redis.sock?virtual_host=2", {}, None, "UnixDomainSocketConnection"),
    ("rediss://127.0.0.1:6380/2", {}, {"ssl_ca_certs": "/ca.pem", "ssl_cert_reqs": "required"}, "SSLConnection"),
])
def test_the_queue_probe_reads_the_server_the_event_path_reads(url, options, ssl_options, kind):
    probe = make_queue_probe(url, options, 2.0, ssl_options)
    assert isinstance(probe, RedisQueueProbe)
    pool = probe._client.connection_pool  # nothing connects until the probe runs
    assert pool.connection_class.__name__ == kind and pool.connection_kwargs["db"] == 2
    if ssl_options:
        assert pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
    probe.close()


# -- against real servers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tasks_are_counted(side: SidecarProcess, send: Callable[[str], None], queue: str, tasks: int,
                       already: int = 0) -> None:
    for _ in range(tasks):
        send(queue)
    side.wait_metric("celery_task_succeeded_total", lambda v: v == already + tasks, timeout=90, queue_name=queue)
    side.wait_metric("celery_task_sent_total", lambda v: v == already + tasks, timeout=30, queue_name=queue)


def _queue_probe_works(side: SidecarProcess, queue: str) -> None:
    side.wait_probe_rounds(2)
    metrics = side.metrics()
    assert metrics.get("celery_queue_length", queue_name=queue) == 0
    assert metrics.sum("celery_sidecar_probe_errors_total", probe="queue_length") == 0


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_sentinel_is_read_on_the_fast_path_and_a_failover_is_followed(sidecar, worker):
    with sentinel_group() as group:
        name = f"sidecar-{uuid.uuid4().hex[:6]}"  # how the fast path's connection shows in CLIENT LIST
        options = {"master_name": MASTER_NAME}
        side = sidecar(group.url, "--transport-options", json.dumps({**options, "client_name": name}), "--no-alerts")
        status, health = side.health()
        assert (status, health["broker"]["intake"]) == (200, "redis-fast")
        assert health["broker"]["intake_reason"] == (f"sentinel:// URL: the master {MASTER_NAME!r}, asked of "
                                                     "1 sentinel at each connection")
        assert "event path: redis-fast (sentinel:// URL" in side.log()
        queue = f"sentinel_{uuid.uuid4().hex[:6]}"
        worker(group.url, name=f"sw-{uuid.uuid4().hex[:6]}", queues=queue, app=APP,
               env=production_app.environment(group.url, options))
        app = producer(group.url, broker_transport_options=options)

        def send(q: str) -> None:
            app.send_task("production.ok", queue=q)

        _tasks_are_counted(side, send, queue, 10)
        _queue_probe_works(side, queue)
        assert _subscribed(group.master, name)

        new_master = group.failover()
        # The old master dropped its clients when it was demoted: the sidecar asked Sentinel again.
        wait_for(lambda: _subscribed(new_master, name), timeout=60, what="the fast path on the new master")
        status, health = side.health()
        assert status == 200 and health["broker"]["reconnects"] >= 1
        _tasks_are_counted(side, send, queue, 10, already=10)
        _queue_probe_works(side, queue)
        assert not _subscribed(group.master, name)


def _subscribed(server, client_name: str) -> bool:
    """Whether ``server`` has the sidecar's fast path subscribed (its named pub/sub connection)."""
    try:
        clients = server.client().client_list(_type="pubsub")
    except Exception:  # noqa: BLE001 - a server being demoted may refuse a moment
        return False
    return any(c.get("name") == client_name and int(c.get("psub", 0)) > 0 for c in clients)


@pytest.mark.e2e
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "stock"])
def test_tls_with_a_client_certificate_on_both_paths(pki, fast_path, sidecar, worker):
    with tls_redis(pki) as (_server, tls_port):
        url = f"rediss://127.0.0.1:{tls_port}/0"
        options = pki.redis_client_options()
        args = ["--broker-use-ssl", json.dumps(options), "--no-alerts", *(() if fast_path else ("--no-fast-path",))]
        side = sidecar(url, *args)
        health = side.health()[1]["broker"]
        assert (health["intake"], health["intake_reason"]) == (
            ("redis-fast", "rediss:// URL with TLS") if fast_path else ("stock", "--no-fast-path"))
        queue = f"tls_{uuid.uuid4().hex[:6]}"
        worker(url, name=f"tw-{uuid.uuid4().hex[:6]}", queues=queue, app=APP,
               env=production_app.environment(url, broker_use_ssl=options))
        app = producer(url, broker_use_ssl=options)
        _tasks_are_counted(side, lambda q: app.send_task("production.ok", queue=q), queue, 20)
        _queue_probe_works(side, queue)
        assert side.health()[1]["broker"]["reconnects"] == 0
        assert options["ssl_keyfile"] not in side.log()  # nothing of the TLS options is logged


@pytest.mark.e2e
def test_tls_settings_come_from_the_app_under_celery_a(pki, procs, worker):
    with tls_redis(pki) as (_server, tls_port):
        url = f"rediss://127.0.0.1:{tls_port}/0"
        env = production_app.environment(url, broker_use_ssl=pki.redis_client_options())
        side = SidecarProcess(None, "--no-alerts", env=env, command=("-m", "celery", "-A", APP, "sidecar"))
        procs.append(side)
        assert side.health()[1]["broker"]["intake_reason"] == "rediss:// URL with TLS"
        queue = f"tlsapp_{uuid.uuid4().hex[:6]}"
        worker(url, name=f"ta-{uuid.uuid4().hex[:6]}", queues=queue, app=APP, env=env)
        app = producer(url, broker_use_ssl=pki.redis_client_options())
        _tasks_are_counted(side, lambda q: app.send_task("production.ok", queue=q), queue, 5)


@pytest.mark.e2e
@pytest.mark.parametrize("who", ["a certificate of another CA", "no certificate"])
def test_tls_refused_by_the_server_is_a_clear_error_and_retried(pki, who, sidecar):
    with tls_redis(pki) as (_server, tls_port):
        options = {"ssl_ca_certs": pki.ca, "ssl_cert_reqs": "required"}
        if who == "a certificate of another CA":
            options.update(ssl_certfile=pki.other_client_cert, ssl_keyfile=pki.other_client_key)
        side = sidecar(f"rediss://127.0.0.1:{tls_port}/0", "--broker-use-ssl", json.dumps(options), "--no-alerts",
                       wait_connected=False)
        body = side.wait_health(503)
        wait_for(lambda: side.health()[1]["broker"]["last_error"], timeout=20, what="the TLS error on /health")
        error = side.health()[1]["broker"]["last_error"]
        assert body["broker"]["intake"] == "redis-fast"
        assert error.startswith(f"the TLS handshake with 127.0.0.1:{tls_port} failed"), error
        assert side.health()[1]["broker"]["attempts"] >= 1


@pytest.mark.e2e
@pytest.mark.parametrize("scheme", ["redis+socket", "socket"])
def test_a_unix_socket_is_read_on_the_fast_path(scheme, sidecar, worker):
    with unix_redis() as (_server, path):
        url = f"{scheme}://{path}"
        side = sidecar(url, "--no-alerts")
        health = side.health()[1]["broker"]
        assert (health["intake"], health["intake_reason"]) == ("redis-fast", f"Redis on the unix socket {path}")
        queue = f"unix_{uuid.uuid4().hex[:6]}"
        kombu_url = broker_url.normalize(url)  # celery's worker takes kombu's name for it
        worker(kombu_url, name=f"uw-{uuid.uuid4().hex[:6]}", queues=queue)
        app = producer(kombu_url)
        _tasks_are_counted(side, lambda q: app.send_task("demo.ok", kwargs={"x": 1, "y": 2}, queue=q), queue, 10)
        _queue_probe_works(side, queue)
        assert Path(path).exists()


@pytest.mark.e2e
def test_tls_reads_many_records_at_once_and_a_message_past_one_record(pki):
    """A TLS read returns one record (16 KB at most): a flood of small messages and a 200 KB event,
    which spans a dozen records, all arrive whole (the drain rate is the benchmark's)."""
    generator = TrafficGenerator(Shape(seed=3))
    messages = list(generator.messages(400))
    big = {**valid_event("task-failed", 1), "exception": "ValueError('big')", "traceback": "t" * 200_000}
    received: list[dict] = []
    checked: list[str] = []
    with tls_redis(pki) as (server, tls_port):
        stop, ready = threading.Event(), threading.Event()
        thread = threading.Thread(target=stream_events, daemon=True, kwargs=dict(
            broker_url=f"rediss://127.0.0.1:{tls_port}/0", transport_options={}, on_event=received.append,
            on_skip=lambda reason: pytest.fail(f"skipped: {reason}"), stop=stop, on_connected=ready.set,
            on_checked=lambda etype, fields, now: checked.append(etype), ssl_options=pki.redis_client_options()))
        thread.start()
        try:
            assert ready.wait(15)
            publisher = Publisher(server.port)
            publisher.publish([*messages, Message(channel_for("task.failed"), envelope(big), 1)])
            publisher.wait_replies(timeout=60)
            publisher.close()
            wait_for(lambda: len(received) + len(checked) == generator.totals.events + 1, timeout=30,
                     what="every event through TLS")
            assert thread.is_alive()
        finally:
            stop.set()
            thread.join(5)


def test_broker_use_ssl_is_a_flag_of_both_commands_and_reads_its_environment_variable():
    from celery_sidecar.celery_command import sidecar as celery_command
    from celery_sidecar.cli import run

    for command in (run, celery_command):
        [option] = [p for p in command.params if p.name == "broker_use_ssl"]
        assert (option.opts, option.envvar) == (["--broker-use-ssl"], "SIDECAR_BROKER_USE_SSL")

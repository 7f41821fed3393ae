"""The Redis fast path sees exactly what the stock EventReceiver sees, and survives bad input.

This is the CI guard for the ingest-speed work (docs/performance.md): no timing asserts.
The speed itself is measured by ``python -m tests.bench``.
"""

from __future__ import annotations

import base64
import copy
import threading
import time

import orjson
import pytest
from celery import Celery
from celery.events import EventDispatcher
from celery.utils.time import utcoffset
from kombu.utils.json import dumps
from prometheus_client import CollectorRegistry, generate_latest

from celery_sidecar.exporters.collectors import StateCollector
from celery_sidecar.monitor.intake.decoder import EventDecoder
from celery_sidecar.monitor.intake.redis_pubsub import endpoint_for, stream_events
from tests.bench.publish import Publisher
from tests.bench.traffic import Message, Shape, TrafficGenerator, channel_for, encode_message
from tests.support.inproc import Consumer, DataPath
from tests.support.servers import RedisServer, redis_server, wait_for

# Celery's sign convention: hours *west* of UTC (time.timezone / 3600); India is -5.5.
SENDER_UTCOFFSET = -5.5


@pytest.fixture
def redis(module_redis: RedisServer) -> RedisServer:
    return module_redis


def _raw(payload: bytes, routing_key: str = "task.multi") -> Message:
    return Message(channel_for(routing_key), payload, 0)


def _envelope(body: object, encode: bool = True, content_type: str = "application/json") -> bytes:
    """A complete kombu envelope (as tests.bench.traffic builds it) around any body."""
    text = dumps(body) if encode else str(body)
    envelope = orjson.loads(encode_message({}, "task.multi", "w@h", "tag-1"))
    envelope["body"] = base64.b64encode(text.encode()).decode()
    envelope["content-type"] = content_type
    return dumps(envelope).encode()


# What a broken or hostile producer can put on the channel, and the reason each is counted under.
MALFORMED: list[tuple[bytes, str]] = [
    (_envelope("[1, 2", encode=False), "undecodable"),
    (_envelope({"type": "task-started"}, content_type="application/x-python-serialize"), "undecodable"),
    (_envelope("just a string"), "not_an_event"),
    (_envelope([{"type": "task-started", "uuid": "u-x", "hostname": "w", "timestamp": time.time()}, 42]),
     "not_an_event"),
    (_envelope({"uuid": "no-type", "hostname": "w", "timestamp": 1.0}), "missing_type"),
    (_envelope({"type": "task-started", "uuid": "u-y", "hostname": "w", "clock": "x", "timestamp": 1.0}),
     "malformed"),
    (_envelope({"type": "task-started", "uuid": "u-z", "hostname": "w", "utcoffset": "x", "timestamp": 1.0}),
     "malformed"),
    (_envelope({"type": "custom-unknown", "hostname": "w", "timestamp": 1.0}), "unknown_type"),
]
# Broken envelopes kombu itself trips over before EventReceiver sees anything: unguarded, it
# logs and drops the first, and raises out of drain_events on the second (a reconnect).
# Both paths count both and carry on (the stock path through monitor/intake/event_receiver.py's guards).
BROKEN_ENVELOPES: list[tuple[bytes, str]] = [
    (b"{not json", "undecodable"),
    (_envelope({}).replace(b'"body": "e30="', b'"body": "%%%not base64"'), "undecodable"),
]


def _recorded_stream() -> tuple[list[Message], int]:
    """A fixed stream: realistic traffic (batched lists, utcoffset != 0) with malformed
    messages spliced in. Returns (messages, well-formed events)."""
    # Stamped from now: the boundary refuses timestamps more than a week from their receipt.
    generator = TrafficGenerator(Shape(seed=7, utcoffset=SENDER_UTCOFFSET, heartbeat_freq=0.05))
    messages = list(generator.messages(400))
    for i, (payload, _) in enumerate(MALFORMED + BROKEN_ENVELOPES):
        messages.insert(10 + i * 37, _raw(payload))
    return messages, generator.totals.events


# -- the guard: both paths, one stream, identical metrics ----------------------------------


class _Consumer(Consumer):
    def __init__(self, url: str, fast_path: bool) -> None:
        super().__init__(url, fast_path)
        self.registry = CollectorRegistry()
        self.registry.register(self.metrics)
        self.registry.register(StateCollector(self.path.view, self.path.config))

    def exposition(self) -> list[str]:
        """The event-derived series: counters, histograms, events/skips by type and reason."""
        keep = ("celery_task_", "celery_sidecar_events")
        timing = ("celery_task_oldest_running_seconds",)  # when each path received the events differs
        text = generate_latest(self.registry).decode()
        return [line for line in text.splitlines() if line.startswith(keep) and not line.startswith(timing)]


def test_fast_and_stock_paths_export_identical_metrics_for_the_same_stream(redis: RedisServer) -> None:
    messages, good_events = _recorded_stream()
    consumers = [_Consumer(redis.url, fast_path=True), _Consumer(redis.url, fast_path=False)]
    assert consumers[0].status.intake == "redis-fast"
    assert consumers[1].status.intake == "stock"
    for consumer in consumers:
        consumer.thread.start()
    try:
        wait_for(lambda: all(c.status.connected for c in consumers), timeout=20, what="both intakes")
        publisher = Publisher(redis.port)
        publisher.publish(messages)
        # Each malformed message is one skip, and the list holding one good event adds it.
        expected = good_events + 1 + len(MALFORMED) + len(BROKEN_ENVELOPES)
        # A last event after the stream: once a consumer has it, it has everything before it
        # (one connection, in order), so a duplicate or double count would already show.
        publisher.publish([_raw(_envelope({"type": "worker-heartbeat", "hostname": "sentinel@h",
                                           "timestamp": time.time(), "freq": 2.0}), "worker.heartbeat")])
        publisher.wait_replies()
        publisher.close()
        wait_for(lambda: all("sentinel@h" in c.state.workers for c in consumers), timeout=60,
                 what="the sentinel heartbeat in both pipelines")
    finally:
        for consumer in consumers:
            consumer.stop.set()
        for consumer in consumers:
            consumer.thread.join(10)

    assert all(c.taken_in() == expected + 1 for c in consumers), [c.taken_in() for c in consumers]
    fast, stock = (c.exposition() for c in consumers)
    assert fast == stock
    # Non-trivial: the totals are exactly what was generated and spliced in.
    fast_counters = consumers[0].state.counters
    # + the good event in the bad list, + the sentinel
    assert sum(fast_counters.events_by_type.values()) == good_events + 2
    expected_skips: dict[str, int] = {}
    for _, reason in MALFORMED + BROKEN_ENVELOPES:
        expected_skips[reason] = expected_skips.get(reason, 0) + 1
    assert fast_counters.skipped_by_reason == expected_skips
    assert all(c.status.reconnects == 0 for c in consumers)
    assert any(line.startswith("celery_task_failed_total{") for line in fast)
    assert any(line.startswith("celery_task_retried_total{") for line in fast)
    assert any(line.startswith("celery_task_queue_wait_time_bucket{") for line in fast)


# -- event dicts: the same as EventReceiver.event_from_message, field for field ------------


def _stock_events(payloads: list[bytes], now: float) -> list[dict]:
    """What EventReceiver hands its handlers for these payloads (well-formed ones only)."""
    app = Celery(set_as_current=False)
    with app.connection_for_read("memory://") as conn:
        receiver = app.events.Receiver(conn)
        events = []
        for payload in payloads:
            envelope = orjson.loads(payload)
            body = orjson.loads(base64.b64decode(envelope["body"]))
            for item in body if isinstance(body, list) else [body]:
                events.append(receiver.event_from_message(item, now=lambda: now)[1])
        return events


def test_decoder_yields_the_dicts_event_receiver_yields() -> None:
    generator = TrafficGenerator(Shape(seed=3, utcoffset=SENDER_UTCOFFSET, start=1_700_000_000.0))
    payloads = [m.payload for m in generator.messages(300)]
    assert any(m.startswith(b'{"body": "W') for m in payloads), "expected some list bodies"
    ours: list[dict] = []
    skipped: list[str] = []
    decoder = EventDecoder(ours.append, skipped.append, now=lambda: 42.0)
    for payload in payloads:
        decoder.feed(payload)
    assert skipped == []
    assert len(ours) == generator.totals.events
    assert ours == _stock_events(payloads, now=42.0)
    # utcoffset was applied, with celery's arithmetic: ts - (sender offset - our offset) * 3600.
    sent_at = generator.start + generator.totals.events / 10_000
    assert ours[-1]["timestamp"] == pytest.approx(sent_at - (SENDER_UTCOFFSET - utcoffset()) * 3600, abs=5)


@pytest.mark.parametrize(("payload", "reason"), MALFORMED + BROKEN_ENVELOPES)
def test_malformed_message_is_counted_and_skipped(payload: bytes, reason: str) -> None:
    events: list[dict] = []
    skipped: list[str] = []
    decoder = EventDecoder(events.append, skipped.append)
    decoder.feed(payload)  # must not raise
    good = [e for e in events if e.get("type") != "custom-unknown"]
    if reason == "unknown_type":
        # The decoder delivers it; the pipeline decides the type is unknown.
        assert [e["type"] for e in events] == ["custom-unknown"] and skipped == []
    elif reason == "not_an_event" and good:
        assert skipped == ["not_an_event"] and [e["uuid"] for e in good] == ["u-x"]
    else:
        assert (events, skipped) == ([], [reason])


def test_pipeline_counts_every_skip_reason_of_the_fast_path() -> None:
    pipeline = DataPath.build().pipeline
    decoder = EventDecoder(pipeline.handle, pipeline.skip)
    for payload, _ in MALFORMED + BROKEN_ENVELOPES:
        decoder.feed(payload)
    expected: dict[str, int] = {}
    for _, reason in MALFORMED + BROKEN_ENVELOPES:
        expected[reason] = expected.get(reason, 0) + 1
    assert pipeline.state.counters.skipped_by_reason == expected


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "stock"])
def test_envelopes_kombu_trips_over_are_counted_without_a_reconnect(redis: RedisServer, fast_path: bool) -> None:
    consumer = _Consumer(redis.url, fast_path=fast_path)
    consumer.thread.start()
    try:
        wait_for(lambda: consumer.status.connected, timeout=10, what="connected")
        heartbeat = TrafficGenerator(Shape()).messages(0)  # worker-online messages only
        publisher = Publisher(redis.port)
        publisher.publish([_raw(payload) for payload, _ in BROKEN_ENVELOPES])
        publisher.publish(heartbeat)
        publisher.wait_replies()
        publisher.close()
        wait_for(lambda: consumer.taken_in() == len(BROKEN_ENVELOPES) + Shape().workers, timeout=10,
                 what="the broken envelopes and the worker-online events")
        assert consumer.state.counters.skipped_by_reason == {"undecodable": len(BROKEN_ENVELOPES)}
        assert consumer.status.reconnects == 0
    finally:
        consumer.stop.set()
        consumer.thread.join(10)


# -- the envelope the benchmark publishes is the one kombu publishes ----------------------


def test_benchmark_traffic_is_encoded_like_a_real_event_dispatcher(redis: RedisServer) -> None:
    pubsub = redis.client().pubsub()
    pubsub.psubscribe("/0.celeryev/*")
    # Redis confirms once the pattern is live: events sent before that would not be heard.
    wait_for(lambda: pubsub.get_message(timeout=0.1), timeout=5, what="the psubscribe confirmation")
    app = Celery(broker=redis.url, set_as_current=False)
    with app.connection_for_write() as conn:
        dispatcher = EventDispatcher(conn, hostname="w1@h", app=app, buffer_group={"task"}, buffer_limit=2)
        dispatcher.send("task-received", uuid="u1", name="t.a", args="()", kwargs="{}")
        dispatcher.send("task-started", uuid="u1")  # the second one flushes the list body
        dispatcher.send("worker-heartbeat", freq=2.0, active=0, processed=0)
    captured = []
    while len(captured) < 2 and (msg := pubsub.get_message(timeout=2)) is not None:
        if msg["type"] == "pmessage":
            captured.append(msg)
    pubsub.close()
    assert [m["channel"] for m in captured] == [channel_for("task.multi"), channel_for("worker.heartbeat")]
    for msg in captured:
        envelope = orjson.loads(msg["data"])
        body = orjson.loads(base64.b64decode(envelope["body"]))
        routing_key = envelope["properties"]["delivery_info"]["routing_key"]
        tag = envelope["properties"]["delivery_tag"]
        # Byte for byte: same keys, order, separators and base64 body.
        assert encode_message(body, routing_key, "w1@h", tag) == msg["data"]


# -- kombu's channel naming, connection options ---------------------------------------------


@pytest.mark.parametrize(("db", "options"), [
    (0, {}),
    (5, {}),
    (0, {"global_keyprefix": "app:"}),
    (0, {"fanout_prefix": False}),
    (0, {"fanout_prefix": "/custom."}),
    (2, {"fanout_patterns": False}),
])
def test_fast_path_hears_events_whatever_the_channel_options(redis: RedisServer, db: int,
                                                              options: dict) -> None:
    url = f"redis://127.0.0.1:{redis.port}/{db}"
    received: list[dict] = []
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=stream_events, daemon=True,
                              args=(url, options, received.append, lambda _r: None, stop, ready.set))
    thread.start()
    try:
        assert ready.wait(10)
        app = Celery(broker=url, set_as_current=False)
        app.conf.broker_transport_options = options
        with app.connection_for_write() as conn:
            EventDispatcher(conn, hostname="w1@h", app=app).send("worker-heartbeat", freq=2.0)
        wait_for(lambda: received, timeout=5, what="the heartbeat")
        assert received[0]["type"] == "worker-heartbeat" and received[0]["hostname"] == "w1@h"
    finally:
        stop.set()
        thread.join(5)


@pytest.mark.parametrize(("url", "options", "ssl"), [
    ("redis://127.0.0.1:6379/0", {"credential_provider": "proj.creds.Provider"}, None),
    ("sentinel://127.0.0.1:26379", {}, None),  # no master_name: kombu says what is missing
    ("sentinel://127.0.0.1:26379", {"master_name": "m", "sentinel_fanout_compat": True}, None),
    ("rediss://127.0.0.1:6379/0", {}, {"ssl_validate_ocsp": True}),
    ("amqp://guest:guest@127.0.0.1//", {}, None),
])
def test_urls_the_fast_path_leaves_to_kombu(url: str, options: dict, ssl: dict | None) -> None:
    """Every other Redis URL form is the fast path's (tests/test_redis_production.py)."""
    assert endpoint_for(url, options, ssl) is None


@pytest.mark.e2e
def test_password_in_the_url_is_used_and_a_wrong_one_is_a_clear_error() -> None:
    with redis_server() as server:
        server.client().config_set("requirepass", "s3cret")
        good = f"redis://:s3cret@127.0.0.1:{server.port}/0"
        received: list[dict] = []
        stop, ready = threading.Event(), threading.Event()
        thread = threading.Thread(target=stream_events, daemon=True,
                                  args=(good, {}, received.append, lambda _r: None, stop, ready.set))
        thread.start()
        assert ready.wait(10)
        stop.set()
        thread.join(5)
        with pytest.raises(ConnectionError, match="AUTH"):
            stream_events(f"redis://:wrong@127.0.0.1:{server.port}/0", {}, received.append,
                          lambda _r: None, threading.Event())


@pytest.mark.e2e
def test_a_broker_restart_raises_connection_error_and_the_intake_resumes() -> None:
    with redis_server() as server:
        consumer = _Consumer(server.url, fast_path=True)
        consumer.thread.start()
        try:
            wait_for(lambda: consumer.status.connected, timeout=10, what="connected")
            app = Celery(broker=server.url, set_as_current=False)

            def heartbeat() -> None:
                with app.connection_for_write() as conn:
                    EventDispatcher(conn, hostname="w1@h", app=app).send("worker-heartbeat", freq=2.0)

            heartbeat()
            wait_for(lambda: consumer.taken_in() == 1, timeout=5, what="the first heartbeat")
            server.restart(down_seconds=0.5)
            wait_for(lambda: consumer.status.reconnects == 1 and consumer.status.connected, timeout=20,
                     what="the intake to reconnect")
            heartbeat()
            wait_for(lambda: consumer.taken_in() == 2, timeout=5, what="a heartbeat after the restart")
        finally:
            consumer.stop.set()
            consumer.thread.join(10)


def test_logical_clock_follows_event_receiver() -> None:
    """Clock semantics follow EventReceiver: task-sent gets our clock minus one."""
    events: list[dict] = []
    decoder = EventDecoder(events.append, lambda _r: None, now=lambda: 0.0)
    body = [{"type": "task-received", "clock": 10, "uuid": "a", "hostname": "w", "timestamp": 1.0}]
    decoder.feed(_envelope(copy.deepcopy(body)))
    sent = {"type": "task-sent", "clock": 999, "uuid": "a", "hostname": "c", "timestamp": 1.0}
    decoder.feed(_envelope(sent))
    decoder.feed(_envelope({"type": "worker-heartbeat", "hostname": "w", "timestamp": 1.0}))
    assert [e["clock"] for e in events] == [10, 10, 13]


def test_an_idle_subscription_is_pinged_and_stays_up(redis: RedisServer) -> None:
    """health_check_interval (as kombu reads it) makes an idle reader PING; pongs are not events."""
    received: list[dict] = []
    skipped: list[str] = []
    errors: list[BaseException] = []
    stop, ready = threading.Event(), threading.Event()
    admin = redis.client()

    def pings() -> int:
        return int(admin.info("commandstats").get("cmdstat_ping", {}).get("calls", 0))

    def run() -> None:
        try:
            stream_events(redis.url, {"health_check_interval": 0.2}, received.append, skipped.append, stop,
                          ready.set)
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    before = pings()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        # Several PING/pong rounds on the idle subscription (nobody else here sends PING).
        wait_for(lambda: pings() >= before + 3, timeout=10, what="three PINGs from the idle reader")
        app = Celery(broker=redis.url, set_as_current=False)
        with app.connection_for_write() as conn:
            EventDispatcher(conn, hostname="w1@h", app=app).send("worker-heartbeat", freq=2.0)
        wait_for(lambda: received, timeout=5, what="the heartbeat")
        assert (errors, skipped, [e["type"] for e in received]) == ([], [], ["worker-heartbeat"])
        assert thread.is_alive(), "the reader gave up on an idle but healthy connection"
    finally:
        stop.set()
        thread.join(5)

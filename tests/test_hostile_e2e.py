"""Hostile input against real brokers: malformed messages between real events and tasks.

On Redis (fast path and stock path) and RabbitMQ: every valid event is counted exactly
once, every scrape succeeds, nothing malformed pages anyone, and 100,000 malformed
messages do not grow the sidecar.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.utils.json import dumps
from prometheus_client.parser import text_string_to_metric_families

from tests.bench.publish import Publisher
from tests.bench.traffic import Message
from tests.hostile import BAD_ENVELOPES, BAD_EVENTS, HUGE, VALID_KINDS, envelope, valid_event
from tests.support.brokers import publish_raw
from tests.support.clients import producer
from tests.support.inproc import Consumer
from tests.support.procs import SidecarProcess
from tests.support.servers import RedisServer, wait_for

pytestmark = pytest.mark.timeout(300)

REDIS_CHANNEL = b"/0.celeryev/task.multi"


# -- one message, as each broker carries it ---------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One message: a valid event, a refused event, or a broken body or envelope."""

    kind: str  # "valid" | "event" | "envelope" | "body"
    event: dict | None = None
    raw: bytes = b""
    content_type: str = "application/json"


def redis_payload(item: Item) -> bytes:
    if item.kind == "envelope":
        return item.raw
    if item.kind == "body":
        return envelope(None, raw=item.raw, content_type=item.content_type)
    return envelope(item.event)


def publish_redis(server: RedisServer, batch: list[Item]) -> None:
    """PUBLISH each message on the event channel; returns once Redis has run every one."""
    publisher = Publisher(server.port)
    publisher.publish([Message(REDIS_CHANNEL, redis_payload(item), 0) for item in batch])
    publisher.wait_replies(timeout=120)
    publisher.close()


def amqp_message(item: Item) -> tuple[bytes, str, str]:
    if item.kind == "body":
        return item.raw, item.content_type, "task.multi"
    return dumps(item.event).encode(), "application/json", "task.multi"


# Each is exactly one skip on every path.
BAD_BODIES = [Item("body", raw=b"{not json"), Item("body", raw=b"\xff\xfe"),
              Item("body", raw=b'"a string"'), Item("body", raw=b"[1]"),
              Item("body", raw=b"\x80\x04K\x01.", content_type="application/x-python-serialize")]
# The refused events (stamped at import: within the boundary's week), the 10 MB label cut
# to 300 characters (still refused) so that publishing them many times stays cheap.
REFUSED = [Item("event", event={**e, "hostname": "y" * 300} if e.get("hostname") == HUGE else e)
           for e, _ in BAD_EVENTS]
HUGE_LABEL = Item("event", event=next(e for e, _ in BAD_EVENTS if e.get("hostname") == HUGE))
ROUND = [*REFUSED, *BAD_BODIES]


@st.composite
def interleavings(draw: st.DrawFn, envelopes: bool) -> list[Item]:
    bad = [*REFUSED, *BAD_BODIES, *([Item("envelope", raw=p) for p, _ in BAD_ENVELOPES] if envelopes else [])]
    items: list[Item] = []
    for n in range(draw(st.integers(1, 25))):
        if draw(st.booleans()):
            items.append(Item("valid", event=valid_event(draw(st.sampled_from(VALID_KINDS)), n)))
        else:
            items.append(draw(st.sampled_from(bad)))
    return items


def sentinel() -> dict:
    return {**valid_event("worker-heartbeat", 0), "hostname": f"sentinel-{uuid.uuid4().hex[:8]}@host"}


def publish_and_settle(items: list[Item], consumers: list[Consumer], publish: Callable[[list[Item]], None]) -> None:
    """Publish, then a sentinel heartbeat: once a consumer has it, it has everything before."""
    mark = sentinel()
    publish([*items, Item("valid", event=mark)])
    wait_for(lambda: all(mark["hostname"] in c.state.workers for c in consumers), timeout=30,
             what="the sentinel on every path")


# -- Redis: both paths, one stream ---------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_paths(module_redis: RedisServer) -> Iterator[tuple[RedisServer, list[Consumer]]]:
    consumers = [Consumer(module_redis.url, fast_path=True), Consumer(module_redis.url, fast_path=False)]
    for consumer in consumers:
        consumer.thread.start()
    wait_for(lambda: all(c.status.connected for c in consumers), timeout=20, what="both Redis paths")
    yield module_redis, consumers
    for consumer in consumers:
        consumer.close()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(items=interleavings(envelopes=True))
def test_on_redis_every_valid_event_is_counted_once_on_both_paths(redis_paths, items):
    server, consumers = redis_paths
    before = [c.events() for c in consumers]
    reconnects = [c.status.reconnects for c in consumers]

    publish_and_settle(items, consumers, lambda batch: publish_redis(server, batch))
    valid = sum(1 for i in items if i.kind == "valid")
    assert [c.events() - b for c, b in zip(consumers, before, strict=True)] == [valid + 1, valid + 1]
    assert [c.status.reconnects for c in consumers] == reconnects, "a bad message cost a reconnect"


@pytest.fixture(scope="module")
def amqp_paths(amqp_url: str) -> Iterator[list[Consumer]]:
    consumers = [Consumer(amqp_url, fast_path=True), Consumer(amqp_url, fast_path=False)]
    for consumer in consumers:
        consumer.thread.start()
    wait_for(lambda: all(c.status.connected for c in consumers), timeout=20, what="both AMQP paths")
    # The event queues are bound once the consumers are ready; a heartbeat proves it.
    publish_and_settle([], consumers, lambda batch: publish_raw(amqp_url, [amqp_message(i) for i in batch]))
    yield consumers
    for consumer in consumers:
        consumer.close()


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(items=interleavings(envelopes=False))
def test_on_rabbitmq_every_valid_event_is_counted_once_on_both_paths(amqp_url, amqp_paths, items):
    before = [c.events() for c in amqp_paths]
    reconnects = [c.status.reconnects for c in amqp_paths]
    publish_and_settle(items, amqp_paths,
                       lambda batch: publish_raw(amqp_url, [amqp_message(i) for i in batch]))
    valid = sum(1 for i in items if i.kind == "valid")
    assert [c.events() - b for c, b in zip(amqp_paths, before, strict=True)] == [valid + 1, valid + 1]
    assert [c.status.reconnects for c in amqp_paths] == reconnects


# -- the whole sidecar, real workers, Slack watching ----------------------------------------------


class Scraper:
    """Scrapes /metrics every 200 ms on a thread; every scrape must answer 200 and parse."""

    def __init__(self, side: SidecarProcess) -> None:
        self.side, self.ok, self.failures = side, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        while not self._stop.wait(0.2):
            try:
                response = httpx.get(f"{self.side.url}/metrics", timeout=10)
                assert response.status_code == 200, response.status_code
                list(text_string_to_metric_families(response.text))
                self.ok += 1
            except Exception as exc:  # noqa: BLE001 - collected and asserted on
                self.failures.append(repr(exc))

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


@dataclass
class Broker:
    url: str
    publish: Callable[[list[Item]], None]
    fast_path: bool


@pytest.fixture(params=["redis-fast", "redis-stock", "rabbitmq-fast", "rabbitmq-stock"])
def broker(request, redis_srv: RedisServer, amqp_url: str) -> Broker:
    if request.param.startswith("rabbitmq"):
        return Broker(amqp_url, lambda batch: publish_raw(amqp_url, [amqp_message(i) for i in batch]),
                      request.param == "rabbitmq-fast")

    return Broker(redis_srv.url, lambda batch: publish_redis(redis_srv, batch), request.param == "redis-fast")


def test_malformed_messages_between_real_tasks_count_nothing_break_nothing_and_page_no_one(
        broker, sidecar, worker, slack):
    args = () if broker.fast_path else ("--no-fast-path",)
    side = sidecar(broker.url, *args, env={"SLACK_WEBHOOK_URL": slack.webhook_url})
    queue = f"hostile_{uuid.uuid4().hex[:6]}"
    worker(broker.url, name=f"real-{uuid.uuid4().hex[:6]}", queues=queue)
    app = producer(broker.url)
    tasks = 30
    with Scraper(side) as scraper:
        broker.publish([HUGE_LABEL])
        for _ in range(tasks):
            app.send_task("demo.ok", kwargs={"x": 1, "y": 2}, queue=queue)
            broker.publish(ROUND)
        side.wait_metric("celery_task_succeeded_total", lambda v: v == tasks, timeout=90, queue_name=queue)
        last_malformed = time.time()
        side.wait_metric("celery_sidecar_events_skipped_total", lambda v: v == 1 + tasks * len(ROUND), timeout=60)
        # Long enough for a phantom worker to have gone "offline", and everything delivered.
        side.decided(last_malformed + 2 * 2.0 + 2.0 + 1.0)
    metrics = side.metrics()
    assert metrics.sum("celery_task_sent_total", queue_name=queue) == tasks
    assert metrics.sum("celery_task_started_total", queue_name=queue) == tasks
    assert scraper.failures == [] and scraper.ok >= 10, (scraper.ok, scraper.failures[:3])
    assert metrics.get("celery_sidecar_render_errors_total") == 0
    assert metrics.get("celery_sidecar_reconnects_total") == 0
    health = side.health()[1]
    assert not [h for h in health["workers"] if "phantom" in h], "a malformed heartbeat made a worker"
    # /health counts what /metrics counts. The real worker's heartbeats go on between two
    # reads, so a scrape is bracketed by two /health reads.
    before = health["events"]
    scraped = side.metrics()
    after = side.health()[1]["events"]
    assert before["consumed"] <= scraped.sum("celery_sidecar_events_total") <= after["consumed"]
    assert before["skipped"] == scraped.sum("celery_sidecar_events_skipped_total") == after["skipped"]
    # Slack got nothing: the real worker keeps beating, every real task succeeded.
    assert slack.requests == [], [r.body.get("text", "")[:80] for r in slack.requests]


def test_100k_malformed_messages_do_not_grow_the_sidecar(broker, sidecar):
    args = () if broker.fast_path else ("--no-fast-path",)
    side = sidecar(broker.url, *args, "--no-alerts")
    broker.publish([HUGE_LABEL, *ROUND * 20])  # warm every path (and the allocator) first
    skipped = 1 + 20 * len(ROUND)
    side.wait_metric("celery_sidecar_events_skipped_total", lambda v: v == skipped, timeout=60)
    before = side.rss()
    flood = list(itertools.islice(itertools.cycle(ROUND), 100_000))
    for start in range(0, len(flood), 10_000):
        # In chunks, each consumed before the next: RabbitMQ drops event messages older than
        # celery's 5 s event queue TTL, which would be a loss, not what this test measures.
        broker.publish(flood[start:start + 10_000])
        skipped += len(flood[start:start + 10_000])
        side.wait_metric("celery_sidecar_events_skipped_total", lambda v, n=skipped: v == n, timeout=120)
    grown = (side.rss() - before) / 1e6
    assert grown <= 10, f"RSS grew {grown:.1f} MB over 100,000 malformed messages"
    assert side.health()[0] == 200

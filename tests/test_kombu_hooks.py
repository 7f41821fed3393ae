"""An upgrade of celery, kombu or py-amqp that changes what the event paths rely on fails here.

The stock path replaces two private kombu methods (monitor/intake/kombu_hooks.py), overrides
celery's EventReceiver hooks and reads kombu Messages; the AMQP fast path takes over py-amqp's
socket after its handshake. Each is checked by name and signature. At run time, a private hook
that is gone or changed leaves the stock path unpatched, all or nothing, and says so once in the
log and on /health.
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any

import amqp
import kombu
import pytest
import redis
from amqp.transport import SSLTransport, TCPTransport
from celery import Celery
from celery.events.receiver import EventReceiver
from kombu import Connection, Consumer, Message
from kombu.mixins import ConsumerMixin
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis.client import PubSub

from celery_sidecar.monitor.config.settings import Config
from celery_sidecar.monitor.intake import event_receiver, kombu_hooks
from celery_sidecar.monitor.intake.consumer import Intake
from celery_sidecar.monitor.intake.event_queue import EventQueue
from celery_sidecar.wiring import RunSettings, Sidecar
from tests.support.inproc import DataPath


def params(func: Any) -> list[str]:
    return list(inspect.signature(func).parameters)


# -- what the stock path touches is there, with the signature it calls ----------------------------


def test_the_private_kombu_methods_the_stock_path_replaces_are_as_expected():
    assert kombu_hooks.DELIVER.problem() is None, kombu_hooks.DELIVER.problem()
    assert kombu_hooks.RECEIVE_ONE is not None and kombu_hooks.RECEIVE_ONE.problem() is None
    # What the replacement of _receive_one relies on: kombu raises Empty for an envelope that is
    # not JSON, and logs it with this text (which the sidecar filters, counting it instead).
    source = inspect.getsource(kombu_redis.Channel._receive_one)
    assert "raise Empty()" in source and event_receiver._KOMBU_SAYS_NOT_JSON in source
    assert kombu_redis.logger.name == event_receiver._KOMBU_REDIS_LOG
    # Readiness on Redis: kombu reads every pub/sub reply through its subscriber's parse_response,
    # and subscribes with PSUBSCRIBE (whose confirmation the stock path waits for).
    assert kombu_hooks.PARSE_RESPONSE is not None and kombu_hooks.PARSE_RESPONSE.problem() is None
    assert "c.parse_response()" in source
    assert "client.pubsub()" in inspect.getsource(kombu_redis.Channel.subclient.func)
    assert "c.psubscribe(" in inspect.getsource(kombu_redis.Channel._subscribe)
    # A virtual transport's channel builds each Message between _deliver and the consumer.
    assert "self.Message(raw_message, channel=self)" in inspect.getsource(virtual.Channel.basic_consume)


@pytest.mark.parametrize(("url", "hooks"), [
    ("redis://127.0.0.1:6379/0", ["DELIVER", "RECEIVE_ONE"]),
    ("rediss://127.0.0.1:6379/0", ["DELIVER", "RECEIVE_ONE"]),
    ("sentinel://127.0.0.1:26379", ["DELIVER", "RECEIVE_ONE"]),
    ("redis+socket:///tmp/redis.sock", ["DELIVER", "RECEIVE_ONE"]),
    ("memory://", ["DELIVER"]),
    ("amqp://guest:guest@127.0.0.1:5672//", []),
])
def test_each_transport_needs_the_hooks_it_has(url, hooks):
    transport = Connection(url).transport
    assert kombu_hooks.needed_by(transport) == [getattr(kombu_hooks, h) for h in hooks]
    assert kombu_hooks.unpatched_reason(transport) is None
    assert kombu_hooks.confirms_subscription(transport) == ("RECEIVE_ONE" in hooks)


def test_the_celery_and_kombu_api_the_stock_path_overrides_and_calls():
    expected = {
        EventReceiver.get_consumers: ["self", "Consumer", "channel"],
        EventReceiver.on_consume_ready: ["self", "connection", "channel", "consumers", "wakeup", "kwargs"],
        EventReceiver.on_iteration: ["self"],
        EventReceiver.on_connection_error: ["self", "exc", "interval"],
        EventReceiver.on_decode_error: ["self", "message", "exc"],
        EventReceiver.event_from_message: ["self", "body", "localize", "now", "tzfields", "adjust_timestamp",
                                           "CLIENT_CLOCK_SKEW"],
        ConsumerMixin.consume: ["self", "limit", "timeout", "safety_interval", "kwargs"],
        ConsumerMixin.consumer_context: ["self", "kwargs"],
    }
    assert {f.__qualname__: params(f) for f in expected} == {f.__qualname__: p for f, p in expected.items()}
    receiver_init = params(EventReceiver.__init__)
    assert receiver_init[:3] == ["self", "channel", "handlers"] and "app" in receiver_init
    for attribute in ("connect_max_retries", "should_stop"):
        assert hasattr(EventReceiver, attribute), attribute
    # ConsumerMixin hands its on_decode_error to every consumer: kombu calls it for a message
    # it cannot build or decode (the stock path counts it there).
    assert "on_decode_error=self.on_decode_error" in inspect.getsource(ConsumerMixin.Consumer)
    assert {"on_message", "on_decode_error", "accept"} <= set(params(Consumer.__init__))
    assert "on_m(message)" in inspect.getsource(Consumer._receive_callback)
    for attribute in ("body", "content_type", "content_encoding", "headers"):
        assert attribute in params(Message.__init__), attribute
    assert params(Message.decode) == ["self"]


def test_the_py_amqp_internals_the_amqp_fast_path_takes_over():
    for cls in (TCPTransport, SSLTransport):
        assert "_read_buffer" in inspect.getsource(cls), cls  # what py-amqp read past its handshake
        assert params(cls.write) == ["self", "s"]
    assert {"frame_max", "heartbeat"} <= set(params(amqp.Connection.__init__))
    assert hasattr(amqp.Channel, "channel_id") or "channel_id" in params(amqp.Channel.__init__)


# -- a hook that changed: unpatched, all or nothing, and said so ----------------------------------


@pytest.fixture
def changed_deliver(monkeypatch: pytest.MonkeyPatch) -> str:
    def _deliver(self, message, queue, priority=None):  # a release that took a third parameter
        raise AssertionError("the stock path must not run a hook it does not know")

    monkeypatch.setattr(virtual.Transport, "_deliver", _deliver)
    return (f"stock path unpatched: kombu {kombu.__version__} changed "
            "kombu.transport.virtual.base.Transport._deliver(message, queue) to (message, queue, priority)")


def test_a_changed_hook_is_one_clear_line_in_the_log_and_on_health(changed_deliver, caplog):
    caplog.set_level(logging.INFO, "celery_sidecar.monitor.intake.consumer")
    intake = Intake("redis://127.0.0.1:6379/0", {}, DataPath.build(now=None).pipeline, fast_path=False)
    assert intake.path_reason.startswith(f"--no-fast-path; {changed_deliver}")
    [line] = [r for r in caplog.records if r.getMessage().startswith("event path:")]
    assert line.levelno == logging.WARNING and changed_deliver in line.getMessage()
    # The fast paths replace nothing of kombu's: they are not concerned.
    fast = Intake("redis://127.0.0.1:6379/0", {}, DataPath.build(now=None).pipeline)
    assert fast.path_reason == "redis:// URL"

    sidecar = Sidecar(RunSettings(broker_url="redis://127.0.0.1:6379/0", port=0, fast_path=False, alerts=False),
                      Config())
    sidecar.http.start()  # its /health is built in-process; nothing connects to the broker
    try:
        _, body = sidecar.health()
    finally:
        sidecar.http.stop()
    assert body["broker"]["intake"] == "stock"
    assert changed_deliver in body["broker"]["intake_reason"]


def test_a_changed_redis_py_parse_response_keeps_the_guards_and_drops_only_the_wait(monkeypatch):
    def parse_response(self, block=True, timeout=0, push=False):  # a release that took a third parameter
        raise AssertionError("the stock path must not wrap a method it does not know")

    monkeypatch.setattr(PubSub, "parse_response", parse_response)
    transport = Connection("redis://127.0.0.1:6379/0").transport
    assert kombu_hooks.unpatched_reason(transport) is None, "kombu's hooks are still as expected"
    assert not kombu_hooks.confirms_subscription(transport)
    assert kombu_hooks.PARSE_RESPONSE.problem() == (
        "changed redis.client.PubSub.parse_response(block, timeout) to (block, timeout, push)")


def test_unpatched_the_stock_path_replaces_nothing_of_kombus(changed_deliver):
    """Never half-patched: with one hook changed, the other is left alone too."""
    app = Celery("unpatched", broker="memory://", set_as_current=False)
    assert event_receiver.unpatched_reason(app) is not None
    with app.connection_for_read() as conn:
        receiver = event_receiver._GuardedReceiver(
            conn, handlers={}, app=app, pipeline=DataPath.build(now=None).pipeline, stop=threading.Event(),
            on_ready=lambda: None, event_queue=EventQueue(), on_backlog=lambda _n: None, patch=False)
        with receiver.consumer_context(wakeup=False) as (_, channel, _consumers):
            assert "_deliver" not in vars(channel.connection)
            assert "_receive_one" not in vars(channel)


def test_patched_the_stock_path_replaces_the_hooks_on_its_own_objects_only():
    app = Celery("patched", broker="memory://", set_as_current=False)
    with app.connection_for_read() as conn:
        receiver = event_receiver._GuardedReceiver(
            conn, handlers={}, app=app, pipeline=DataPath.build(now=None).pipeline, stop=threading.Event(),
            on_ready=lambda: None, event_queue=EventQueue(), on_backlog=lambda _n: None, patch=True)
        with receiver.consumer_context(wakeup=False) as (_, channel, _consumers):
            assert "_deliver" in vars(channel.connection)
            assert "_deliver" not in vars(Connection("memory://").transport)
    assert virtual.Transport._deliver is inspect.getattr_static(virtual.Transport, "_deliver")


# -- on Redis, "consuming" only once the server confirmed the subscription -------------------------


def _ready_when(url: str, patch: bool) -> list[int]:
    """Run the stock path's receiver until it says it is ready; how many pattern subscriptions
    Redis had at that moment."""
    app = Celery("ready", broker=url, set_as_current=False)
    client = redis.Redis.from_url(url)
    subscriptions_when_ready: list[int] = []
    stop = threading.Event()

    def on_ready() -> None:
        subscriptions_when_ready.append(client.pubsub_numpat())
        stop.set()

    consumer = threading.Thread(target=event_receiver.consume, args=(
        app, DataPath.build(now=None).pipeline, stop, on_ready, EventQueue(), lambda _n: None, patch))
    consumer.start()
    consumer.join(timeout=30)
    assert not consumer.is_alive(), "the receiver never said it was ready"
    return subscriptions_when_ready


@pytest.mark.e2e
@pytest.mark.parametrize("patch", [True, False])
def test_on_redis_the_stock_path_is_ready_only_once_redis_confirmed_its_subscription(redis_srv, patch,
                                                                                     monkeypatch):
    """kombu subscribes at its first poll, after on_consume_ready. Ready any earlier, the sidecar
    says it is consuming while an event published then reaches nobody. Unpatched (a kombu it does
    not know), it is ready at once, as celery's own receiver is."""
    monkeypatch.setattr(event_receiver, "SUBSCRIBE_GRACE_SECONDS", 600.0)  # the confirmation, not the grace
    assert _ready_when(redis_srv.url, patch) == ([1] if patch else [0])


@pytest.mark.e2e
def test_without_a_confirmation_the_stock_path_says_so_and_consumes_all_the_same(redis_srv, monkeypatch,
                                                                                 caplog):
    monkeypatch.setattr(event_receiver, "SUBSCRIBE_GRACE_SECONDS", 0.5)
    monkeypatch.setattr(event_receiver, "when_subscribed", lambda _channel, _on_subscribed: True)  # never heard
    assert _ready_when(redis_srv.url, True) == [1]
    assert "Redis did not confirm the event subscription within 0.5s; consuming all the same" in caplog.text

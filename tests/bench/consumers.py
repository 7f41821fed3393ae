"""Bare counting consumers, the reference points of the benchmark (no state, no metrics).

    python -m tests.bench.consumers stock|fast|pyamqp|kombu BROKER_URL COUNT_FILE

``stock`` is ``celery.events.EventReceiver`` with a counting ``*`` handler (what most
monitors are built on); ``fast`` is celery_sidecar.monitor.intake.redis_pubsub (amqp_socket on
RabbitMQ, consuming the sidecar's kind of event queue) with the same handler.
On RabbitMQ, two more reference points: ``pyamqp`` is py-amqp's ``basic_consume`` with a
callback that parses the body with the json module and counts its events (the least any
Python AMQP consumer does), ``kombu`` a plain kombu ``Consumer`` (accept json) doing the
same. Each writes its event count to COUNT_FILE every 50 ms, so the benchmark can read it
without touching the consumer's socket or GIL.

On AMQP the bare EventReceiver's queue gets ``event_queue_ttl`` 600 s instead of celery's
5 s (and ``event_queue_expires`` 900 s): the drain test parks the flood in the queue while
the consumer is paused, and with 5 s it would expire there. The pyamqp and kombu
consumers declare the same kind of queue (``celeryev.bench.<uuid>``, bound with ``#``,
auto-delete, the same TTL), not exclusive, so the benchmark can read its depth.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import uuid

from celery import Celery
from kombu import Connection, Exchange, Queue

from celery_sidecar.monitor.intake.redis_pubsub import stream_events


class Counter:
    def __init__(self) -> None:
        self.events = 0
        self.skipped = 0

    def event(self, _event: dict) -> None:
        self.events += 1

    def skip(self, _reason: str) -> None:
        self.skipped += 1


def _report(counter: Counter, path: str, stop: threading.Event) -> None:
    tmp = path + ".tmp"
    while not stop.wait(0.05):
        with open(tmp, "w") as f:
            f.write(f"{counter.events} {counter.skipped}\n")
        os.replace(tmp, path)


# The paused drain parks the flood in the consumer's queue: keep it there for 10 minutes.
AMQP_QUEUE_TTL = 600.0
AMQP_QUEUE_EXPIRES = 900.0


def _is_amqp(url: str) -> bool:
    return url.split("://", 1)[0] in ("amqp", "amqps", "pyamqp")


def run_stock(url: str, counter: Counter, stop: threading.Event) -> None:
    app = Celery(broker=url)
    if _is_amqp(url):
        app.conf.event_queue_ttl = AMQP_QUEUE_TTL
        app.conf.event_queue_expires = AMQP_QUEUE_EXPIRES
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": counter.event})
        receiver.should_stop = False
        threading.Thread(target=lambda: (stop.wait(), setattr(receiver, "should_stop", True)),
                         daemon=True).start()
        receiver.capture(limit=None, timeout=None, wakeup=False)


def run_fast(url: str, counter: Counter, stop: threading.Event) -> None:
    if _is_amqp(url):  # the AMQP fast reader, on the sidecar's kind of event queue
        from celery_sidecar.monitor.intake import amqp_socket
        from celery_sidecar.monitor.intake.event_queue import EventQueue

        amqp_socket.stream_events(url, {}, EventQueue(), counter.event, counter.skip, stop)
        return
    stream_events(url, {}, counter.event, counter.skip, stop)


def _bench_queue() -> tuple[str, dict]:
    return f"celeryev.bench.{uuid.uuid4().hex}", {"x-message-ttl": int(AMQP_QUEUE_TTL * 1000),
                                                  "x-expires": int(AMQP_QUEUE_EXPIRES * 1000)}


def _count_body(counter: Counter, body: bytes | str) -> None:
    events = json.loads(body)
    counter.events += len(events) if isinstance(events, list) else 1


def run_pyamqp(url: str, counter: Counter, stop: threading.Event) -> None:
    conn = Connection(url, connect_timeout=10)  # kombu only parses the URL and opens py-amqp's connection
    conn.connect()
    amqp = conn.connection
    channel = amqp.channel()
    queue, arguments = _bench_queue()
    channel.exchange_declare("celeryev", "topic", durable=True, auto_delete=False)
    channel.queue_declare(queue, durable=False, exclusive=False, auto_delete=True, arguments=arguments)
    channel.queue_bind(queue, "celeryev", routing_key="#")
    channel.basic_consume(queue, no_ack=True, callback=lambda message: _count_body(counter, message.body))
    while not stop.is_set():
        try:
            while not stop.is_set():  # the try outside the per-message loop: no cost per message
                amqp.drain_events(timeout=0.5)
        except TimeoutError:
            continue
    conn.release()


def run_kombu(url: str, counter: Counter, stop: threading.Event) -> None:
    name, arguments = _bench_queue()
    queue = Queue(name, Exchange("celeryev", type="topic"), routing_key="#", durable=False, auto_delete=True,
                  queue_arguments=arguments)

    def on_message(body: object, _message: object) -> None:
        counter.events += len(body) if isinstance(body, list) else 1

    with Connection(url, connect_timeout=10) as conn, \
            conn.Consumer(queue, callbacks=[on_message], accept=["json"], no_ack=True):
        while not stop.is_set():
            try:
                while not stop.is_set():
                    conn.drain_events(timeout=0.5)
            except TimeoutError:
                continue


def main(argv: list[str]) -> None:
    mode, url, path = argv
    counter = Counter()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=_report, args=(counter, path, stop), daemon=True).start()
    {"stock": run_stock, "fast": run_fast, "pyamqp": run_pyamqp, "kombu": run_kombu}[mode](url, counter, stop)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Bare counting consumers, the reference points of the benchmark (no state, no metrics).

    python -m tests.bench.consumers stock|fast BROKER_URL COUNT_FILE

``stock`` is ``celery.events.EventReceiver`` with a counting ``*`` handler (what most
monitors are built on); ``fast`` is celery_sidecar.monitor.redis_stream with the same handler. Each
writes its event count to COUNT_FILE every 50 ms, so the benchmark can read it without
touching the consumer's socket or GIL.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from celery import Celery

from celery_sidecar.monitor.redis_stream import stream_events


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


def run_stock(url: str, counter: Counter, stop: threading.Event) -> None:
    app = Celery(broker=url)
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": counter.event})
        receiver.should_stop = False
        threading.Thread(target=lambda: (stop.wait(), setattr(receiver, "should_stop", True)),
                         daemon=True).start()
        receiver.capture(limit=None, timeout=None, wakeup=False)


def run_fast(url: str, counter: Counter, stop: threading.Event) -> None:
    stream_events(url, {}, counter.event, counter.skip, stop)


def main(argv: list[str]) -> None:
    mode, url, path = argv
    counter = Counter()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=_report, args=(counter, path, stop), daemon=True).start()
    {"stock": run_stock, "fast": run_fast}[mode](url, counter, stop)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Where a consumer's cost per event goes: ``python -m tests.bench.overhead [--path fast]``.

On celery's EventReceiver the sidecar once cost about 50 µs per event more than a bare
EventReceiver, only ~20 µs of it in the sidecar's own frames. This runs the
same stock consumer (monitor/intake/event_receiver.py) in one process over one pre-published flood of
single-event messages, changing one thing at a time (``--path fast``: the same over the AMQP
fast path instead of EventReceiver):

  count     EventReceiver + a counting handler (the bare receiver)
  fold      + the sidecar's pipeline: the fold and the event metrics
  fold-nogc + the same with the cyclic GC off (what GC costs the fold)
  sidecar   the whole sidecar (every sink and thread: alerts, ticker, prerender, probes)
  sidecar-nogc  the same with the cyclic GC off

For each: events/s, process CPU µs per event, and the time the cyclic GC took (gc.callbacks)
with its collections per generation. Takes a few minutes (--messages 60000 by default).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery

from celery_sidecar.monitor.config.settings import Config, LiveConfig
from celery_sidecar.monitor.fold.pipeline import Pipeline
from celery_sidecar.monitor.fold.state import State
from celery_sidecar.monitor.fold.status import Status
from celery_sidecar.monitor.intake.amqp_socket import stream_events
from celery_sidecar.monitor.intake.event_queue import EventQueue
from celery_sidecar.monitor.intake.event_receiver import consume
from tests.bench.rabbit import Publisher, QueueDepth, bench_vhost, to_publishes
from tests.bench.traffic import Shape, build
from tests.support.servers import wait_for

VARIANTS = ("count", "fold", "fold-nogc", "sidecar", "sidecar-nogc")


@dataclass
class GcTimer:
    """Wall time spent in the cyclic GC, and collections per generation (gc.callbacks)."""

    seconds: float = 0.0
    collections: list[int] = field(default_factory=lambda: [0, 0, 0])
    _started: float = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1


class _Counting:
    """The bare receiver's handler, in the pipeline's shape."""

    def __init__(self) -> None:
        self.events = 0

    def handle(self, _event: dict) -> None:
        self.events += 1

    def skip(self, _reason: str) -> None: ...


@dataclass
class Result:
    variant: str
    events: int
    seconds: float
    cpu: float
    gc: GcTimer

    def line(self) -> str:
        g = self.gc
        gc_share = 100 * g.seconds / self.seconds
        return (f"{self.variant:<13} {self.events / self.seconds:>8,.0f} ev/s  "
                f"{1e6 * self.cpu / self.events:>6.1f} µs CPU/ev  GC {1e6 * g.seconds / self.events:>5.1f} µs/ev "
                f"({gc_share:4.1f} % of the time; collections gen0/1/2 {'/'.join(map(str, g.collections))})")


@contextmanager
def _gc(enabled: bool) -> Iterator[GcTimer]:
    timer = GcTimer()
    gc.collect()
    gc.callbacks.append(timer)
    if not enabled:
        gc.disable()
    try:
        yield timer
    finally:
        gc.enable()
        gc.callbacks.remove(timer)


def _fill(url: str, queue: EventQueue, publishes: list, events: int) -> None:
    """Declare the queue (a consumer connects once and leaves), then publish the flood into it."""
    ready = threading.Event()
    stop = threading.Event()
    app = Celery(broker=url)
    thread = threading.Thread(target=consume, args=(app, _Counting(), stop, ready.set, queue, lambda _n: None),
                              daemon=True)
    thread.start()
    wait_for(ready.is_set, timeout=30, what="the event queue to be declared")
    stop.set()
    thread.join(10)
    publisher = Publisher(url)
    publisher.publish(publishes)
    publisher.wait_confirms()
    publisher.close()
    depth = QueueDepth(url)
    try:
        wait_for(lambda: depth.messages(queue.name) == len(publishes), timeout=60, what="the flood in the queue")
    finally:
        depth.close()


def _run(url: str, variant: str, publishes: list, events: int, fast: bool) -> Result:
    queue = EventQueue()
    _fill(url, queue, publishes, events)
    gc_on = not variant.endswith("-nogc")
    if variant.startswith("sidecar"):
        return _run_sidecar(url, variant, queue, events, gc_on, fast)
    stop = threading.Event()
    sink: Any = _Counting() if variant == "count" else _pipeline()
    count: Callable[[], int] = ((lambda: sink.events) if variant == "count"
                                else (lambda: sum(sink.state.counters.events_by_type.values())))
    if fast:
        args: tuple = (url, {}, queue, sink.handle, sink.skip, stop)
        target: Callable = stream_events
    else:
        args, target = (Celery(broker=url), sink, stop, lambda: None, queue, lambda _n: None), consume
    with _gc(gc_on) as timer:
        started, cpu0 = time.perf_counter(), time.process_time()
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        wait_for(lambda: count() >= events, timeout=600, interval=0.01, what=f"{variant} to drain")
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu0
    stop.set()
    thread.join(10)
    return Result(variant, count(), seconds, cpu, timer)


def _pipeline() -> Pipeline:
    from celery_sidecar.exporters.event_metrics import EventMetrics

    live = LiveConfig(Config())
    pipeline = Pipeline(State(live), Status())
    pipeline.add_sink(EventMetrics(live))
    return pipeline


def _run_sidecar(url: str, variant: str, queue: EventQueue, events: int, gc_on: bool, fast: bool) -> Result:
    from celery_sidecar.wiring import RunSettings, Sidecar

    with tempfile.TemporaryDirectory() as state_dir:
        sidecar = Sidecar(RunSettings(broker_url=url, port=0, fast_path=fast, event_queue=queue,
                                      state_dir=Path(state_dir)), Config())
        with _gc(gc_on) as timer:
            started, cpu0 = time.perf_counter(), time.process_time()
            sidecar.start()
            wait_for(lambda: sum(sidecar.state.counters.events_by_type.values()) >= events, timeout=600, interval=0.01,
                     what=f"{variant} to drain")
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu0
        sidecar.stop()
    return Result(variant, sum(sidecar.state.counters.events_by_type.values()), seconds, cpu, timer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=60_000, help="single-event messages per flood")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--path", choices=("stock", "fast"), default="stock",
                        help="the consumer under each variant: EventReceiver, or the AMQP fast path")
    args = parser.parse_args()
    messages, _ = build(max(1, args.messages // 4), Shape(seed=11, batched_workers_ratio=0))
    publishes = to_publishes(messages)[: args.messages]
    events = sum(p.events for p in publishes)
    print(f"{len(publishes):,} single-event messages per flood, {events:,} events; gc thresholds {gc.get_threshold()}")
    with bench_vhost() as url:
        for round_ in range(args.rounds):
            for variant in args.only.split(","):
                result = _run(url, variant, publishes, events, fast=args.path == "fast")
                print(f"round {round_ + 1}: {result.line()}", flush=True)


if __name__ == "__main__":
    main()

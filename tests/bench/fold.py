"""What the fold costs per event, in one process: ``python -m tests.bench.fold [--tasks N]``.

The drain benchmark's wall-clock rate moves ±25 % between identical runs on a shared
machine; this does not touch a broker or a socket. The drain's traffic is decoded once
(the Redis fast path's decoder), then fed to a fresh pipeline each round, and the process
CPU time is taken, best of ``--rounds``:

  decode     the fast path's decoder alone (envelope → event dicts)
  parse      the boundary alone (monitor/schema.PARSERS), and the same fields read with no
             check at all (operator.itemgetter, the cheapest read there is): their
             difference is what checking costs (issue 10 allows 5 % of the drain)
  decode + check   envelope → checked fields: the ordinary way (event dicts, then the
             parse) and the way every path runs (monitor/typed.py: one msgspec decode for a body
             of hot task events, which checks as it parses; the rest the ordinary way)
  fold       Pipeline.handle with no sink: the boundary check (monitor/schema.py) and State
  + <Sink>   the fold plus one of the sidecar's sinks
  sidecar    the sidecar's whole pipeline, every sink (alerts go nowhere: nothing is started)

Compare two versions by running each one's copy of this with its own install.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections.abc import Callable
from operator import itemgetter
from pathlib import Path

from celery_sidecar.monitor.config import Config, LiveConfig
from celery_sidecar.monitor.decoder import EventDecoder
from celery_sidecar.monitor.pipeline import Pipeline, Sink
from celery_sidecar.monitor.schema import PARSERS
from celery_sidecar.monitor.state import State
from celery_sidecar.monitor.status import Status
from celery_sidecar.wiring import RunSettings, Sidecar
from tests.bench.traffic import Shape, build


def _best(rounds: int, events: int, run: Callable[[], None], prepare: Callable[[], None] = lambda: None) -> float:
    """CPU µs per event of ``run``, best of ``rounds``."""
    best = float("inf")
    for _ in range(rounds):
        prepare()
        gc.collect()
        started = time.process_time()
        run()
        best = min(best, time.process_time() - started)
    return 1e6 * best / events


# What each parse returns, read with no check; rarer types (workers) are parsed either way.
UNCHECKED = {
    "task-sent": itemgetter("uuid", "timestamp", "hostname", "name", "queue", "retries", "eta", "args", "kwargs"),
    "task-received": itemgetter("uuid", "timestamp", "hostname", "name", "retries", "eta", "args", "kwargs"),
    "task-started": itemgetter("uuid", "timestamp", "hostname"),
    "task-succeeded": itemgetter("uuid", "timestamp", "hostname", "runtime"),
    "task-failed": itemgetter("uuid", "timestamp", "hostname", "exception", "traceback"),
    "task-retried": itemgetter("uuid", "timestamp", "hostname", "exception", "traceback"),
}


def _sidecar_pipeline() -> Pipeline:
    state_dir = Path(tempfile.mkdtemp(prefix="fold-bench-"))
    return Sidecar(RunSettings(broker_url="redis://127.0.0.1:1/0", port=0, state_dir=state_dir), Config()).pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=60_000, help="tasks of drain traffic (4.2 events each)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    messages, _totals = build(args.tasks, Shape(seed=11))
    payloads = [m.payload for m in messages]
    events: list[dict] = []
    decoder = EventDecoder(events.append, lambda _reason: None)
    for payload in payloads:
        decoder.feed(payload)
    print(f"{len(events):,} events of {args.tasks:,} tasks; CPU µs per event, best of {args.rounds}")

    def decode() -> None:
        quiet = EventDecoder(lambda _event: None, lambda _reason: None)
        for payload in payloads:
            quiet.feed(payload)

    print(f"  {'decode':<24} {_best(args.rounds, len(events), decode):6.2f}")

    checked = [(PARSERS[e["type"]], e) for e in events]
    unchecked = [(UNCHECKED.get(e["type"], PARSERS[e["type"]]), e) for e in events]
    for (parse, event), (read, _) in zip(checked, unchecked, strict=True):
        assert parse(event) == read(event), f"the unchecked read is not what {parse.__name__} returns"

    def each(pairs: list) -> Callable[[], None]:
        def run() -> None:
            for parse, event in pairs:
                parse(event)
        return run

    parse = _best(args.rounds, len(events), each(checked))
    read = _best(args.rounds, len(events), each(unchecked))
    print(f"  {'parse':<24} {parse:6.2f}  (no check: {read:.2f}; checking costs {parse - read:.2f})")

    def decode_and_check(typed: bool) -> Callable[[], None]:
        def run() -> None:
            checked = EventDecoder(lambda event: PARSERS[event["type"]](event), lambda _reason: None,
                                   on_checked=(lambda _type, _fields, _received: None) if typed else None)
            for payload in payloads:
                checked.feed(payload)
        return run

    dicts = _best(args.rounds, len(events), decode_and_check(typed=False))
    typed = _best(args.rounds, len(events), decode_and_check(typed=True))
    print(f"  {'decode + check':<24} {dicts:6.2f}  (typed, as every path runs: {typed:.2f})")

    def now() -> None:
        """Re-date the events to now, so liveness and the boundary's skew bound see live traffic."""
        shift = time.time() - events[0]["local_received"]
        for event in events:
            event["local_received"] += shift
            event["timestamp"] += shift

    def measure(label: str, make: Callable[[], Pipeline]) -> None:
        pipeline: list[Pipeline] = []

        def prepare() -> None:
            now()
            pipeline[:] = [make()]

        def run() -> None:
            handle = pipeline[0].handle
            for event in events:
                handle(event)

        print(f"  {label:<24} {_best(args.rounds, len(events), run, prepare):6.2f}")

    def fold() -> Pipeline:
        return Pipeline(State(LiveConfig(Config())), Status())

    def fold_with(sink: Sink) -> Callable[[], Pipeline]:
        def make() -> Pipeline:
            pipeline = fold()
            pipeline.add_sink(sink)
            return pipeline
        return make

    measure("fold", fold)
    for sink in _sidecar_pipeline().sinks:
        measure(f"+ {type(sink).__name__}", fold_with(sink))
    measure("sidecar", _sidecar_pipeline)


if __name__ == "__main__":
    main()

"""What the fold costs per event, in one process: ``python -m tests.bench.fold [--tasks N]``.

The drain benchmark's wall-clock rate moves ±25 % between identical runs on a shared
machine; this does not touch a broker or a socket. The drain's traffic is decoded once
(the Redis fast path's decoder), then fed to a fresh pipeline each round, and the process
CPU time is taken, best of ``--rounds``:

  decode     the fast path's decoder alone (envelope → event dicts)
  parse      the boundary alone (monitor/boundary/parse.py PARSERS), and the same fields read with no
             check at all (operator.itemgetter, the cheapest read there is): their
             difference is what checking costs (budgeted at 5 % of the drain)
  decode + check   envelope → checked fields: the ordinary way (event dicts, then the
             parse) and the way every path runs (monitor/boundary/hot.py: one msgspec decode for a body
             of hot task events, which checks as it parses; the rest the ordinary way)
  fold       Pipeline.fold_checked with no sink, on fields already checked as every path
             checks them: the fold alone
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

from celery_sidecar.monitor.boundary.parse import PARSERS
from celery_sidecar.monitor.config.settings import Config, LiveConfig
from celery_sidecar.monitor.fold.pipeline import Pipeline, Sink
from celery_sidecar.monitor.fold.state import State
from celery_sidecar.monitor.fold.status import Status
from celery_sidecar.monitor.intake.decoder import EventDecoder
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


def sidecar_pipeline() -> Pipeline:
    """The sidecar's whole pipeline, every sink (alerts go nowhere: nothing is started)."""
    state_dir = Path(tempfile.mkdtemp(prefix="fold-bench-"))
    return Sidecar(RunSettings(broker_url="redis://127.0.0.1:1/0", port=0, state_dir=state_dir), Config()).pipeline


def fold_pipeline() -> Pipeline:
    """The fold alone: state, no sink."""
    return Pipeline(State(LiveConfig(Config())), Status())


class Traffic:
    """The drain's traffic, decoded once: payloads, event dicts, and the checked fields every
    path folds (hot bodies through monitor/boundary/hot.py, the rest through the careful parse)."""

    def __init__(self, tasks: int) -> None:
        messages, _totals = build(tasks, Shape(seed=11))
        self.payloads = [m.payload for m in messages]
        self.events: list[dict] = []
        decoder = EventDecoder(self.events.append, lambda _reason: None)
        for payload in self.payloads:
            decoder.feed(payload)
        self.checked: list[tuple[str, tuple, float]] = []
        ordinary: list[dict] = []
        decoder = EventDecoder(ordinary.append, lambda _reason: None,
                               on_checked=lambda etype, fields, at: self.checked.append((etype, fields, at)))
        for payload in self.payloads:
            decoder.feed(payload)
        self.checked += [(e["type"], PARSERS[e["type"]](e), e["local_received"]) for e in ordinary]

    def redate(self) -> None:
        """Move receipt times to now, so liveness and the boundary's skew bound see live traffic."""
        shift = time.time() - self.events[0]["local_received"]
        for event in self.events:
            event["local_received"] += shift
            event["timestamp"] += shift
        self.checked = [(etype, fields, at + shift) for etype, fields, at in self.checked]


def decode_rows(traffic: Traffic, rounds: int) -> None:
    n, payloads = len(traffic.events), traffic.payloads

    def decode() -> None:
        quiet = EventDecoder(lambda _event: None, lambda _reason: None)
        for payload in payloads:
            quiet.feed(payload)

    print(f"  {'decode':<24} {_best(rounds, n, decode):6.2f}")

    def decode_and_check(typed: bool) -> Callable[[], None]:
        def run() -> None:
            checked = EventDecoder(lambda event: PARSERS[event["type"]](event), lambda _reason: None,
                                   on_checked=(lambda _type, _fields, _received: None) if typed else None)
            for payload in payloads:
                checked.feed(payload)
        return run

    dicts = _best(rounds, n, decode_and_check(typed=False))
    typed = _best(rounds, n, decode_and_check(typed=True))
    print(f"  {'decode + check':<24} {dicts:6.2f}  (typed, as every path runs: {typed:.2f})")


def parse_row(traffic: Traffic, rounds: int) -> None:
    events = traffic.events
    checked = [(PARSERS[e["type"]], e) for e in events]
    unchecked = [(UNCHECKED.get(e["type"], PARSERS[e["type"]]), e) for e in events]
    for (parse, event), (read, _) in zip(checked, unchecked, strict=True):
        assert parse(event) == read(event), f"the unchecked read is not what {parse.__name__} returns"

    def each(pairs: list) -> Callable[[], None]:
        def run() -> None:
            for parse, event in pairs:
                parse(event)
        return run

    parse = _best(rounds, len(events), each(checked))
    read = _best(rounds, len(events), each(unchecked))
    print(f"  {'parse':<24} {parse:6.2f}  (no check: {read:.2f}; checking costs {parse - read:.2f})")


def fold_rows(traffic: Traffic, rounds: int) -> None:
    """The fold of checked fields, as every path hands them over; then each sink on top."""

    def measure(label: str, make: Callable[[], Pipeline]) -> None:
        pipeline: list[Pipeline] = []

        def prepare() -> None:
            traffic.redate()
            pipeline[:] = [make()]

        def run() -> None:
            fold = pipeline[0].fold_checked
            for etype, fields, at in traffic.checked:
                fold(etype, fields, at)

        print(f"  {label:<24} {_best(rounds, len(traffic.checked), run, prepare):6.2f}")

    def fold_with(sink: Sink) -> Callable[[], Pipeline]:
        def make() -> Pipeline:
            pipeline = fold_pipeline()
            pipeline.add_sink(sink)
            return pipeline
        return make

    measure("fold", fold_pipeline)
    for sink in sidecar_pipeline().sinks:
        measure(f"+ {type(sink).__name__}", fold_with(sink))
    measure("sidecar", sidecar_pipeline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=60_000, help="tasks of drain traffic (4.2 events each)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    traffic = Traffic(args.tasks)
    print(f"{len(traffic.events):,} events of {args.tasks:,} tasks; CPU µs per event, best of {args.rounds}")
    decode_rows(traffic, args.rounds)
    parse_row(traffic, args.rounds)
    fold_rows(traffic, args.rounds)


if __name__ == "__main__":
    main()

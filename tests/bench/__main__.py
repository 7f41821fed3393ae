"""python -m tests.bench: the ingest benchmark (see docs/performance.md)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

from tests.bench import amqp_scenarios, redis_access, scenarios
from tests.bench.rabbit import bench_vhost, to_publishes
from tests.bench.report import Row, machine, render
from tests.bench.targets import CountingConsumer, Sidecar
from tests.bench.traffic import Shape, build

TARGETS = {"drain": 30_000, "rss_mb": 100, "scrape_ms": 100, "cpu_percent": 10,
           "amqp_drain_ratio": 3.0}  # AMQP: the sidecar drains >= 3x a bare EventReceiver


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Measure the sidecar's event intake through a private redis-server: max drain rate, "
                    "loss at a sustained rate (default Redis pubsub limits), RSS after many tasks, "
                    "/metrics scrape time and CPU at 1,000 tasks/s. The full run takes about 6 minutes. "
                    "With --broker amqp: drain (against a bare EventReceiver), loss, memory and cpu "
                    "through the local RabbitMQ (127.0.0.1:5672, guest), in a private vhost created "
                    "with rabbitmqctl for the run and deleted after it; scrape stays Redis-only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes, about a minute (a sanity check)")
    p.add_argument("--broker", choices=("redis", "amqp"), default="redis",
                   help="redis: a private redis-server per measurement; amqp: the local RabbitMQ, in a "
                        "private vhost (needs rabbitmqctl; run as root or a rabbitmqctl-capable user)")
    p.add_argument("--only", default="drain,loss,memory,scrape,cpu",
                   help="comma-separated subset of drain,loss,memory,scrape,cpu")
    p.add_argument("--compare-stock", action="store_true",
                   help="also drain the same flood with the sidecar on the stock EventReceiver path "
                        "(--no-fast-path) and print the ratio")
    p.add_argument("--bare", action="store_true",
                   help="also drain the flood with bare counting consumers (EventReceiver and the fast "
                        "reader, no state or metrics): the ceiling of each path. With --broker amqp: "
                        "the AMQP fast reader, py-amqp basic_consume + json and a plain kombu Consumer "
                        "(the bare EventReceiver always runs there: it is the drain target's reference)")
    p.add_argument("--drain-tasks", type=int, default=None,
                   help="tasks in the flood (default 100k, quick 25k; short floods read low). With --broker "
                        "amqp every message is a single event (no batching workers, the worst case for a "
                        "per-message consumer): "
                        "default 36k tasks, about 150k messages; quick 5k")
    p.add_argument("--rate", type=float, default=10_000, help="events/s of the loss test")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of the loss test (default 60, quick 6)")
    p.add_argument("--memory-tasks", type=int, default=None,
                   help="tasks streamed through the sidecar before RSS is read (default 1M, quick 20k)")
    p.add_argument("--scrape-shape", default="200x20x5", help="task names x workers x queues in the state")
    p.add_argument("--scrape-interval", type=float, default=15,
                   help="seconds between scrapes while traffic flows (Prometheus' usual 15 s)")
    p.add_argument("--cpu-tasks-per-s", type=float, default=1_000,
                   help="task rate of the CPU test and of the scrape test's traffic")
    p.add_argument("--cpu-seconds", type=float, default=None,
                   help="length of the CPU test (default 30, quick 5)")
    p.add_argument("--profile", metavar="FILE",
                   help="record the fast-path drain with py-spy (raw collapsed stacks) into FILE and "
                        "print the functions that take the most time")
    p.add_argument("--redis-via", choices=redis_access.WAYS, default="tcp",
                   help="how the sidecar reaches Redis in the drain: its TCP port, its TLS listener with a client "
                        "certificate (a private CA made for the run), a unix socket, or Sentinel naming the master "
                        "(a master, a replica and a sentinel); the flood is published on the plain port")
    p.add_argument("--sidecar-arg", action="append", default=[],
                   help="extra argument for `python -m celery_sidecar run` (repeatable)")
    return p


def _progress(message: str) -> None:
    print(message, flush=True)


@dataclass
class Plan:
    """The sizes of one run, from the command line (``--quick`` picks the small defaults)."""

    args: argparse.Namespace
    only: set[str]
    drain_tasks: int
    duration: float
    memory_tasks: int
    cpu_seconds: float
    scrape: tuple[int, int, int]  # task names, workers, queues
    config: str  # sidecar config file
    broker: str = "redis"
    url: str = ""  # --broker amqp: the run's private vhost
    extra: list[str] = field(default_factory=list)  # extra `celery_sidecar run` arguments
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_args(cls, args: argparse.Namespace, config_dir: str) -> Plan:
        quick = args.quick
        names, workers, queues = (int(x) for x in args.scrape_shape.split("x"))
        amqp = args.broker == "amqp"
        plan = cls(
            args=args,
            only=set(args.only.split(",")),
            drain_tasks=args.drain_tasks or ((5_000 if quick else 36_000) if amqp else (25_000 if quick else 100_000)),
            duration=args.duration or (6.0 if quick else 60.0),
            memory_tasks=args.memory_tasks or (20_000 if quick else 1_000_000),
            cpu_seconds=args.cpu_seconds or (5.0 if quick else 30.0),
            scrape=(names, workers, queues),
            config=_bench_config(config_dir, names),
            broker=args.broker,
            extra=list(args.sidecar_arg),
        )
        return plan

    def sidecar(self, fast_path: bool = True) -> scenarios.TargetFactory:
        return lambda url, access=(): Sidecar(url, fast_path=fast_path, config=self.config,
                                              extra=(*self.extra, *access))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_dir = tempfile.mkdtemp(prefix="sidecar-bench-config-")
    try:
        plan = Plan.from_args(args, config_dir)
        _progress(f"celery-sidecar ingest benchmark{' (quick)' if args.quick else ''}, {args.broker}: "
                  f"{machine(args.broker)}")
        started = time.monotonic()
        rows: list[Row] = []
        with bench_vhost() if plan.broker == "amqp" else contextlib.nullcontext("") as url:
            plan.url = url
            if url:
                _progress(f"RabbitMQ vhost for this run: {url.rsplit('/', 1)[-1]} (deleted at the end)")
            for name, measure in (("drain", _drain), ("loss", _loss), ("memory", _memory), ("scrape", _scrape),
                                  ("cpu", _cpu)):
                if name in plan.only:
                    rows += measure(plan)
    finally:
        shutil.rmtree(config_dir, ignore_errors=True)
    print()
    print(render(rows))
    for note in plan.notes:
        print(f"note: {note}")
    print(f"({time.monotonic() - started:.0f} s; timings on a shared machine are noisy: compare ratios)")
    return 0 if all(r.met is not False for r in rows) else 1


def _drain(plan: Plan) -> list[Row]:
    if plan.broker == "amqp":
        return _drain_amqp(plan)
    args = plan.args
    _progress(f"[drain] building {plan.drain_tasks:,} tasks of traffic ...")
    messages, totals = build(plan.drain_tasks, Shape(seed=11))
    _progress(f"[drain] {totals.events:,} events in {totals.messages:,} messages "
              f"({totals.events / plan.drain_tasks:.2f} events/task); flooding the paused consumer")
    via = args.redis_via
    if via != "tcp":
        plan.notes.append(f"--redis-via {via}: the drains ran against {redis_access.server_version(via)}")
    fast = scenarios.drain(plan.sidecar(True), messages, totals.events, _progress, profile=args.profile, via=via)
    met = fast.rate >= TARGETS["drain"] and fast.counted == totals.events
    over = "" if via == "tcp" else f" via {via}"
    rows = [Row(f"drain rate, sidecar (fast path){over}", _rate(fast), f">= {TARGETS['drain']:,}", met)]
    _check_complete(rows, fast)
    if args.compare_stock:
        stock = scenarios.drain(plan.sidecar(False), messages, totals.events, _progress, via=via)
        rows.append(Row(f"drain rate, {stock.label}", _rate(stock)))
        _check_complete(rows, stock)
        ratio = fast.rate / stock.rate if stock.rate else float("inf")
        rows.append(Row("ratio fast / stock (the figure that counts)", f"{ratio:.2f}x"))
        if fast.cpu_per_event_us:
            rows.append(Row("  same, by CPU per event (less noisy)",
                            f"{stock.cpu_per_event_us / fast.cpu_per_event_us:.2f}x"))
    if args.bare and via != "tcp":
        plan.notes.append("--bare drains over TCP only: the count-only consumers take no TLS or Sentinel options")
    elif args.bare:
        for mode in ("fast", "stock"):
            bare = scenarios.drain(lambda url, mode=mode: CountingConsumer(mode, url), messages,
                                   totals.events, _progress)
            rows.append(Row(f"drain rate, {bare.label} (count only)", _rate(bare)))
    return rows


def _rate(d: scenarios.Drain) -> str:
    cpu = f" ({d.cpu_per_event_us:.1f} µs CPU per event)" if d.consumer_cpu else ""
    return f"{d.rate:,.0f} events/s{cpu}"


def _drain_amqp(plan: Plan) -> list[Row]:
    args = plan.args
    _progress(f"[drain] building {plan.drain_tasks:,} tasks of single-event messages ...")
    messages, totals = build(plan.drain_tasks, Shape(seed=11, batched_workers_ratio=0))
    publishes = to_publishes(messages)
    del messages
    _progress(f"[drain] {totals.events:,} events in {totals.messages:,} messages (one event each, the worst case for a "
              f"per-message consumer); publishing them into each paused consumer's queue")
    plan.notes.append("AMQP drain: every message holds one event (Shape(batched_workers_ratio=0)); the bare "
                      "EventReceiver's queue gets event_queue_ttl 600 s instead of celery's 5 s, or the "
                      "flood would expire in it while it is paused")

    def drain(factory: scenarios.TargetFactory, profile: str | None = None) -> amqp_scenarios.AmqpDrain:
        return amqp_scenarios.drain(plan.url, factory, publishes, totals.events, _progress, profile=profile)

    def rate(d: amqp_scenarios.AmqpDrain) -> str:
        busy = f" (consumer at {100 * d.consumer_cpu / d.seconds:.0f} % of a core)" if d.seconds else ""
        return f"{d.rate:,.0f} events/s{busy}"

    def per_cpu(d: amqp_scenarios.AmqpDrain) -> float:
        return d.counted / d.consumer_cpu if d.consumer_cpu else 0.0

    fast = drain(plan.sidecar(True), args.profile)
    receiver = drain(lambda url: _labelled(CountingConsumer("stock", url), "bare EventReceiver"))
    rows = [Row("drain rate, sidecar (fast path)", rate(fast))]
    _check_complete(rows, fast)
    rows.append(Row("drain rate, bare EventReceiver (celery, count only)", rate(receiver)))
    _check_complete(rows, receiver)
    ratio = fast.rate / receiver.rate if receiver.rate else float("inf")
    target = TARGETS["amqp_drain_ratio"]
    rows.append(Row("ratio sidecar fast path / bare EventReceiver", f"{ratio:.2f}x", f">= {target:g}x",
                    ratio >= target and fast.counted == totals.events))
    if per_cpu(receiver):
        rows.append(Row("  same, events per consumer CPU-second (less noisy)",
                        f"{per_cpu(fast) / per_cpu(receiver):.2f}x"))
    if args.compare_stock:
        stock = drain(plan.sidecar(False))
        rows.append(Row(f"drain rate, {stock.label}", rate(stock)))
        _check_complete(rows, stock)
        rows.append(Row("  ratio fast / stock path", f"{fast.rate / stock.rate if stock.rate else 0:.2f}x"))
    if args.bare:
        for mode, label in (("fast", "bare AMQP fast reader"), ("pyamqp", "bare py-amqp basic_consume + json"),
                            ("kombu", "bare kombu Consumer")):
            bare = drain(lambda url, mode=mode, label=label: _labelled(CountingConsumer(mode, url), label))
            rows.append(Row(f"drain rate, {bare.label} (count only)", rate(bare)))
            _check_complete(rows, bare)
    return rows


def _labelled(target: CountingConsumer, label: str) -> CountingConsumer:
    target.label = label
    return target


def _loss(plan: Plan) -> list[Row]:
    if plan.broker == "amqp":
        return _loss_amqp(plan)
    rate = plan.args.rate
    tasks = int(rate * plan.duration / 4.2) + 1
    _progress(f"[loss] building ~{rate * plan.duration:,.0f} events ({tasks:,} tasks) ...")
    messages, totals = build(tasks, Shape(seed=12, rate=rate))
    _progress(f"[loss] publishing {totals.events:,} events at {rate:,.0f}/s, default Redis pubsub limits")
    result = scenarios.loss(plan.sidecar(True), messages, totals.events, rate, _progress)
    return [
        Row(f"events lost at {result.rate:,.0f}/s for {result.duration:.0f} s",
            f"{result.lost:,} of {result.published:,}", "0", result.lost == 0),
        Row("  Redis output-buffer disconnects / sidecar reconnects",
            f"{result.disconnects} / {result.reconnects}", "0", result.reconnects == 0),
    ]


def _loss_amqp(plan: Plan) -> list[Row]:
    rate = plan.args.rate
    tasks = int(rate * plan.duration / 4.2) + 1
    _progress(f"[loss] building ~{rate * plan.duration:,.0f} events ({tasks:,} tasks) ...")
    messages, totals = build(tasks, Shape(seed=12, rate=rate))
    publishes = to_publishes(messages)
    del messages
    _progress(f"[loss] publishing {totals.events:,} events at {rate:,.0f}/s, the sidecar's default event queue "
              f"(TTL 60 s, 1 GiB, drop-head)")
    result = amqp_scenarios.loss(plan.url, plan.sidecar(True), publishes, totals.events, rate, _progress)
    rows = [
        Row(f"events lost at {result.rate:,.0f}/s for {result.duration:.0f} s",
            f"{result.lost:,} of {result.published:,}", "0", result.lost == 0),
        Row("  sidecar reconnects", f"{result.reconnects}", "0", result.reconnects == 0),
        Row("  most messages waiting in its queue (5 s samples)", f"{result.max_depth:,}"),
    ]
    if result.blocked_seconds:
        rows.append(Row("  RabbitMQ blocked the publisher (alarm)", f"{result.blocked_seconds:.1f} s"))
    return rows


def _memory(plan: Plan) -> list[Row]:
    _progress(f"[memory] streaming {plan.memory_tasks:,} tasks through the sidecar ...")
    if plan.broker == "amqp":
        mem = amqp_scenarios.memory(plan.url, plan.sidecar(True), plan.memory_tasks, _progress)
    else:
        mem = scenarios.memory(plan.sidecar(True), plan.memory_tasks, _progress)
    return [
        Row(f"RSS after {plan.memory_tasks:,} tasks ({mem.events:,} events)", f"{mem.final_mb:.1f} MB",
            f"<= {TARGETS['rss_mb']} MB", mem.final_mb <= TARGETS["rss_mb"]),
        Row("  RSS change over the second half of the stream", f"{mem.growth_mb:+.1f} MB", "flat",
            abs(mem.growth_mb) < 5),
    ]


def _scrape(plan: Plan) -> list[Row]:
    if plan.broker == "amqp":
        _progress("[scrape] skipped: Redis-only (/metrics time does not depend on the broker)")
        return [Row("/metrics scrape time", "skipped: Redis-only, run it with --broker redis")]
    names, workers, queues = plan.scrape
    shape = Shape(seed=13, task_names=names, workers=workers,
                  queues=tuple(f"queue{i}" for i in range(queues)), cover_all_workers=True)
    tasks = names * workers * (1 if plan.args.quick else 3)
    _progress(f"[scrape] populating {names} names x {workers} workers x {queues} queues ({tasks:,} tasks)")
    live = (plan.args.cpu_tasks_per_s, plan.args.scrape_interval, 1 if plan.args.quick else 4)
    scr = scenarios.scrape(plan.sidecar(True), shape, tasks, 3 if plan.args.quick else 20, _progress, live)
    rows = [Row(f"/metrics, {names} names x {workers} workers x {queues} queues, at rest",
                f"{scr.median_ms:.0f} ms median, {scr.max_ms:.0f} ms max "
                f"({scr.series_bytes / 1e6:.1f} MB, {scr.series:,} samples)",
                f"<= {TARGETS['scrape_ms']} ms", scr.median_ms <= TARGETS["scrape_ms"])]
    if scr.live_ms:
        worst = max(scr.live_ms)
        rows.append(Row(f"  same, {scr.live_tasks_per_s:,.0f} tasks/s flowing, every {live[1]:.0f} s",
                        f"{statistics.median(scr.live_ms):.0f} ms median, {worst:.0f} ms max",
                        f"<= {TARGETS['scrape_ms']} ms", statistics.median(scr.live_ms) <= TARGETS["scrape_ms"]))
    rows.append(Row("  sidecar RSS holding that state", f"{scr.rss_mb:.0f} MB", "", None))
    return rows


def _cpu(plan: Plan) -> list[Row]:
    rate = plan.args.cpu_tasks_per_s
    _progress(f"[cpu] {rate:,.0f} tasks/s for {plan.cpu_seconds:.0f} s ...")
    if plan.broker == "amqp":
        c = amqp_scenarios.cpu(plan.url, plan.sidecar(True), rate, plan.cpu_seconds, _progress,
                               plan.args.scrape_interval)
    else:
        c = scenarios.cpu(plan.sidecar(True), rate, plan.cpu_seconds, _progress, plan.args.scrape_interval)
    return [Row(f"CPU at {c.tasks_per_s:,.0f} tasks/s ({c.events_per_s:,.0f} events/s)",
                f"{c.percent:.1f} % of a core", f"< {TARGETS['cpu_percent']} %",
                c.percent < TARGETS["cpu_percent"])]


def _check_complete(rows: list[Row], drain: scenarios.Drain) -> None:
    if drain.counted != drain.events:
        rows.append(Row(f"  {drain.label}: events counted", f"{drain.counted:,} of {drain.events:,}",
                        "all", False))


def _bench_config(directory: str, task_names: int) -> str:
    """A config whose caps admit the scrape test's task names (the default cap is 500)."""
    path = os.path.join(directory, "sidecar.yml")
    with open(path, "w") as f:
        f.write(f"cardinality:\n  max_task_names: {max(500, task_names + 10)}\n")
    return path


if __name__ == "__main__":
    sys.exit(main())

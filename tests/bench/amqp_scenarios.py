"""The measurements on RabbitMQ (``--broker amqp``): drain, loss, memory and cpu.

All run in the run's private vhost (rabbit.bench_vhost), each with a fresh consumer
process; queues a consumer leaves behind are deleted after it, so the next one starts
with an empty vhost. Publishing goes through rabbit.Publisher (raw frames, confirms).

Waiting for consumption: RabbitMQ holds the backlog in the consumer's queue (and pushes
what the socket takes to the consumer), so the waits first watch the queue's depth by
passive ``queue.declare`` (the sidecar's queue is not exclusive), then the consumer's own
count. The bare EventReceiver's queue is exclusive to its connection (RESOURCE_LOCKED to
anyone else): bare consumers are watched by their count file only, which costs them nothing.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import psutil

from tests.bench.profile import Profiler
from tests.bench.publish import paced
from tests.bench.rabbit import Converter, Publish, Publisher, QueueDepth, list_queues, to_publishes
from tests.bench.scenarios import (
    Cpu,
    Drain,
    Loss,
    Memory,
    Progress,
    TargetFactory,
    cpu_or_zero,
    cpu_while_publishing,
)
from tests.bench.targets import Sidecar, Target, start_and_wait
from tests.bench.traffic import Shape, TrafficGenerator
from tests.support.servers import wait_for

EVENT_QUEUE_PREFIX = "celeryev."  # the sidecar's celeryev.sidecar.*, celery's celeryev.<uuid>, ours


@dataclass
class AmqpDrain(Drain):
    broker_cpu: float = 0.0  # and RabbitMQ (beam.smp); both near their elapsed time: one is the limit

    @property
    def busy(self) -> str:
        if not self.seconds:
            return ""
        return (f"consumer {100 * self.consumer_cpu / self.seconds:.0f} % of a core, "
                f"RabbitMQ {100 * self.broker_cpu / self.seconds:.0f} %")


@dataclass
class AmqpLoss(Loss):
    max_depth: int = 0  # the most messages seen waiting in the sidecar's queue
    blocked_seconds: float = 0.0  # how long RabbitMQ blocked the publisher (memory/disk alarm)


def _event_queue(url: str, target: Target, timeout: float = 30.0) -> str:
    """Wait until ``target`` consumes an event queue; return its name (rabbitmqctl, ~0.5 s a call)."""
    found: list[str] = []

    def consuming() -> bool:
        if not target.alive():
            return True
        found[:] = [q.name for q in list_queues(url) if q.name.startswith(EVENT_QUEUE_PREFIX) and q.consumers]
        return bool(found)

    wait_for(consuming, timeout=timeout, interval=0.2, what=f"{target.label} to consume its event queue")
    if not target.alive():
        raise RuntimeError(f"{target.label} died:\n{target.log_tail()}")
    if len(found) != 1:
        raise RuntimeError(f"expected one consumed event queue in the vhost, found {found}")
    return found[0]


def _broker_process() -> psutil.Process | None:
    """The local RabbitMQ node's Erlang VM, for its CPU time (None if we cannot see it)."""
    for process in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if process.info["name"] == "beam.smp" and "rabbit" in " ".join(process.info["cmdline"] or ()):
                return process
    return None


def _drop_leftovers(url: str, depth: QueueDepth) -> None:
    """Delete the event queues a stopped consumer left (the sidecar's outlives its connection)."""
    for queue in list_queues(url):
        if queue.name.startswith(EVENT_QUEUE_PREFIX):
            depth.delete(queue.name)


class _Run:
    """One consumer on the vhost: started, its queue found, stopped and cleaned up after."""

    def __init__(self, url: str, factory: TargetFactory) -> None:
        self.url = url
        self.target = factory(url)
        self.depth = QueueDepth(url)
        self.queue = ""

    def __enter__(self) -> _Run:
        try:
            start_and_wait(self.target)
            self.queue = _event_queue(self.url, self.target)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.target.stop()
        try:
            _drop_leftovers(self.url, self.depth)
        finally:
            self.depth.close()

    def backlog(self) -> int | None:
        """Messages waiting in the consumer's queue; None when only its count can tell."""
        if not isinstance(self.target, Sidecar):
            return None
        return self.depth.messages(self.queue)

    def wait_consumed(self, expected: int, stall: float = 10.0, interval: float = 0.05) -> tuple[int, float]:
        """Wait until the target has counted ``expected`` events or stops making progress.

        Returns (count, monotonic time the count was last seen to grow). The sidecar's queue
        depth is watched first. RabbitMQ pushes a no-ack consumer's backlog out of the queue
        into its channel and socket at once, though, so an empty queue does not mean the
        sidecar is done: its count comes from /metrics, and every scrape takes the sidecar's
        GIL. So it is read twice a second while more than a second of events is left, and
        every ``interval`` only near the end (bare consumers' count files cost them nothing).
        """
        target = self.target
        while target.alive() and (self.backlog() or 0) > 0:
            time.sleep(interval)
        coarse = isinstance(target, Sidecar)
        last, last_change = -1, time.monotonic()
        first, first_at = None, last_change
        while True:
            count = target.count()
            now = time.monotonic()
            if first is None:
                first, first_at = count, now
            if count != last:
                last, last_change = count, now
            if count >= expected or now - last_change > stall or not target.alive():
                return count, last_change
            pause = interval
            if coarse:
                rate = (count - first) / (now - first_at) if now > first_at else 0.0
                if rate <= 0 or expected - count > rate:
                    pause = min(0.5, max(interval, (expected - count) / rate / 2 if rate > 0 else 0.5))
            time.sleep(pause)


def drain(url: str, factory: TargetFactory, publishes: list[Publish], events: int, progress: Progress,
          profile: str | None = None) -> AmqpDrain:
    """Max drain rate: publish the whole flood into the paused consumer's queue, then let go."""
    with _Run(url, factory) as run:
        target = run.target
        time.sleep(1.0)  # let start-up work (wakeup broadcast, probes) settle
        base = target.count()
        target.pause()
        publisher = Publisher(url)
        try:
            publisher.publish(publishes)
            publisher.wait_confirms(timeout=600)
        finally:
            publisher.close()
        queued = run.depth.messages(run.queue)
        where = f"{queued:,} of {len(publishes):,} messages in its queue" if queued is not None else \
            f"{len(publishes):,} messages confirmed"
        progress(f"  {target.label}: {events:,} events parked in RabbitMQ ({where}); resuming the consumer")
        spy = Profiler(target.process.pid, profile, thread_filter="amqp_socket.py") if profile else None
        broker = _broker_process()
        cpu_before = cpu_or_zero(target.ps), cpu_or_zero(broker)
        started = time.monotonic()
        target.resume()
        count, finished = run.wait_consumed(base + events, interval=0.02)
        cpu_after = cpu_or_zero(target.ps), cpu_or_zero(broker)
        if spy is not None:
            progress(spy.stop_and_summarise())
        result = AmqpDrain(target.label, events, finished - started, count - base,
                           consumer_cpu=cpu_after[0] - cpu_before[0], broker_cpu=cpu_after[1] - cpu_before[1])
        progress(f"  {target.label}: {result.counted:,} events in {result.seconds:.2f} s, "
                 f"{result.rate:,.0f} events/s; CPU while draining: {result.busy}")
        return result


def loss(url: str, factory: TargetFactory, publishes: list[Publish], events: int, rate: float,
         progress: Progress) -> AmqpLoss:
    """Sustained rate with the sidecar's default event queue: how many events never arrive."""
    with _Run(url, factory) as run:
        target = run.target
        time.sleep(1.0)
        base = target.count()
        publisher = Publisher(url)
        started = last_report = time.monotonic()
        sent = max_depth = 0
        try:
            for batch in paced(publishes, rate):
                publisher.publish(batch)
                sent += sum(p.events for p in batch)
                now = time.monotonic()
                if now - last_report >= 5:
                    last_report = now
                    depth = run.depth.messages(run.queue) or 0
                    max_depth = max(max_depth, depth)
                    progress(f"  {target.label}: {now - started:5.0f}s published {sent:,} events, "
                             f"{depth:,} messages waiting in its queue")
            publisher.wait_confirms()
            duration = time.monotonic() - started
        finally:
            publisher.close()
        count, _ = run.wait_consumed(base + events, stall=5.0)
        reconnects = target.reconnects() if isinstance(target, Sidecar) else 0
        return AmqpLoss(target.label, events / duration, duration, events, count - base, 0, reconnects,
                        max_depth=max_depth, blocked_seconds=publisher.blocked_seconds)


def memory(url: str, factory: TargetFactory, tasks: int, progress: Progress, chunk: int = 5_000,
           max_lag: int = 40_000) -> Memory:
    """RSS after ``tasks`` tasks, streamed with back-pressure: the sidecar is never more than
    ``max_lag`` events behind (its queue plus what is on the way to it)."""
    with _Run(url, factory) as run:
        target = run.target
        base = target.count()
        publisher = Publisher(url)
        try:
            generator = TrafficGenerator(Shape(seed=1))
            convert = Converter()
            samples: list[tuple[int, float]] = [(0, target.ps.memory_info().rss / 1e6)]
            every = max(chunk, tasks // 20)
            done = 0
            while done < tasks:
                n = min(chunk, tasks - done)
                publisher.publish(convert(m) for m in generator.messages(n))
                done += n
                while target.alive() and generator.totals.events - (target.count() - base) > max_lag:
                    publisher.check()
                    time.sleep(0.1)
                if done % every < chunk or done == tasks:
                    rss = target.ps.memory_info().rss / 1e6
                    samples.append((done, rss))
                    progress(f"  memory: {done:,} tasks, sidecar RSS {rss:.1f} MB")
            publisher.wait_confirms(timeout=120)
        finally:
            publisher.close()
        count, _ = run.wait_consumed(base + generator.totals.events)
        if count - base < generator.totals.events:
            progress(f"  memory: the sidecar counted {count - base:,} of {generator.totals.events:,} events")
        return Memory(tasks, generator.totals.events, samples, target.ps.memory_info().rss / 1e6)


def cpu(url: str, factory: TargetFactory, tasks_per_s: float, seconds: float, progress: Progress,
        scrape_interval: float = 15.0) -> Cpu:
    """Sidecar CPU (user+system, % of one core) while traffic arrives at ``tasks_per_s``,
    /metrics scraped every ``scrape_interval`` seconds meanwhile."""
    generator = TrafficGenerator(Shape(seed=2))
    publishes = to_publishes(generator.messages(int(tasks_per_s * seconds)))
    events_per_s = generator.totals.events / seconds
    with _Run(url, factory) as run:
        time.sleep(1.0)
        publisher = Publisher(url)
        try:
            elapsed, used = cpu_while_publishing(run.target, publisher.publish, paced(publishes, events_per_s),
                                                 scrape_interval)
        finally:
            publisher.close()
        progress(f"  cpu: {generator.totals.events / elapsed:,.0f} events/s for {elapsed:.0f}s")
        return Cpu(tasks_per_s, events_per_s, elapsed, 100 * used / elapsed)

"""The measurements. Each runs a fresh redis-server and a fresh consumer process."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

from tests.bench import redis_access
from tests.bench.profile import Profiler
from tests.bench.publish import Publisher, paced, subscriber_count, subscriber_memory
from tests.bench.targets import Sidecar, Target, start_and_wait
from tests.bench.traffic import Message, Shape, TrafficGenerator
from tests.support.servers import RedisServer, redis_server, wait_for

# Unlimited pubsub buffers: the drain test parks the whole flood in Redis on purpose.
UNLIMITED_PUBSUB = ("--client-output-buffer-limit", "pubsub", "0", "0", "0")

TargetFactory = Callable[..., Target]  # (url) or (url, extra sidecar arguments)
Progress = Callable[[str], None]


@dataclass
class Drain:
    label: str
    events: int
    seconds: float
    counted: int
    consumer_cpu: float = 0.0  # CPU seconds the consumer used while draining

    @property
    def rate(self) -> float:
        return self.counted / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_event_us(self) -> float:
        """Less noisy than the rate on a shared machine: a neighbour's load slows the clock,
        not the work."""
        return 1e6 * self.consumer_cpu / self.counted if self.counted else 0.0


@dataclass
class Loss:
    label: str
    rate: float
    duration: float
    published: int
    counted: int
    disconnects: int  # Redis' own count (Redis >= 7; 0 on older servers)
    reconnects: int  # the sidecar's celery_sidecar_reconnects_total

    @property
    def lost(self) -> int:
        return max(0, self.published - self.counted)


@dataclass
class Memory:
    tasks: int
    events: int
    samples: list[tuple[int, float]]  # (tasks so far, RSS MB) while streaming
    final_mb: float  # once everything is consumed and /metrics was scraped

    @property
    def growth_mb(self) -> float:
        """RSS change over the second half of the stream: ~0 when memory is bounded."""
        half = [mb for tasks, mb in self.samples if tasks >= self.tasks // 2]
        return half[-1] - half[0] if len(half) > 1 else 0.0


@dataclass
class Scrape:
    series: int
    series_bytes: int
    median_ms: float  # state at rest: only the first scrape renders every series
    max_ms: float
    scrapes: int
    live_ms: list[float]  # while traffic flows, one scrape per interval: most series changed
    live_tasks_per_s: float
    rss_mb: float


@dataclass
class Cpu:
    tasks_per_s: float
    events_per_s: float
    seconds: float
    percent: float


def _wait_subscribed(server: RedisServer, target: Target) -> None:
    client = server.client()
    wait_for(lambda: subscriber_count(client) >= 1 or not target.alive(), timeout=30,
             what=f"{target.label} to subscribe")
    if not target.alive():
        raise RuntimeError(f"{target.label} died:\n{target.log_tail()}")


def _wait_consumed(server: RedisServer, target: Target, expected: int, stall: float = 10.0,
                   interval: float = 0.05) -> tuple[int, float]:
    """Wait until ``target`` has counted ``expected`` events or stops making progress.

    Returns (count, monotonic time the count was last seen to grow). Polls Redis for the
    subscriber's output buffer first, so the consumer is not scraped while it is busy.
    """
    client = server.client()
    while subscriber_memory(client) > 0 and target.alive():
        time.sleep(interval)
    last, last_change = -1, time.monotonic()
    while True:
        count = target.count()
        now = time.monotonic()
        if count != last:
            last, last_change = count, now
        if count >= expected or now - last_change > stall or not target.alive():
            return count, last_change
        time.sleep(interval)


def drain(factory: TargetFactory, messages: list[Message], events: int, progress: Progress,
          profile: str | None = None, via: str = "tcp") -> Drain:
    """Max drain rate: park ``messages`` in Redis while the consumer is paused, then let go.

    Pausing (SIGSTOP) keeps the producer's CPU out of the measurement: on a 2-core machine
    a concurrent publisher would otherwise steal the consumer's core. ``via``: how the
    consumer reaches Redis (tests/bench/redis_access.py); the flood is published on the plain port.
    """
    with redis_access.serve(via, *UNLIMITED_PUBSUB) as access:
        server = access.server
        target = factory(access.url, access.sidecar_args) if access.sidecar_args else factory(access.url)
        try:
            start_and_wait(target)
            _wait_subscribed(server, target)
            time.sleep(1.0)  # let start-up work (wakeup broadcast, probes) settle
            base = target.count()
            target.pause()
            publisher = Publisher(server.port)
            publisher.publish(messages)
            publisher.wait_replies(timeout=300)
            publisher.close()
            progress(f"  {target.label}: {events:,} events parked in Redis; resuming the consumer")
            spy = Profiler(target.process.pid, profile) if profile else None
            cpu_before = cpu_or_zero(target.ps)
            started = time.monotonic()
            target.resume()
            count, finished = _wait_consumed(server, target, base + events, interval=0.02)
            consumer_cpu = cpu_or_zero(target.ps) - cpu_before
            if spy is not None:
                progress(spy.stop_and_summarise())
            return Drain(target.label, events, finished - started, count - base, consumer_cpu)
        finally:
            target.stop()


def loss(factory: TargetFactory, messages: list[Message], events: int, rate: float,
         progress: Progress) -> Loss:
    """Sustained rate with Redis' default pubsub limits: how many events never arrive."""
    with redis_server() as server:
        target = factory(server.url)
        try:
            start_and_wait(target)
            _wait_subscribed(server, target)
            time.sleep(1.0)
            base = target.count()
            client = server.client()
            publisher = Publisher(server.port)
            started = last_report = time.monotonic()
            sent = 0
            for batch in paced(messages, rate):
                publisher.publish(batch)
                sent += sum(m.events for m in batch)
                now = time.monotonic()
                if now - last_report >= 5:
                    last_report = now
                    progress(f"  {target.label}: {now - started:5.0f}s published {sent:,} events, "
                             f"Redis buffer {subscriber_memory(client) / 1e6:.1f} MB")
            publisher.wait_replies()
            duration = time.monotonic() - started
            disconnects = _disconnects(server)
            publisher.close()
            count, _ = _wait_consumed(server, target, base + events, stall=5.0)
            reconnects = target.reconnects() if isinstance(target, Sidecar) else 0
            return Loss(target.label, events / duration, duration, events, count - base, disconnects,
                        reconnects)
        finally:
            target.stop()


def _disconnects(server: RedisServer) -> int:
    """Subscribers Redis dropped for exceeding the output buffer limit."""
    stats = server.client().info("stats")
    return int(stats.get("client_output_buffer_limit_disconnections", 0))


def memory(factory: TargetFactory, tasks: int, progress: Progress, chunk: int = 5_000) -> Memory:
    """RSS after ``tasks`` tasks, streamed with back-pressure (Redis buffer kept under 8 MB)."""
    with redis_server(*UNLIMITED_PUBSUB) as server:
        target = factory(server.url)
        try:
            start_and_wait(target)
            _wait_subscribed(server, target)
            base = target.count()
            client = server.client()
            publisher = Publisher(server.port)
            generator = TrafficGenerator(Shape(seed=1))
            samples: list[tuple[int, float]] = [(0, target.ps.memory_info().rss / 1e6)]
            every = max(chunk, tasks // 20)
            done = 0
            while done < tasks:
                n = min(chunk, tasks - done)
                publisher.publish(generator.messages(n))
                done += n
                while subscriber_memory(client) > 8e6 and target.alive():
                    time.sleep(0.02)
                if done % every < chunk or done == tasks:
                    rss = target.ps.memory_info().rss / 1e6
                    samples.append((done, rss))
                    progress(f"  memory: {done:,} tasks, sidecar RSS {rss:.1f} MB")
            publisher.wait_replies(timeout=120)
            publisher.close()
            _wait_consumed(server, target, base + generator.totals.events)
            return Memory(tasks, generator.totals.events, samples, target.ps.memory_info().rss / 1e6)
        finally:
            target.stop()


def scrape(factory: Callable[[str], Sidecar], shape: Shape, tasks: int, scrapes: int, progress: Progress,
           live: tuple[float, float, int] = (1000.0, 15.0, 4)) -> Scrape:
    """/metrics time once the state holds every (name, worker, queue) series of ``shape``.

    First at rest (``scrapes`` back to back), then with ``live`` = (tasks/s, seconds between
    scrapes, scrapes) of traffic flowing in the same shape, as Prometheus would see it.
    """
    with redis_server(*UNLIMITED_PUBSUB) as server:
        target = factory(server.url)
        try:
            start_and_wait(target)
            _wait_subscribed(server, target)
            base = target.count()
            generator = TrafficGenerator(shape)
            publisher = Publisher(server.port)
            publisher.publish(generator.messages(tasks))
            publisher.wait_replies(timeout=120)
            publisher.close()
            _wait_consumed(server, target, base + generator.totals.events)
            progress(f"  scrape: state populated with {tasks:,} tasks; scraping {scrapes} times")
            timings = []
            for _ in range(scrapes):
                seconds, _size = target.timed_scrape()
                timings.append(seconds * 1000)
                time.sleep(0.1)
            body = target.scrape()
            samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
            live_ms = _scrape_live(target, server, generator, live, progress)
            return Scrape(samples, len(body), statistics.median(timings), max(timings), scrapes, live_ms,
                          live[0], target.ps.memory_info().rss / 1e6)
        finally:
            target.stop()


def _scrape_live(target: Sidecar, server: RedisServer, generator: TrafficGenerator,
                 live: tuple[float, float, int], progress: Progress) -> list[float]:
    tasks_per_s, interval, scrapes = live
    if scrapes <= 0:
        return []
    before = generator.totals.events
    messages = list(generator.messages(int(tasks_per_s * interval * (scrapes + 0.5))))
    events_per_s = (generator.totals.events - before) / (interval * (scrapes + 0.5))
    progress(f"  scrape: {tasks_per_s:,.0f} tasks/s flowing, scraping every {interval:.0f} s, {scrapes} times")
    publisher = Publisher(server.port)
    def send() -> None:
        for batch in paced(messages, events_per_s):
            publisher.publish(batch)

    sender = threading.Thread(target=send, name="bench-live-traffic", daemon=True)
    sender.start()
    timings = []
    try:
        for _ in range(scrapes):
            time.sleep(interval)
            seconds, _size = target.timed_scrape()
            timings.append(seconds * 1000)
            progress(f"  scrape under traffic: {timings[-1]:.0f} ms")
    finally:
        sender.join()
        publisher.close()
    return timings


def cpu(factory: TargetFactory, tasks_per_s: float, seconds: float, progress: Progress,
        scrape_interval: float = 15.0) -> Cpu:
    """Sidecar CPU (user+system, % of one core) while traffic arrives at ``tasks_per_s``.

    /metrics is scraped every ``scrape_interval`` seconds meanwhile, as Prometheus would.
    """
    generator = TrafficGenerator(Shape(seed=2))
    messages = list(generator.messages(int(tasks_per_s * seconds)))
    events_per_s = generator.totals.events / seconds
    with redis_server() as server:
        target = factory(server.url)
        try:
            start_and_wait(target)
            _wait_subscribed(server, target)
            time.sleep(1.0)
            publisher = Publisher(server.port)
            try:
                elapsed, used = cpu_while_publishing(target, publisher.publish, paced(messages, events_per_s),
                                                     scrape_interval)
            finally:
                publisher.close()
            progress(f"  cpu: {generator.totals.events / elapsed:,.0f} events/s for {elapsed:.0f}s")
            return Cpu(tasks_per_s, events_per_s, elapsed, 100 * used / elapsed)
        finally:
            target.stop()


def cpu_while_publishing(target: Target, publish: Callable[[list], None], batches: Iterable[list],
                         scrape_interval: float) -> tuple[float, float]:
    """(seconds elapsed, CPU seconds the target used) while ``batches`` are published, with
    /metrics scraped every ``scrape_interval`` seconds, as Prometheus would."""
    assert isinstance(target, Sidecar)
    process = target.ps
    done = threading.Event()

    def scrape_until_done() -> None:
        while not done.wait(scrape_interval):
            target.scrape()

    scraper = threading.Thread(target=scrape_until_done, name="bench-scraper", daemon=True)
    before = _cpu_seconds(process)
    started = time.monotonic()
    scraper.start()
    try:
        for batch in batches:
            publish(batch)
        return time.monotonic() - started, _cpu_seconds(process) - before
    finally:
        done.set()
        scraper.join()


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def cpu_or_zero(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    try:
        return _cpu_seconds(process)
    except psutil.Error:
        return 0.0

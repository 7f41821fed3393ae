"""Scrape-time gauges: workers, queues, thresholds and the sidecar's own health.

One collector takes one state snapshot per scrape (monitor/view.py) and builds every
family from it outside any lock, so all of them describe the same moment.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from celery_sidecar.exporters.queue_pressure import pressure_families
from celery_sidecar.monitor.config.settings import LiveConfig
from celery_sidecar.monitor.signals import thresholds
from celery_sidecar.monitor.view import Snapshot, StateView


class StateCollector:
    def __init__(self, view: StateView, config: LiveConfig) -> None:
        self._view = view
        self._config = config

    def collect(self) -> Iterator[Metric]:
        snap = self._view.snapshot()
        yield from worker_families(snap)
        yield from queue_families(snap)
        yield from in_flight_families(snap)
        yield from beat_families(snap)
        yield threshold_family(snap, self._config)
        yield from sidecar_families(snap)
        yield from stream_families(snap)
        yield from pressure_families(snap)


def worker_families(snap: Snapshot) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "celery_worker_up",
        "1 while the worker's heartbeats arrive; 0 once none came for 2 x its heartbeat interval + "
        "state.heartbeat_grace_seconds, or after it shut down. A live worker's 1 is absent while the sidecar "
        "is cut off from the broker, and after it reconnects until the worker is heard again.",
        labels=["hostname"],
    )
    active = GaugeMetricFamily(
        "celery_worker_tasks_active", "Tasks the worker is running, as its last heartbeat reported.",
        labels=["hostname"],
    )
    util = GaugeMetricFamily(
        "celery_worker_pool_utilization",
        "Running tasks / the worker's pool size (0 to 1); the pool size comes from the worker plugin or "
        "inspect stats.",
        labels=["hostname"],
    )
    cpu = GaugeMetricFamily(
        "celery_worker_cpu_percent", "Worker CPU, % of its host, pool children included (worker plugin).",
        labels=["hostname"],
    )
    mem = GaugeMetricFamily(
        "celery_worker_memory_percent", "Worker memory, % of its host, pool children included (worker plugin).",
        labels=["hostname"],
    )
    rss = GaugeMetricFamily(
        "celery_worker_rss_bytes", "Worker resident memory in bytes, pool children included (worker plugin).",
        labels=["hostname"],
    )
    events_on = GaugeMetricFamily(
        "celery_sidecar_worker_task_events_enabled",
        "0 when a worker runs tasks but sends no task events (start it with -E, or run the sidecar with "
        "--enable-events).",
        labels=["hostname"],
    )
    connected = snap.intake.connected
    for w in snap.workers:
        host = [w.hostname]
        # "Up" only for a worker the sidecar hears now: cut off from the broker (or back, before
        # the worker's next heartbeat), its view would hold up a worker that died meanwhile, and
        # the max across HA sidecars would take that. A 0 holds nothing up: always said.
        if not w.alive:
            up.add_metric(host, 0.0)
        elif connected and w.heard:
            up.add_metric(host, 1.0)
        active.add_metric(host, w.active)
        events_on.add_metric(host, 1.0 if w.task_events_enabled else 0.0)
        if w.pool_max:
            util.add_metric(host, min(1.0, w.active / w.pool_max) if w.alive else 0.0)
        for family, value in ((cpu, w.cpu_percent), (mem, w.memory_percent), (rss, w.rss_bytes)):
            if value is not None and w.alive:
                family.add_metric(host, value)
    yield from (up, active, util, cpu, mem, rss, events_on)
    yield from queue_worker_families(snap)
    yield retry_family(snap)


def queue_worker_families(snap: Snapshot) -> Iterator[Metric]:
    """Per queue, the live workers that consume it and their pool processes: a worker that
    consumes several queues counts once in each."""
    per_queue_workers: dict[str, int] = {}
    per_queue_procs: dict[str, int] = {}
    for w in snap.workers:
        if w.alive:
            for queue in w.queues:
                per_queue_workers[queue] = per_queue_workers.get(queue, 0) + 1
                per_queue_procs[queue] = per_queue_procs.get(queue, 0) + (w.pool_max or 0)
    wcount = GaugeMetricFamily(
        "celery_active_worker_count", "Live workers consuming the queue (from worker inspection).",
        labels=["queue_name"],
    )
    pcount = GaugeMetricFamily(
        "celery_active_process_count", "Pool processes of the live workers consuming the queue.", labels=["queue_name"]
    )
    for queue, n in sorted(per_queue_workers.items()):
        wcount.add_metric([queue], n)
        pcount.add_metric([queue], per_queue_procs[queue])
    yield wcount
    yield pcount


def retry_family(snap: Snapshot) -> Metric:
    retry = GaugeMetricFamily(
        "celery_task_retry_ratio",
        "Retries / (retries + finished) of this task name over the retry window (state.retry_window_seconds).",
        labels=["name"],
    )
    for name in snap.retries:
        ratio = snap.retry_ratio(name)
        if ratio is not None:
            retry.add_metric([name], ratio)
    return retry


def queue_families(snap: Snapshot) -> Iterator[Metric]:
    length = GaugeMetricFamily(
        "celery_queue_length",
        "Messages waiting in the queue: on Redis the list's length with its priority sub-lists, on RabbitMQ "
        "the message count of a passive declare.",
        labels=["queue_name"],
    )
    consumers = GaugeMetricFamily(
        "celery_active_consumer_count", "Consumers of the queue, as the broker reports them (RabbitMQ).",
        labels=["queue_name"],
    )
    for queue, reading in sorted(snap.queues.items()):
        length.add_metric([queue], reading.length)
        if reading.consumers is not None:
            consumers.add_metric([queue], reading.consumers)
    yield length
    yield consumers
    if snap.queue_probe_at is not None:
        yield GaugeMetricFamily(
            "celery_queue_probe_age_seconds", "Seconds since the queue probe last read the queue lengths.",
            value=max(0.0, snap.at - snap.queue_probe_at),
        )
    errors = CounterMetricFamily(
        "celery_sidecar_probe_errors",
        "Failed broker probes, by probe (queue_length, inspect); the scrape still succeeds.",
        labels=["probe"],
    )
    for probe in ("queue_length", "inspect"):
        errors.add_metric([probe], snap.probe_errors.get(probe, 0))
    yield errors


def in_flight_families(snap: Snapshot) -> Iterator[Metric]:
    """Where the tasks are: waiting (queue age), running (and stuck), lost, redelivered."""
    age = GaugeMetricFamily(
        "celery_queue_oldest_task_age_seconds",
        "How long the oldest task sent to the queue and not started has waited (0: none waits); "
        "task_class is that task's, for its latency threshold.",
        labels=["queue_name", "task_class"],
    )
    lower = GaugeMetricFamily(
        "celery_queue_oldest_task_age_lower_bound",
        "1 while the age comes from when the sidecar first saw the task at the list's end (Redis): "
        "it was sent before the sidecar started, so it is older.",
        labels=["queue_name"],
    )
    for queue, queue_age in snap.queue_ages.items():
        age.add_metric([queue, queue_age.task_class], queue_age.seconds)
        lower.add_metric([queue], 1.0 if queue_age.lower_bound else 0.0)
    yield age
    yield lower
    running = GaugeMetricFamily("celery_task_running", "Tasks of this name running now.", labels=["name"])
    oldest = GaugeMetricFamily(
        "celery_task_oldest_running_seconds",
        "Runtime so far, in seconds, of the longest-running task of this name.",
        labels=["name"],
    )
    stuck = GaugeMetricFamily(
        "celery_task_stuck",
        "Tasks of this name running longer than their runtime limit (thresholds.task_runtime_seconds).",
        labels=["name"],
    )
    for name, view in snap.running.items():
        running.add_metric([name], view.running)
        oldest.add_metric([name], view.oldest_seconds)
        stuck.add_metric([name], view.stuck)
    yield from (running, oldest, stuck)
    for metric, doc, counts in (
        ("celery_task_lost",
         "Tasks a worker had started and not finished when it went down (heartbeats stopped, or it shut down "
         "mid-task).", snap.lost),
        ("celery_task_redelivered",
         "Tasks received a second time without a retry: redelivered by the broker (acks_late after a lost "
         "worker, or the Redis visibility timeout).", snap.redelivered),
        ("celery_task_end_unseen",
         "Running tasks their worker no longer ran when asked, whose end event never came: closed without "
         "a stuck page, and counted as missed events.", snap.end_unseen),
    ):
        family = CounterMetricFamily(metric, doc, labels=["name", "queue_name"])
        for (name, queue), n in sorted(counts.items()):
            family.add_metric([name, queue], n)
        yield family
    if snap.unacked is not None:
        yield GaugeMetricFamily("celery_redis_unacked_tasks",
                                "Redis: messages workers have taken and not acknowledged (kombu's unacked hash).",
                                value=snap.unacked.count)
        yield GaugeMetricFamily(
            "celery_redis_unacked_oldest_age_seconds",
            "Redis: age in seconds of the oldest unacknowledged message (redelivered after the visibility timeout).",
            value=0.0 if snap.unacked.oldest_at is None else max(0.0, snap.at - snap.unacked.oldest_at),
        )


def beat_families(snap: Snapshot) -> Iterator[Metric]:
    """Periodic tasks: per Beat schedule entry, its last run, next due time, misses and lateness,
    and the period and grace a Prometheus rule needs to tell a missed run on its own."""
    labels = ["entry", "task"]
    last = GaugeMetricFamily("celery_beat_entry_last_run_timestamp_seconds",
                             "When the entry's last run was seen (Unix time).", labels=labels)
    due = GaugeMetricFamily("celery_beat_entry_next_due_timestamp_seconds",
                            "When the entry's next run is due (Unix time).", labels=labels)
    missed = CounterMetricFamily("celery_beat_entry_missed",
                                 "Due times of the entry that passed without a run by due + grace.", labels=labels)
    late = GaugeMetricFamily("celery_beat_entry_late_seconds",
                             "Seconds after its due time that the entry's last run came.", labels=labels)
    period = GaugeMetricFamily("celery_beat_entry_period_seconds",
                               "Seconds from the last run to the next due time (an interval's period, a "
                               "crontab's current gap).", labels=labels)
    grace = GaugeMetricFamily("celery_beat_entry_grace_seconds",
                              "Seconds a run may come after its due time and still be on time.", labels=labels)
    for entry in snap.beat:
        key = [entry.entry, entry.task]
        if entry.last_run is not None:
            last.add_metric(key, entry.last_run)
        due.add_metric(key, entry.next_due)
        missed.add_metric(key, entry.missed_total)
        late.add_metric(key, entry.late)
        period.add_metric(key, entry.period)
        grace.add_metric(key, entry.grace)
    yield from (last, due, missed, late, period, grace)
    yield GaugeMetricFamily("celery_beat_down",
                            "1 while Beat looks down: two entries (or a lone entry's two dues) missed since any run.",
                            value=0.0 if snap.beat_down_since is None else 1.0)


def threshold_family(snap: Snapshot, config: LiveConfig) -> Metric:
    fam = GaugeMetricFamily(
        "celery_threshold",
        "Configured thresholds, by signal and level (queue_name for per-queue ones); the Prometheus rules and "
        "the dashboards compare against these, so they follow a config edit.",
        labels=["signal", "level", "queue_name"],
    )
    for row in thresholds(config.current, snap.known_queues):
        fam.add_metric([row.signal, row.level, row.queue_name], row.value)
    return fam


def sidecar_families(snap: Snapshot) -> Iterator[Metric]:
    """The sidecar's own health: intake, broker connection, config reloads."""
    intake = snap.intake
    events = CounterMetricFamily("celery_sidecar_events", "Events folded into state, by event type.", labels=["type"])
    for etype, n in sorted(intake.events_by_type.items()):
        events.add_metric([etype], n)
    yield events
    skipped = CounterMetricFamily(
        "celery_sidecar_events_skipped",
        "Messages and events refused at the boundary, by reason; a refused one changes nothing else.",
        labels=["reason"],
    )
    for reason, n in sorted(intake.skipped_by_reason.items()):
        skipped.add_metric([reason], n)
    yield skipped
    src = GaugeMetricFamily(
        "celery_sidecar_latency_source",
        "1 for the timestamp latency is measured from: sent (task-sent events) or received.",
        labels=["source"],
    )
    for name in ("sent", "received"):
        src.add_metric([name], 1.0 if name == intake.latency_source else 0.0)
    yield src
    yield from connection_families(snap)


def connection_families(snap: Snapshot) -> Iterator[Metric]:
    """The event consumer's connection, the config file, and how far behind the stream is."""
    intake = snap.intake
    yield GaugeMetricFamily(
        "celery_sidecar_broker_connected", "1 while the event consumer is connected to the broker.",
        value=1.0 if intake.connected else 0.0,
    )
    yield CounterMetricFamily(
        "celery_sidecar_reconnects", "Reconnects of the event consumer to the broker.", value=intake.reconnects
    )
    reloads = CounterMetricFamily(
        "celery_sidecar_config_reloads", "Config file reloads, by result (ok, error).", labels=["result"]
    )
    for result in ("ok", "error"):
        reloads.add_metric([result], snap.config.reloads.get(result, 0))
    yield reloads
    yield GaugeMetricFamily(
        "celery_sidecar_config_valid", "0 while the config file on disk is refused (the previous config stays live).",
        value=0.0 if snap.config.error else 1.0,
    )
    yield GaugeMetricFamily(
        "celery_sidecar_consumer_lag_seconds",
        "Seconds from the last event's timestamp to its receipt here (worker clock skew included).",
        value=intake.last_event_lag,
    )
    if intake.last_event_at is not None:
        yield GaugeMetricFamily(
            "celery_sidecar_last_event_age_seconds", "Seconds since the last event arrived.",
            value=max(0.0, snap.at - intake.last_event_at),
        )
    yield GaugeMetricFamily(
        "celery_sidecar_tasks_in_memory", "In-flight tasks held in memory (bounded by state.max_tasks).",
        value=intake.tasks_in_memory,
    )
    if intake.event_queue_messages is not None:
        yield GaugeMetricFamily(
            "celery_sidecar_event_queue_messages",
            "RabbitMQ: events waiting in the sidecar's own event queue, its backlog.",
            value=intake.event_queue_messages,
        )
    if snap.last_tick_at is not None:
        yield GaugeMetricFamily(
            "celery_sidecar_last_tick_timestamp_seconds",
            "When worker liveness and time-based alerts were last evaluated, about every second (Unix time).",
            value=snap.last_tick_at,
        )


def stream_families(snap: Snapshot) -> Iterator[Metric]:
    """How complete the event stream is, held against the workers' own counts: a heartbeat's
    ``processed`` says how many task-started events should have come (docs/metrics.md)."""
    stream = snap.stream
    expected = CounterMetricFamily(
        "celery_sidecar_task_events_expected",
        "Task-started events the worker's heartbeats account for (growth of its processed count) since "
        "the sidecar started watching it.", labels=["hostname"],
    )
    missed = CounterMetricFamily(
        "celery_sidecar_task_events_missed",
        "Estimated task events from this worker that never reached the sidecar: task-started events its "
        "processed count accounts for and the stream lacked, plus end events never seen.", labels=["hostname"],
    )
    for host, (n_expected, n_missed) in sorted(stream.by_worker.items()):
        expected.add_metric([host], n_expected)
        missed.add_metric([host], n_missed)
    yield expected
    yield missed
    yield CounterMetricFamily(
        "celery_sidecar_task_events_expected_fleet",
        "celery_sidecar_task_events_expected summed over every worker, forgotten ones included.",
        value=stream.expected,
    )
    yield CounterMetricFamily(
        "celery_sidecar_task_events_missed_fleet",
        "celery_sidecar_task_events_missed summed over every worker, forgotten ones included.",
        value=stream.missed,
    )
    share = stream.window_share
    if share is not None:
        yield GaugeMetricFamily(
            "celery_sidecar_task_events_missed_ratio",
            "Task events missed / expected over state.stream_window_seconds: what the event stream "
            "incomplete alert judges.", value=share,
        )

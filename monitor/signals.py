"""Every threshold signal, defined once.

A signal is something the sidecar compares against an operator's threshold: task
latency, queue length, worker CPU and memory, retry rate. For each one this table says
how its value is read (from a state snapshot), which limit from sidecar.yml it is judged
against, what it is called and in which unit, and how its alert rule behaves by default.

Everything else is derived from it:

- the alert engine (celery_sidecar.alerts.engine) evaluates ``SIGNALS`` once a second;
- the ``celery_threshold{signal, level, queue_name}`` gauges are ``thresholds(config)``;
- the `alerts.rules` section of the config schema takes its rule names and defaults from
  ``RULE_DEFAULTS``;
- the README's threshold table is ``markdown_table()`` (scripts/generate rewrites it);
- the Grafana dashboards' threshold lines: grafana/dashboards.py builds their queries from
  ``thresholds()`` rows, at build time;
- the dashboard an alert links to (``subject``, through monitor/config/dashboard_links.py);
- and tests/test_signals.py checks that the shipped Prometheus rules judge each signal
  against the same ``celery_threshold`` series.

This module imports nothing at run time from the rest of the package: the config schema
imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from celery_sidecar.monitor.config.settings import Config
    from celery_sidecar.monitor.view import Snapshot

Severity = Literal["info", "warning", "critical"]
Unit = Literal["s", "%", "ratio", "messages"]
# What a Reading's subject names; monitor/config/dashboard_links.py maps it to a dashboard variable.
Subject = Literal["task_class", "queue", "worker", "task", "stream", "worker_queue"]


@dataclass(frozen=True)
class RuleDefaults:
    severity: Severity
    for_seconds: float = 0.0
    resolve_after_seconds: float = 0.0


@dataclass(frozen=True)
class Threshold:
    """One ``celery_threshold`` series."""

    signal: str
    level: str
    value: float
    queue_name: str = ""


@dataclass(frozen=True)
class Reading:
    """A signal's current value for one subject (a queue, a worker, a task name...)."""

    subject: str
    value: float
    limit: float
    text: str  # "queue celery holds 150 messages"


@dataclass(frozen=True)
class Signal:
    rule: str  # alerts.rules.<rule> in sidecar.yml
    title: str  # "Queue length above normal threshold"
    unit: Unit
    defaults: RuleDefaults
    prometheus_alert: str  # the shipped Prometheus alert judging the same signal
    compares: str  # for the docs: what is compared with what
    subject: Subject  # what each Reading.subject is: alert links open the dashboard on it
    thresholds: Callable[[Config, Iterable[str]], list[Threshold]]
    read: Callable[[Snapshot, Config], Iterator[Reading]]
    # A gauge that carries the sidecar's own verdict, when the signal needs state Prometheus
    # does not have (what each worker received when): its Prometheus alert judges that gauge
    # and quotes the threshold, instead of comparing a value with it again.
    decided_by: str | None = None


# -- the readers ------------------------------------------------------------------------


def _latency_thresholds(cfg: Config, queues: Iterable[str]) -> list[Threshold]:
    t = cfg.thresholds.latency_seconds
    return [Threshold("latency_seconds", "normal", t.normal), Threshold("latency_seconds", "heavy", t.heavy)]


def _latency(snap: Snapshot, cfg: Config) -> Iterator[Reading]:
    t = cfg.thresholds.latency_seconds
    limits = {"normal": t.normal, "heavy": t.heavy}
    for task_class, limit in limits.items():
        p95 = snap.latency_p95.get(task_class)
        if p95 is not None:
            yield Reading(task_class, p95, limit, f"p95 queue wait of {task_class} tasks is {p95:.1f} s")
    # Tasks that have not started count too: a queue nobody consumes produces no queue wait
    # samples at all, and its oldest task's age is the latency that matters then.
    for queue, age in snap.queue_ages.items():
        if age.seconds > 0:
            yield Reading(f"queue {queue}", age.seconds, limits[age.task_class],
                          f"the oldest task in queue {queue} ({age.task_class}) has waited {age.seconds:.1f} s "
                          f"without starting{' (at least)' if age.lower_bound else ''}")


def _queue_thresholds(level: str) -> Callable[[Config, Iterable[str]], list[Threshold]]:
    def thresholds(cfg: Config, queues: Iterable[str]) -> list[Threshold]:
        names = sorted(set(cfg.queues) | set(cfg.queue_overrides) | set(queues))
        return [Threshold("queue_length", level, float(getattr(cfg.queue_thresholds(q), level)), q) for q in names]

    return thresholds


def _queue_length(level: str) -> Callable[[Snapshot, Config], Iterator[Reading]]:
    def read(snap: Snapshot, cfg: Config) -> Iterator[Reading]:
        for queue, reading in snap.queues.items():
            limit = getattr(cfg.queue_thresholds(queue), level)
            yield Reading(queue, reading.length, limit, f"queue {queue} holds {reading.length} messages")

    return read


def _worker_thresholds(signal: str, attr: str) -> Callable[[Config, Iterable[str]], list[Threshold]]:
    def thresholds(cfg: Config, queues: Iterable[str]) -> list[Threshold]:
        return [Threshold(signal, "limit", getattr(cfg.thresholds, attr))]

    return thresholds


def _worker_usage(limit_attr: str, worker_attr: str, what: str) -> Callable[[Snapshot, Config], Iterator[Reading]]:
    def read(snap: Snapshot, cfg: Config) -> Iterator[Reading]:
        limit = getattr(cfg.thresholds, limit_attr)
        for worker in snap.workers:
            value = getattr(worker, worker_attr)
            if worker.alive and value is not None:
                yield Reading(worker.hostname, value, limit, f"{worker.hostname} uses {value:.0f}% {what}")

    return read


def _retry_thresholds(cfg: Config, queues: Iterable[str]) -> list[Threshold]:
    t = cfg.thresholds
    return [Threshold("retry_ratio", "limit", t.retry_rate_percent / 100.0),
            Threshold("retry_min_outcomes", "limit", float(t.retry_rate_min_outcomes))]


def _retry_rate(snap: Snapshot, cfg: Config) -> Iterator[Reading]:
    t = cfg.thresholds
    limit = t.retry_rate_percent / 100.0
    for name, (hits, total) in snap.retries.items():
        # One retry of a rare task is not a retry storm: judge only with enough outcomes.
        if total >= t.retry_rate_min_outcomes:
            ratio = hits / total
            yield Reading(name, ratio, limit, f"{name} retried {hits} of {total} times ({ratio:.0%})")


def _missed_thresholds(cfg: Config, queues: Iterable[str]) -> list[Threshold]:
    t = cfg.thresholds
    return [Threshold("events_missed_ratio", "limit", t.events_missed_percent / 100.0),
            Threshold("events_missed_min", "limit", float(t.events_missed_min))]


def _events_missed(snap: Snapshot, cfg: Config) -> Iterator[Reading]:
    t, stream = cfg.thresholds, snap.stream
    share = stream.window_share
    # A handful of misses in a quiet window is no incomplete stream: judge only past the floor.
    if share is not None and stream.window_missed >= t.events_missed_min:
        yield Reading(
            snap.intake.broker or "the event stream", share, t.events_missed_percent / 100.0,
            f"{stream.window_missed} of {stream.window_expected} task events the workers' own counts account "
            f"for never arrived in the last {stream.window_seconds:.0f} s ({share:.1%}); likely cause: "
            f"{stream.likely_cause(snap.intake)}. Counts, stuck tasks and latencies over that time are "
            "incomplete.",
        )


def _consuming_thresholds(cfg: Config, queues: Iterable[str]) -> list[Threshold]:
    return [Threshold("not_consuming_seconds", "limit", cfg.thresholds.not_consuming_seconds)]


def _not_consuming(snap: Snapshot, cfg: Config) -> Iterator[Reading]:
    limit = cfg.thresholds.not_consuming_seconds
    for row in snap.consuming:
        if not row.consuming:
            yield Reading(
                f"{row.hostname} on {row.queue}", row.idle_seconds, limit,
                f"{row.hostname} heartbeats, has free pool slots and lists queue {row.queue}, yet received "
                f"nothing from it for {row.idle_seconds:.0f} s while its oldest task waited "
                f"{row.waited_seconds:.0f} s: its consumer is likely dead (a broker reconnect it did not "
                "recover from). Restart the worker, or cancel_consumer and add_consumer for the queue",
            )


# -- the table ----------------------------------------------------------------------------

SIGNALS: tuple[Signal, ...] = (
    Signal(
        rule="latency", title="Task latency above threshold", unit="s",
        defaults=RuleDefaults("warning", 30, 60), prometheus_alert="CeleryTaskLatencyHigh",
        compares="p95 queue wait (sent, or eta, to started) of normal / heavy tasks, and the age of the "
                 "oldest task waiting in each queue, against its class's threshold",
        subject="task_class",
        thresholds=_latency_thresholds, read=_latency,
    ),
    Signal(
        rule="queue_length_normal", title="Queue length above normal threshold", unit="messages",
        defaults=RuleDefaults("warning", 30, 60), prometheus_alert="CeleryQueueLengthHigh",
        compares="messages waiting in a queue (normal level), per queue",
        subject="queue",
        thresholds=_queue_thresholds("normal"), read=_queue_length("normal"),
    ),
    Signal(
        rule="queue_length_peak", title="Queue length above peak threshold", unit="messages",
        defaults=RuleDefaults("critical", 30, 60), prometheus_alert="CeleryQueueLengthCritical",
        compares="messages waiting in a queue (peak level), per queue",
        subject="queue",
        thresholds=_queue_thresholds("peak"), read=_queue_length("peak"),
    ),
    Signal(
        rule="worker_cpu", title="Worker CPU above threshold", unit="%",
        defaults=RuleDefaults("warning", 60, 60), prometheus_alert="CeleryWorkerCpuHigh",
        compares="a worker's CPU, % of its host (worker plugin)",
        subject="worker",
        thresholds=_worker_thresholds("worker_cpu_percent", "worker_cpu_percent"),
        read=_worker_usage("worker_cpu_percent", "cpu_percent", "CPU"),
    ),
    Signal(
        rule="worker_memory", title="Worker memory above threshold", unit="%",
        defaults=RuleDefaults("warning", 60, 60), prometheus_alert="CeleryWorkerMemoryHigh",
        compares="a worker's memory, % of its host (worker plugin)",
        subject="worker",
        thresholds=_worker_thresholds("worker_memory_percent", "worker_memory_percent"),
        read=_worker_usage("worker_memory_percent", "memory_percent", "memory"),
    ),
    Signal(
        rule="retry_rate", title="Retry rate above threshold", unit="ratio",
        defaults=RuleDefaults("warning", 60, 120), prometheus_alert="CeleryTaskRetryRateHigh",
        compares="retries / (retries + finished) per task name over the retry window, once a task has "
                 "retry_rate_min_outcomes outcomes in it",
        subject="task",
        thresholds=_retry_thresholds, read=_retry_rate,
    ),
    Signal(
        rule="events_missed", title="Event stream incomplete", unit="ratio",
        defaults=RuleDefaults("warning", 0, 300), prometheus_alert="CeleryEventStreamIncomplete",
        compares="task events missed / expected by the workers' own processed counts over "
                 "state.stream_window_seconds, once events_missed_min were missed in it",
        subject="stream",
        thresholds=_missed_thresholds, read=_events_missed,
    ),
    Signal(
        rule="worker_not_consuming", title="Worker not consuming", unit="s",
        defaults=RuleDefaults("critical", 0, 0), prometheus_alert="CeleryWorkerNotConsuming",
        compares="seconds a live worker with free pool slots received nothing from a queue it lists, while "
                 "the queue's tasks waited as long",
        subject="worker_queue",
        thresholds=_consuming_thresholds, read=_not_consuming, decided_by="celery_worker_consuming",
    ),
)

# Alert rules that are not threshold signals: they fire on events.
EVENT_RULES: dict[str, RuleDefaults] = {
    "task_failed": RuleDefaults("warning"),
    "worker_offline": RuleDefaults("critical"),
    "worker_shutdown": RuleDefaults("info", for_seconds=60),  # posted only if it stays away this long
    "task_stuck": RuleDefaults("warning"),  # running past thresholds.task_runtime_seconds
    "tasks_lost": RuleDefaults("warning"),  # started on a worker that went down, not finished
    "beat_missed": RuleDefaults("warning"),  # a periodic task's run did not come by due + grace
    "beat_down": RuleDefaults("critical"),  # two entries missed since any run: Beat looks down
}

RULE_DEFAULTS: dict[str, RuleDefaults] = {**EVENT_RULES, **{s.rule: s.defaults for s in SIGNALS}}
BY_RULE: dict[str, Signal] = {s.rule: s for s in SIGNALS}


def thresholds(cfg: Config, queues: Iterable[str] = ()) -> list[Threshold]:
    """Every ``celery_threshold`` series for this config; queue thresholds for every known queue."""
    queues = list(queues)
    return [row for signal in SIGNALS for row in signal.thresholds(cfg, queues)]


def format_value(value: float, unit: Unit) -> str:
    if unit == "ratio":
        return f"{value:.1%}"
    if unit == "%":
        return f"{value:.0f}%"
    if unit == "s":
        return f"{value:.1f} s"
    return f"{value:g}"


def markdown_table(cfg: Config) -> str:
    """The README's threshold table, from this table and the config's defaults."""
    lines = ["| alert rule | compares | default | exported as | Prometheus alert |", "|---|---|---|---|---|"]
    for signal in SIGNALS:
        rows = signal.thresholds(cfg, ["celery"])
        counts = ("outcomes", "_min")  # floors are counts, whatever the signal's unit
        default = " / ".join(format_value(r.value, "messages" if r.signal.endswith(counts) else signal.unit)
                             for r in rows)
        exported = "<br>".join(
            f'`celery_threshold{{signal="{r.signal}",level="{r.level}"'
            + (',queue_name=…' if r.queue_name else "") + "}`" for r in rows)
        lines.append(f"| `{signal.rule}` | {signal.compares} | {default} | {exported} | "
                     f"`{signal.prometheus_alert}` |")
    return "\n".join(lines)

"""What the cardinality controls may name, and what they make of a family.

sidecar.yml's ``cardinality`` section (include_tasks, exclude_tasks, drop_labels,
disable_families, buckets) and ``--static-label`` shape /metrics only: the fold, the alert
engine and /health see every task whatever they say. ``check_controls`` is the validation the
schema cannot do (which families exist, which of their labels may be dropped); the wiring runs
it on the config at start and on every reload, so a misspelt family is refused like a misspelt
key. ``Controls`` is what the exporters read, derived once per config object.

The names are the ones docs/metrics.md lists (counters with ``_total``); a counter's name
without ``_total`` is taken too. tests/test_cardinality_controls.py holds ``FAMILIES`` and
``LABELS_IN_USE`` to what /metrics serves.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from celery_sidecar.monitor.config.settings import Config
from celery_sidecar.monitor.sinks import TASK_KINDS

OTHER = "other"

COUNTERS = {kind: f"celery_task_{kind}_total" for kind in TASK_KINDS}
RUNTIME = "celery_task_runtime"
QUEUE_WAIT = "celery_task_queue_wait_time"
LATENCY = "celery_task_latency_seconds"

# The task families whose series are summed over a dropped label. Not the latency histogram:
# its queue_name and task_class are what the latency rule judges; nor the scrape-time
# families, whose hostname or queue_name is what they are about.
DROPPABLE: dict[str, frozenset[str]] = {
    **{name: frozenset({"hostname", "queue_name"}) for name in COUNTERS.values()},
    COUNTERS["failed"]: frozenset({"hostname", "queue_name", "exception"}),
    RUNTIME: frozenset({"hostname", "queue_name"}),
    QUEUE_WAIT: frozenset({"hostname", "queue_name"}),
}

FAMILIES = frozenset({
    *COUNTERS.values(), RUNTIME, QUEUE_WAIT, LATENCY,
    # alert delivery (alerts/delivery/)
    "celery_sidecar_alerts_sent_total", "celery_sidecar_alerts_failed_total", "celery_sidecar_alerts_dropped_total",
    "celery_sidecar_alerts_pending",
    # workers
    "celery_worker_up", "celery_worker_tasks_active", "celery_worker_pool_utilization", "celery_worker_cpu_percent",
    "celery_worker_memory_percent", "celery_worker_rss_bytes", "celery_sidecar_worker_task_events_enabled",
    "celery_active_worker_count", "celery_active_process_count", "celery_task_retry_ratio",
    # queues and tasks in flight
    "celery_queue_length", "celery_active_consumer_count", "celery_queue_probe_age_seconds",
    "celery_sidecar_probe_errors_total", "celery_queue_oldest_task_age_seconds",
    "celery_queue_oldest_task_age_lower_bound", "celery_task_running", "celery_task_oldest_running_seconds",
    "celery_task_stuck", "celery_task_lost_total", "celery_task_redelivered_total", "celery_task_end_unseen_total",
    "celery_redis_unacked_tasks", "celery_redis_unacked_oldest_age_seconds",
    # Beat
    "celery_beat_entry_last_run_timestamp_seconds", "celery_beat_entry_next_due_timestamp_seconds",
    "celery_beat_entry_missed_total", "celery_beat_entry_late_seconds", "celery_beat_entry_period_seconds",
    "celery_beat_entry_grace_seconds", "celery_beat_down",
    # thresholds and the sidecar itself
    "celery_threshold", "celery_sidecar_events_total", "celery_sidecar_events_skipped_total",
    "celery_sidecar_latency_source", "celery_sidecar_broker_connected", "celery_sidecar_reconnects_total",
    "celery_sidecar_config_reloads_total", "celery_sidecar_config_valid", "celery_sidecar_consumer_lag_seconds",
    "celery_sidecar_last_event_age_seconds", "celery_sidecar_tasks_in_memory", "celery_sidecar_event_queue_messages",
    "celery_sidecar_last_tick_timestamp_seconds", "celery_sidecar_task_events_expected_total",
    "celery_sidecar_task_events_missed_total", "celery_sidecar_task_events_expected_fleet_total",
    "celery_sidecar_task_events_missed_fleet_total", "celery_sidecar_task_events_missed_ratio",
    "celery_sidecar_render_errors_total",
    # queue pressure, task classes
    "celery_queue_tasks_reserved", "celery_queue_tasks_scheduled", "celery_queue_tasks_running",
    "celery_queue_capacity", "celery_queue_pressure", "celery_queue_workers_desired", "celery_queue_pool_size",
    "celery_queue_arrival_rate", "celery_queue_latency_threshold_seconds",
    "celery_queue_task_runtime_median_seconds", "celery_worker_consuming", "celery_task_class",
    # --compat ovalmoney
    "celery_tasks_total", "celery_tasks_runtime_seconds", "celery_tasks_latency_seconds", "celery_workers",
    # prometheus_client's ProcessCollector, where /proc exists
    "process_virtual_memory_bytes", "process_resident_memory_bytes", "process_start_time_seconds",
    "process_cpu_seconds_total", "process_open_fds", "process_max_fds",
})

# Every label a family of /metrics has: a static label may not take one of these names.
LABELS_IN_USE = frozenset({
    "name", "hostname", "queue_name", "exception", "task_class", "channel", "reason", "probe", "entry", "task",
    "level", "signal", "type", "source", "result", "state", "queue", "namespace", "le", "quantile",
})
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def canonical(family: str) -> str | None:
    """The documented name of ``family`` (a counter may be named without ``_total``), or None."""
    if family in FAMILIES:
        return family
    return family + "_total" if family + "_total" in FAMILIES else None


def base_name(family: str) -> str:
    """The name prometheus_client gives a family: a counter's without ``_total``."""
    return family.removesuffix("_total")


def check_controls(config: Config) -> None:
    """Refuse (ValueError), with every problem named, controls that name a family or label that
    is not there. The caller names the file: a reload, ``config check`` and the start do."""
    cardinality = config.cardinality
    problems = []
    for family in cardinality.disable_families:
        if canonical(family) is None:
            problems.append(f"cardinality.disable_families: {family!r} is not a family of /metrics "
                            "(docs/metrics.md lists them)")
    for family, labels in cardinality.drop_labels.items():
        name = canonical(family)
        if name not in DROPPABLE:
            problems.append(f"cardinality.drop_labels: {family!r}: labels can be dropped only from "
                            f"{', '.join(sorted(DROPPABLE))}")
            continue
        for label in labels:
            if label not in DROPPABLE[name]:
                problems.append(f"cardinality.drop_labels.{family}: {label!r} cannot be dropped "
                                f"(droppable: {', '.join(sorted(DROPPABLE[name]))})")
    if problems:
        raise ValueError("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


def check_static_labels(pairs: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """``pairs`` if every name is a Prometheus label name that no family uses, once; else a ValueError."""
    found: dict[str, str] = {}
    for name, value in pairs:
        if not LABEL_NAME.fullmatch(name) or name.startswith("__"):
            raise ValueError(f"{name!r} is not a label name: letters, digits and _, not starting with a digit "
                             "or __")
        if name in LABELS_IN_USE:
            raise ValueError(f"{name!r} is a label of the sidecar's own families; pick another name")
        if name in found:
            raise ValueError(f"{name!r} is given twice")
        found[name] = value
    return tuple(found.items())


def static_label_text(pairs: Iterable[tuple[str, str]]) -> str:
    """The static labels as text-format label pairs, each after a comma."""
    return "".join(f',{name}="{escape(value)}"' for name, value in pairs)


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass(frozen=True)
class Controls:
    """The controls of one config, as the exporters apply them."""

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    disabled: frozenset[str] = frozenset()  # base names (a counter's without _total)
    drop: dict[str, frozenset[str]] = field(default_factory=dict)  # documented name -> labels dropped
    generic_hostname: bool = False
    runtime_buckets: tuple[float, ...] = ()
    queue_wait_buckets: tuple[float, ...] = ()
    _exported: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, config: Config) -> Controls:
        c = config.cardinality
        drop = {canonical(family) or family: frozenset(labels) for family, labels in c.drop_labels.items()}
        return cls(include=tuple(c.include_tasks), exclude=tuple(c.exclude_tasks),
                   disabled=frozenset(base_name(canonical(f) or f) for f in c.disable_families),
                   drop={family: labels for family, labels in drop.items() if labels},
                   generic_hostname=c.generic_hostname, runtime_buckets=tuple(map(float, c.buckets.runtime_seconds)),
                   queue_wait_buckets=tuple(map(float, c.buckets.queue_wait_seconds)))

    @property
    def every_task(self) -> bool:
        """No task name is left out (the default), so nothing needs to be matched."""
        return "*" in self.include and not self.exclude

    def exported(self, task_name: str) -> bool:
        """Whether a task name's series are exported. ``other`` (names over the cap) always is:
        it holds included names only."""
        hit = self._exported.get(task_name)
        if hit is None:
            hit = task_name == OTHER or (
                any(fnmatch.fnmatchcase(task_name, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(task_name, p) for p in self.exclude))
            if len(self._exported) < 100_000:
                self._exported[task_name] = hit
        return hit

    def is_on(self, family: str) -> bool:
        return base_name(family) not in self.disabled

    def dropped(self, family: str) -> frozenset[str]:
        return self.drop.get(family, frozenset())


class ControlsOf:
    """``Controls`` of the config in force, derived again only when the config object changes."""

    __slots__ = ("_config", "_controls")

    def __init__(self) -> None:
        self._config: Config | None = None
        self._controls = Controls()

    def __call__(self, config: Config) -> Controls:
        if config is not self._config:
            self._controls, self._config = Controls.of(config), config
        return self._controls

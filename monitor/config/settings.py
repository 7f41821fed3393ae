"""The one configuration object: loaded from YAML, validated here, read live by every part.

Thresholds are the documented defaults; an operator edits the YAML file and the
sidecar reloads it live (monitor/config/reload.py swaps ``LiveConfig.current``). Unknown keys
are errors, so a typo is refused instead of silently ignored.
"""

from __future__ import annotations

import codecs
import fnmatch
import itertools
import math
import stat
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from celery_sidecar.monitor.config.alert_rules import AlertsConfig
from celery_sidecar.monitor.config.beat_entries import BeatEntryConfig


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LatencyThresholds(_Strict):
    normal: float = Field(5.0, gt=0, description="seconds of queue wait for normal tasks")
    heavy: float = Field(30.0, gt=0, description="seconds of queue wait for heavy tasks")


class QueueThresholds(_Strict):
    normal: int = Field(100, ge=0, description="warning above this many messages")
    peak: int = Field(1000, ge=0, description="critical above this many messages")

    @model_validator(mode="after")
    def _peak_above_normal(self) -> QueueThresholds:
        if self.peak < self.normal:
            raise ValueError(f"peak ({self.peak}) must be >= normal ({self.normal})")
        return self


class RuntimeLimits(_Strict):
    """How long a task may run before it is stuck: a default, and glob overrides by task name
    (the first matching pattern, in the file's order, wins)."""

    default: float = Field(3600.0, gt=0, description="seconds")
    overrides: dict[str, float] = Field(default_factory=dict, description="glob on task names -> seconds")

    @field_validator("overrides")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for pattern, seconds in value.items():
            if not seconds > 0:
                raise ValueError(f"overrides[{pattern!r}] must be greater than 0, got {seconds!r}")
        return value


class Thresholds(_Strict):
    latency_seconds: LatencyThresholds = LatencyThresholds()
    task_runtime_seconds: RuntimeLimits = RuntimeLimits()
    queue_length: QueueThresholds = QueueThresholds()
    worker_cpu_percent: float = Field(80.0, gt=0, le=100 * 1024)
    worker_memory_percent: float = Field(70.0, gt=0, le=100)
    retry_rate_percent: float = Field(5.0, gt=0, le=100)
    retry_rate_min_outcomes: int = Field(
        10, ge=1, description="outcomes of a task in the retry window before its retry rate is judged"
    )
    events_missed_percent: float = Field(
        1.0, gt=0, le=100,
        description="task events missed / expected over state.stream_window_seconds: the event stream is incomplete",
    )
    events_missed_min: int = Field(
        5, ge=1, description="events missed in the window before the share is judged (a handful is noise)"
    )
    not_consuming_seconds: float = Field(
        60.0, gt=0,
        description="a worker with free slots that took nothing from a queue whose tasks waited this long",
    )


# Upper bounds of the task histograms' buckets (+Inf is added). Queue waits run from
# milliseconds to days, runtimes to hours; each bound is one series per label set, so few.
# Both hold the default latency thresholds (5 s, 30 s): celery_task_latency_seconds uses the
# queue-wait bounds, and its p95 is judged against them.
RUNTIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200, 21600)
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 10800, 21600,
                      86400)
MAX_BUCKETS = 40


class HistogramBuckets(_Strict):
    runtime_seconds: tuple[float, ...] = Field(RUNTIME_BUCKETS, description="bounds of celery_task_runtime")
    queue_wait_seconds: tuple[float, ...] = Field(
        QUEUE_WAIT_BUCKETS, description="bounds of celery_task_queue_wait_time and celery_task_latency_seconds"
    )

    @field_validator("runtime_seconds", "queue_wait_seconds")
    @classmethod
    def _increasing(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not 1 <= len(value) <= MAX_BUCKETS:
            raise ValueError(f"give 1 to {MAX_BUCKETS} bucket bounds, got {len(value)}")
        if not all(math.isfinite(b) and b > 0 for b in value):
            raise ValueError("bucket bounds must be finite and greater than 0 (+Inf is always added)")
        if any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError("bucket bounds must be strictly increasing")
        return value


class Cardinality(_Strict):
    """Label caps, and what /metrics exports of the task families (docs/metrics.md, "Cardinality
    controls"). Which families and labels the controls may name is checked by the exporters
    (exporters/controls.py), before a config is used."""

    max_task_names: int = Field(500, ge=1, description="distinct task names before overflow to 'other'")
    max_exceptions: int = Field(100, ge=1, description="distinct exception classes before 'other'")
    generic_hostname: bool = Field(False, description="export hostname='generic' (k8s pods churn)")
    include_tasks: list[str] = Field(default_factory=lambda: ["*"], description="glob patterns on task names")
    exclude_tasks: list[str] = Field(default_factory=list, description="glob patterns on task names: not exported")
    drop_labels: dict[str, list[str]] = Field(
        default_factory=dict, description="family -> labels left out, its series summed over them"
    )
    disable_families: list[str] = Field(default_factory=list, description="families left out of /metrics")
    buckets: HistogramBuckets = HistogramBuckets()


class StateLimits(_Strict):
    max_tasks: int = Field(100_000, ge=100, description="in-flight tasks kept (LRU)")
    max_workers: int = Field(1_000, ge=1, description="workers tracked at once")
    heartbeat_grace_seconds: float = Field(2.0, ge=0)
    worker_forget_seconds: float = Field(900.0, gt=0, description="drop a dead worker's series after this")
    retry_window_seconds: float = Field(300.0, gt=0, description="window of the retry ratio")
    latency_window_seconds: float = Field(300.0, gt=0, description="window of the latency p95")
    task_events_grace_seconds: float = Field(
        60.0, gt=0, description="heartbeats without task events for this long means events are off"
    )
    stream_window_seconds: float = Field(
        600.0, ge=10, description="window of the missed-events share (the event stream incomplete alert)"
    )
    pressure_window_seconds: float = Field(
        300.0, ge=10, description="window of each queue's arrival rate and median runtime (workers desired)"
    )


class Config(_Strict):
    thresholds: Thresholds = Thresholds()
    heavy_tasks: list[str] = Field(default_factory=list, description="glob patterns on task names")
    heavy_queues: list[str] = Field(default_factory=list, description="glob patterns on queue names")
    queues: list[str] = Field(default_factory=lambda: ["celery"])
    queue_overrides: dict[str, QueueThresholds] = Field(default_factory=dict)
    cardinality: Cardinality = Cardinality()
    state: StateLimits = StateLimits()
    alerts: AlertsConfig = AlertsConfig()
    beat: list[BeatEntryConfig] = Field(default_factory=list, description="schedule entries to watch")

    @field_validator("beat")
    @classmethod
    def _unique_entries(cls, value: list[BeatEntryConfig]) -> list[BeatEntryConfig]:
        names = [e.entry for e in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"beat entries must have unique names; repeated: {', '.join(twice)}")
        return value

    def is_heavy(self, task_name: str | None, queue: str | None) -> bool:
        # Called for every started task: the glob's answer is cached, bounded by the name/queue caps.
        key = (task_name or "", queue or "")
        hit = self._heavy_cache.get(key)
        return self._heavy_glob(key) if hit is None else hit

    def queue_thresholds(self, queue: str) -> QueueThresholds:
        return self.queue_overrides.get(queue, self.thresholds.queue_length)

    def runtime_limit(self, task_name: str) -> float:
        """Seconds ``task_name`` may run before it counts as stuck."""
        cache = self._runtime_cache
        limit = cache.get(task_name)
        if limit is None:
            limits = self.thresholds.task_runtime_seconds
            limit = next((s for p, s in limits.overrides.items() if fnmatch.fnmatchcase(task_name, p)),
                         limits.default)
            if len(cache) < 100_000:
                cache[task_name] = limit
        return limit

    @cached_property
    def _runtime_cache(self) -> dict[str, float]:
        return {}

    @cached_property
    def _heavy_cache(self) -> dict[tuple[str, str], bool]:
        return {}

    def _heavy_glob(self, key: tuple[str, str]) -> bool:
        name, queue = key
        hit = any(fnmatch.fnmatchcase(name, p) for p in self.heavy_tasks) or any(
            fnmatch.fnmatchcase(queue, p) for p in self.heavy_queues)
        if len(self._heavy_cache) < 100_000:
            self._heavy_cache[key] = hit
        return hit


def parse_config(data: Any, source: str = "<config>") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, data)) from None


def load_config(path: Path | str | None) -> Config:
    """Load and validate a config file; no path means the documented defaults."""
    if path is None:
        return Config()
    return config_from_bytes(read_config_file(Path(path)), str(path))


# A sidecar.yml is a few kilobytes; a path swapped to something huge (or endless) is not one.
MAX_CONFIG_BYTES = 1 << 20


def read_config_file(path: Path) -> bytes:
    """The file's bytes, or a one-line ConfigError saying why they cannot be read. Only a
    regular file is read: a FIFO (or a symlink swapped to /dev/zero) would block or never end."""
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device"
            raise ConfigError(f"{path}: not a regular file ({kind}): give the YAML file")
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, so not a sidecar config file")
    return data


def config_from_bytes(data: bytes, source: str) -> Config:
    """Decode, parse and validate a config file's bytes; every refusal is a ConfigError whose
    first line names the file and the problem."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ConfigError(f"{source}: UTF-16 text: save the file as UTF-8")
    if b"\0" in data:
        raise ConfigError(f"{source}: a binary file, not YAML text (a NUL byte at offset {data.index(0)})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{source}: not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} is not "
                          f"UTF-8 (an editor saving Latin-1?): save the file as UTF-8") from None
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or exc
        raise ConfigError(f"{source}: invalid YAML{at}: {' '.join(str(problem).split())}") from None
    return parse_config(parsed, source)


def _describe(exc: ValidationError, source: str, data: dict[str, Any]) -> str:
    lines = [f"{source}: invalid configuration:"]
    for err in exc.errors():
        key = ".".join(_name_items(err["loc"], data)) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `celery-sidecar config example` prints every key)"
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


class LiveConfig:
    """The config in force. A reload replaces ``current`` whole (one reference swap, atomic
    for readers); every part reads ``current`` when it needs a value, so there is no list
    of holders to update and no part can keep a stale copy."""

    __slots__ = ("current",)

    def __init__(self, config: Config) -> None:
        self.current = config


def _name_items(loc: tuple, data: Any) -> list[str]:
    """A location as keys, a list item named by its ``entry`` when it has one
    (``beat[nightly-cleanup].cron`` rather than ``beat.0.cron``)."""
    parts: list[str] = []
    for step in loc:
        if isinstance(step, int) and isinstance(data, list) and parts:
            item = data[step] if step < len(data) else None
            name = item.get("entry") if isinstance(item, dict) else None
            parts[-1] += f"[{name}]" if isinstance(name, str) else f"[{step}]"
            data = item
            continue
        parts.append(str(step))
        data = data.get(step) if isinstance(data, dict) else None
    return parts

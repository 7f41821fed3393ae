"""What the fold keeps and what it hands on: task and worker records, the updates sinks
receive, and the probes' readings.

Plain slotted dataclasses: the hot path builds a ``TaskUpdate`` per task event, so they
stay cheap to construct (positionally) and carry no behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TASK_KINDS = ("sent", "received", "started", "succeeded", "failed", "retried", "rejected", "revoked")
WORKER_KINDS = ("online", "offline")
UNKNOWN = "unknown"


@dataclass(slots=True)
class TaskRecord:
    uuid: str
    name: str = UNKNOWN
    queue: str | None = None  # its task-sent's, else inferred (task names seen, app routes) once known
    hostname: str | None = None
    sent_at: float | None = None
    eta_at: float | None = None
    received_at: float | None = None
    started_at: float | None = None  # our clock: when the task-started event arrived
    retries: int = 0
    retried: int = 0  # task-retried events seen; fills in when events carry no retries field
    received_retries: int = -1  # its ``retries`` when a worker last received it (-1: never received)
    args: str | None = None
    kwargs: str | None = None


@dataclass(slots=True)
class TaskUpdate:
    """What one task event changed; read by the exporter and the alert engine."""

    kind: str  # one of TASK_KINDS
    uuid: str
    name: str
    hostname: str
    queue: str
    timestamp: float
    runtime: float | None = None
    latency: float | None = None
    task_class: str = "normal"
    exception: str | None = None  # class name only
    exception_message: str | None = None
    traceback: str | None = None
    retries: int = 0
    args: str | None = None
    kwargs: str | None = None
    redelivered: bool = False  # received again after being received, finished or lost
    was_lost: bool = False  # ... and it had been reported lost with its worker
    entry: str | None = None  # the Beat schedule entry this task is a run of


@dataclass(slots=True)
class WorkerRecord:
    hostname: str
    first_seen: float
    last_seen: float  # local receive time of the last worker event
    freq: float = 2.0
    alive: bool = True
    offline_reason: str | None = None  # "shutdown" | "heartbeat-lost"
    went_offline_at: float | None = None
    last_heartbeat_ts: float = 0.0  # the worker's own (adjusted) timestamp: stable across sidecars
    active: int = 0
    processed: int = 0
    processed_at_first_heartbeat: int | None = None
    task_events_seen: bool = False
    pool_max: int | None = None
    cpu_percent: float | None = None
    memory_percent: float | None = None
    rss_bytes: float | None = None
    queues: tuple[str, ...] = ()
    received_at: dict[str, float] = field(default_factory=dict)  # queue -> its last task received here
    up_since: float = 0.0  # when first seen or back after going down (broker outages left out)
    heard: bool = True  # an event of its own since the broker was last back


@dataclass(slots=True)
class WorkerUpdate:
    """A worker liveness transition: online, offline (shutdown or heartbeat-lost)."""

    kind: str  # "online" | "offline"
    hostname: str
    reason: str | None
    timestamp: float
    last_heartbeat_ts: float
    lost: tuple[tuple[str, str, str], ...] = ()  # (uuid, name, queue) of tasks it had started and not finished


Update = TaskUpdate | WorkerUpdate


@dataclass(frozen=True, slots=True)
class QueueReading:
    """A queue probe's reading of one queue."""

    length: int
    consumers: int | None  # AMQP knows its consumers; Redis does not
    tails: tuple[tuple[str, str | None], ...] = ()  # Redis: (task id, name) at the oldest end of each list


@dataclass(frozen=True, slots=True)
class Unacked:
    """Redis: messages workers have taken and not acknowledged (kombu's unacked hash)."""

    count: int
    oldest_at: float | None  # when the oldest of them was delivered (unacked_index score)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What worker inspection (remote control) says of a worker."""

    queues: tuple[str, ...]
    pool_max: int | None


@dataclass
class Counters:
    """Intake self-metrics, plain ints so the hot path stays cheap."""

    events_by_type: dict[str, int] = field(default_factory=dict)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    last_event_at: float | None = None
    last_event_lag: float = 0.0

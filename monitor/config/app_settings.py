"""What the Celery app itself says, as defaults under the sidecar's flags and sidecar.yml.

``celery -A proj sidecar`` (and ``celery-sidecar run --app``) read the app's settings once,
at start (sidecar/app.py); this is the plain data they produce. Explicit flags and
sidecar.yml always win: the app's queues join the configured ones, its Beat entries are
watched unless sidecar.yml has an entry of the same name, and its task time limits are the
stuck-task limits of tasks sidecar.yml has no override for.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from celery_sidecar.monitor.config.beat_entries import Entry
from celery_sidecar.monitor.config.settings import Config


@dataclass(frozen=True)
class AppDefaults:
    queues: tuple[str, ...] = ()
    beat: tuple[Entry, ...] = ()
    time_limits: dict[str, float] = field(default_factory=dict)  # task name -> time_limit
    default_time_limit: float | None = None  # task_time_limit
    timezone: str = "UTC"
    # Where the app routes tasks: its registered tasks, resolved by celery's own router at
    # start (function routers included), then task_routes' glob patterns, then its default queue.
    routed: dict[str, str] = field(default_factory=dict)  # task name -> queue
    route_patterns: tuple[tuple[str, str], ...] = ()  # (glob on task names, queue)
    default_queue: str | None = None  # None: no app loaded, so no route is known

    def route(self, task_name: str) -> str | None:
        """The queue the app sends ``task_name`` to, or None when no app was loaded."""
        queue = self.routed.get(task_name)
        if queue is not None:
            return queue
        for pattern, target in self.route_patterns:
            if fnmatch.fnmatchcase(task_name, pattern):
                return target
        return self.default_queue

    def beat_entries(self, config: Config) -> list[Entry]:
        """The app's entries, then sidecar.yml's, the file's replacing the app's by name."""
        mine = {e.entry: e.to_entry() for e in config.beat}
        return [e for e in self.beat if e.name not in mine] + list(mine.values())

    def runtime_limit(self, config: Config, task_name: str) -> float:
        """sidecar.yml's override for the task, else the app's time limit, else the default
        (sidecar.yml's when it sets one, else the app's task_time_limit, else 3600 s)."""
        limits = config.thresholds.task_runtime_seconds
        if any(fnmatch.fnmatchcase(task_name, p) for p in limits.overrides):
            return config.runtime_limit(task_name)
        if task_name in self.time_limits:
            return self.time_limits[task_name]
        if self.default_time_limit is not None and "default" not in limits.model_fields_set:
            return self.default_time_limit
        return limits.default

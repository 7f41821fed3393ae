"""The fold of the Celery event stream into bounded state: one handler table, per-domain folds.

``State.handlers[type](fields, received)`` is the domain fold's handler for the event type
(the table is built from the domain folds); it returns the update record (or None) the
sinks receive. The pipeline calls it directly: a frame less on every event.
The fields come from monitor/boundary/, which has checked them: nothing here converts or
guards a value. Each domain keeps its own bounded state and states its bounds:

- monitor/fold/tasks.py: in-flight tasks, where they wait and run, retries and latency;
- monitor/fold/workers.py: liveness, what workers run and report of themselves;
- monitor/fold/queues.py: known queues and the broker probes' readings;
- monitor/fold/beat.py: the Beat entries, their dues, runs and misses.

``received`` is the sidecar's own receive time: windows and liveness run on it, so a
skewed worker clock cannot age them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from celery_sidecar.monitor.config.app_settings import AppDefaults
from celery_sidecar.monitor.config.settings import Config, LiveConfig
from celery_sidecar.monitor.fold.beat import BeatTracker
from celery_sidecar.monitor.fold.crosscheck import StreamSample, StreamWindow
from celery_sidecar.monitor.fold.queues import QueueFold
from celery_sidecar.monitor.fold.records import Counters, QueueReading, Unacked, Update, WorkerInfo, WorkerUpdate
from celery_sidecar.monitor.fold.tasks import TaskFold
from celery_sidecar.monitor.fold.workers import WorkerFold

MAX_STUCK = 100  # stuck tasks reported at once (each is one alert)


class State:
    def __init__(self, config: LiveConfig, clock: Callable[[], float] = time.time,
                 app: AppDefaults | None = None) -> None:
        self._live = config
        self.clock = clock
        self.app = app or AppDefaults()
        self.counters = Counters()
        self.beat = BeatTracker()
        self._beat_config: Config | None = None
        self.worker_fold = WorkerFold(config, lose=lambda host: self.task_fold.lose(host),
                                      check_active=lambda host, n, at: self.task_fold.held.check_active(host, n, at))
        self.queue_fold = QueueFold(config, self.app, clock, self.worker_fold.queues)
        self.task_fold = TaskFold(config, self.beat, self.queue_fold, self.worker_fold.saw_task_event,
                                  self.worker_fold.saw_started,
                                  end_unseen=lambda host: self.worker_fold.stream.end_unseen_on(host, 1),
                                  saw_received=self.worker_fold.saw_received, route=self.app.route)
        self.stream_window = StreamWindow(config.current.state.stream_window_seconds)
        self.blind_since: float | None = None  # when the event stream was lost, until it is back
        # The containers readers iterate, under their usual names.
        self.tasks = self.task_fold.records
        self.workers = self.worker_fold.records
        # One handler per event type; monitor/boundary/parse.PARSERS has exactly these keys.
        self.handlers: dict[str, Callable[[tuple, float], Update | None]] = {
            **self.task_fold.handlers(), **self.worker_fold.handlers(),
        }
        self.follow_beat_config(clock())

    @property
    def config(self) -> Config:
        return self._live.current

    def tick(self, now: float | None = None) -> tuple[list[WorkerUpdate], list[str]]:
        """Time-driven transitions, about once a second: Beat dues, heartbeats lost, dead
        workers forgotten. Returns (offline updates, forgotten hostnames)."""
        now = self.clock() if now is None else now
        self.follow_beat_config(now)
        self.beat.tick(now)
        self.task_fold.held.tick(now, self.runtime_limit)
        self.task_fold.rates.tidy(now)
        return self.worker_fold.tick(now)

    def sample_stream(self, now: float, reconnects: int, lag: float) -> None:
        """Once a tick: the fleet's expected and missed task events, for the window's share."""
        stream = self.worker_fold.stream
        self.stream_window.seconds = self.config.state.stream_window_seconds
        self.stream_window.add(StreamSample(now, stream.expected, stream.missed, reconnects, lag))

    def lost_sight(self, now: float) -> None:
        """The event stream is gone: nothing the workers do is seen until ``resume``."""
        if self.blind_since is None:
            self.blind_since = now

    def resume(self, now: float) -> None:
        """The broker is reachable again after an outage the sidecar could not see through."""
        blind_for = max(0.0, now - self.blind_since) if self.blind_since is not None else 0.0
        self.blind_since = None
        self.worker_fold.resume(now, blind_for)
        self.beat.resume(now)

    def follow_beat_config(self, now: float) -> None:
        """Watch the Beat entries of the config in force (and the app's), once it changed."""
        config = self.config
        if config is not self._beat_config:
            self._beat_config = config
            self.beat.configure(self.app.beat_entries(config), now)

    # -- probe readings -------------------------------------------------------------------

    def record_queues(self, readings: dict[str, QueueReading], at: float, unacked: Unacked | None = None) -> None:
        self.queue_fold.record(readings, at, unacked)

    def record_inspection(self, info: dict[str, WorkerInfo]) -> None:
        self.worker_fold.record_inspection(info)

    def probe_failed(self, probe: str) -> None:
        self.queue_fold.probe_failed(probe)

    def take_verifications(self, now: float) -> list[str]:
        """The workers to ask which tasks they run (monitor/fold/held.py)."""
        return self.task_fold.held.take(now)

    def record_held(self, held: dict[str, set[str] | None], asked_at: float) -> None:
        self.task_fold.held.record(held, asked_at)

    # -- queries that join the domains ------------------------------------------------------

    def known_queues(self) -> list[str]:
        return self.queue_fold.known()

    def runtime_limit(self, task_name: str) -> float:
        return self.app.runtime_limit(self.config, task_name)

    def latency_source(self, now: float | None = None) -> str:
        return self.task_fold.latency_source(self.clock() if now is None else now)

    def queue_age(self, queue: str, now: float) -> tuple[float, str, bool]:
        """(how long the oldest task sent to ``queue`` and not started has waited, its task
        class, whether that is only a lower bound). 0 for an empty queue.

        From the in-flight tasks (task-sent seen), and on Redis from the task at the oldest
        end of the list: when the sidecar never saw that one sent (it is older than the
        sidecar), its age counts from when the probe first saw it there: a lower bound.
        """
        age, uuid = self.task_fold.waiting.oldest(queue, now)
        name, lower = None, False
        for tid, (tail_name, first_seen) in self.queue_fold.tails.get(queue, {}).items():
            # One the sidecar saw sent is in the waiting index already, with its real age.
            if tid not in self.tasks and now - first_seen > age:
                age, uuid, name, lower = now - first_seen, tid, tail_name, True
        if uuid is not None and name is None:
            rec = self.tasks.get(uuid)
            name = rec.name if rec is not None else None
        heavy = uuid is not None and self.config.is_heavy(name, queue)
        return age, "heavy" if heavy else "normal", lower

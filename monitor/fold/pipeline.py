"""The single entry point into state: events, probe results and the connection's comings and goings.

Every intake hands what it reads to the pipeline: the event paths (stock EventReceiver,
Redis and AMQP fast paths) each event dict to ``handle``, or the fields monitor/boundary/hot.py
already checked to ``fold_checked``, the probes their readings to
``record_queues`` / ``record_inspection``, and the intake loop its connection changes to
``set_connected``. Malformed or unknown events are counted by reason and skipped;
nothing here raises into an intake.

One lock serialises all of these, the once-a-second tick and the state view's
snapshots (monitor/view.py). Readers outside monitor/ never take it themselves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery_sidecar.monitor.boundary.parse import MISSING_TYPE, NOT_AN_EVENT, PARSERS, UNKNOWN_TYPE, Refused
from celery_sidecar.monitor.fold.records import (
    TASK_KINDS,
    WORKER_KINDS,
    QueueReading,
    Unacked,
    Update,
    WorkerInfo,
    WorkerUpdate,
)
from celery_sidecar.monitor.fold.state import State
from celery_sidecar.monitor.fold.status import Status

log = logging.getLogger(__name__)

UPDATE_KINDS = (*TASK_KINDS, *WORKER_KINDS)


class Sink:
    """Receives updates (of ``update_kinds``; None: every kind); ``on_tick`` runs about once a
    second under the same lock."""

    update_kinds: frozenset[str] | None = None

    def on_update(self, update: Update) -> None: ...

    def on_tick(self, now: float, offline: list[WorkerUpdate], forgotten: list[str]) -> None: ...


class Pipeline:
    def __init__(self, state: State, status: Status | None = None, sinks: list[Sink] | None = None,
                 clock: Callable[[], float] = time.time):
        self.state = state
        self.status = status if status is not None else Status()
        self.sinks: list[Sink] = []
        # The hot path: per update kind, only the sinks that act on it (most sinks act on a
        # few rare kinds; a call each per event would cost more than the fold's own work).
        self._update_sinks: dict[str, list[Sink]] = {kind: [] for kind in UPDATE_KINDS}
        for sink in sinks or []:
            self.add_sink(sink)
        self.lock = threading.RLock()
        self.clock = clock
        self.last_tick_at: float | None = None  # when time-based checks last ran (all sinks done)
        self.ticking_thread: int | None = None  # the thread running the sinks' on_tick, while it does
        self.tick_snapshot: Any = None  # the snapshot they share (monitor/view.py)
        self._sink_errors_logged = 0

    def add_sink(self, sink: Sink) -> None:
        self.sinks.append(sink)
        if type(sink).on_update is not Sink.on_update:
            kinds = UPDATE_KINDS if sink.update_kinds is None else sink.update_kinds
            unknown = set(kinds) - set(UPDATE_KINDS)
            if unknown:
                raise ValueError(f"{type(sink).__name__}.update_kinds has unknown kinds {sorted(unknown)}")
            for kind in kinds:
                self._update_sinks[kind].append(sink)

    # -- events -------------------------------------------------------------------------

    def handle(self, event: Any) -> None:
        """Check one event at the boundary (monitor/boundary/parse.py), then fold it and fan out."""
        if type(event) is not dict:
            self.skip(NOT_AN_EVENT)
            return
        etype = event.get("type")
        if type(etype) is not str:
            self.skip(MISSING_TYPE)
            return
        parse = PARSERS.get(etype)
        if parse is None:
            self.skip(UNKNOWN_TYPE)
            return
        received = event.get("local_received")
        if type(received) is not float and type(received) is not int:  # every intake sets it
            received = event["local_received"] = self.clock()
        try:
            fields = parse(event)
        except Refused as refused:
            self.skip(refused.reason)
            return
        self.fold_checked(etype, fields, received)

    def fold_checked(self, etype: str, fields: tuple, received: float) -> None:
        """Fold one event whose fields passed the boundary: ``handle`` after its parse, or the
        typed decode (monitor/boundary/hot.py) directly, on the fast paths and the stock path alike."""
        with self.lock:
            state = self.state
            update = state.handlers[etype](fields, received)
            counters = state.counters
            by_type = counters.events_by_type
            by_type[etype] = by_type.get(etype, 0) + 1
            counters.last_event_at = received
            lag = received - fields[1]  # the timestamp: second in every parse
            counters.last_event_lag = lag if lag > 0.0 else 0.0
            if update is not None:
                for sink in self._update_sinks[update.kind]:
                    try:
                        sink.on_update(update)
                    except Exception:  # noqa: BLE001 - one bad sink must not stop the stream
                        self._log_sink_error(sink)

    def skip(self, reason: str) -> None:
        """Count an event (or message) that is not folded, by reason; log a few of them."""
        skipped = self.state.counters.skipped_by_reason
        skipped[reason] = skipped.get(reason, 0) + 1
        if skipped[reason] in (1, 10, 100, 1000) or skipped[reason] % 10000 == 0:
            log.warning("skipped a malformed event (reason=%s, %d so far)", reason, skipped[reason])

    # -- probes -------------------------------------------------------------------------

    def record_queues(self, readings: dict[str, QueueReading], unacked: Unacked | None = None) -> None:
        with self.lock:
            self.state.record_queues(readings, self.clock(), unacked)

    def record_inspection(self, info: dict[str, WorkerInfo]) -> None:
        with self.lock:
            self.state.record_inspection(info)

    def probe_failed(self, probe: str) -> None:
        with self.lock:
            self.state.probe_failed(probe)

    def take_verifications(self) -> list[str]:
        with self.lock:
            return self.state.take_verifications(self.clock())

    def record_held(self, held: dict[str, set[str] | None], asked_at: float) -> None:
        with self.lock:
            self.state.record_held(held, asked_at)

    def known_queues(self) -> list[str]:
        with self.lock:
            return self.state.known_queues()

    # -- time and connection ------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Liveness and windows; the broker being down freezes liveness, see set_connected."""
        now = self.clock() if now is None else now
        with self.lock:
            if self.status.connected:
                offline, forgotten = self.state.tick(now)
            else:
                offline, forgotten = [], []
            self.state.sample_stream(now, self.status.reconnects, self.state.counters.last_event_lag)
            self.ticking_thread = threading.get_ident()  # monitor/view.py: the sinks share one snapshot
            try:
                for sink in self.sinks:
                    try:
                        sink.on_tick(now, offline, forgotten)
                    except Exception:  # noqa: BLE001 - one bad sink must not stop the ticker
                        self._log_sink_error(sink)
            finally:
                self.ticking_thread, self.tick_snapshot = None, None
            self.last_tick_at = now

    def set_connected(self, connected: bool, error: str | None = None) -> None:
        """While the broker is unreachable no heartbeat can arrive, so a worker is not
        declared dead for it: on reconnect every live worker gets a fresh grace period."""
        with self.lock:
            status = self.status
            if connected and not status.connected:
                self.state.resume(self.clock())
                if status.last_error is not None:
                    status.reconnects += 1
                status.last_error = None
            if error is not None:
                status.last_error = error
                if status.connected and not connected:
                    status.last_disconnect = error
            if status.connected and not connected:
                self.state.lost_sight(self.clock())
            status.connected = connected

    def _log_sink_error(self, sink: Sink) -> None:
        self._sink_errors_logged += 1
        if self._sink_errors_logged <= 20:
            log.exception("%s failed on an update; continuing", type(sink).__name__)

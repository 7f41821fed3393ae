"""The pipeline hands each update only to the sinks that asked for its kind."""

from __future__ import annotations

import pytest

from celery_sidecar.monitor.fold.pipeline import Sink
from tests.support.inproc import DataPath

T0 = 1_700_000_000.0


class Kinds(Sink):
    def __init__(self, kinds: frozenset[str] | None) -> None:
        self.update_kinds = kinds
        self.seen: list[str] = []

    def on_update(self, update) -> None:
        self.seen.append(update.kind)


def test_a_sink_gets_the_update_kinds_it_asked_for_and_none_means_all():
    failures, everything = Kinds(frozenset({"failed", "offline"})), Kinds(None)
    path = DataPath.build({}, now=T0, sinks=[failures, everything])
    path.handle(
        {"type": "task-received", "uuid": "a", "name": "app.x", "hostname": "w@x", "timestamp": T0,
         "local_received": T0},
        {"type": "task-started", "uuid": "a", "hostname": "w@x", "timestamp": T0, "local_received": T0},
        {"type": "task-failed", "uuid": "a", "hostname": "w@x", "exception": "E()", "timestamp": T0 + 1,
         "local_received": T0 + 1},
    )
    assert failures.seen == ["failed"]
    assert everything.seen == ["received", "started", "failed"]


def test_a_sink_asking_for_a_kind_that_does_not_exist_is_refused_at_wiring():
    with pytest.raises(ValueError, match="unknown kinds \\['task-failed'\\]"):
        DataPath.build({}, sinks=[Kinds(frozenset({"task-failed"}))])


class Looks(Sink):
    """Takes a snapshot at every tick, as the alert sinks do."""

    def __init__(self) -> None:
        self.view = None
        self.seen: list = []

    def on_tick(self, now, offline, forgotten) -> None:
        self.seen.append(self.view.snapshot(now))


def test_the_sinks_of_one_tick_share_one_snapshot_and_the_next_tick_takes_a_new_one():
    first, second = Looks(), Looks()
    path = DataPath.build({}, now=T0, sinks=[first, second])
    first.view = second.view = path.view
    path.pipeline.tick(T0)
    assert first.seen[0] is second.seen[0]
    path.handle({"type": "task-received", "uuid": "a", "name": "app.x", "hostname": "w@x", "timestamp": T0,
                 "local_received": T0})
    outside = path.view.snapshot(T0)  # not in a tick: taken afresh
    assert outside is not first.seen[0] and outside.intake.events_by_type == {"task-received": 1}
    path.pipeline.tick(T0 + 1)
    assert first.seen[1] is second.seen[1] and first.seen[1] is not first.seen[0]
    assert first.seen[1].at == T0 + 1 and first.seen[1].intake.events_by_type == {"task-received": 1}

"""The pipeline hands each update only to the sinks that asked for its kind."""

from __future__ import annotations

import pytest

from celery_sidecar.monitor.pipeline import Sink
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

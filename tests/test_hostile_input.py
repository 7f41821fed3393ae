"""Any input, however broken, leaves the fold standing, /metrics parseable and state bounded.

Property tests (Hypothesis) feed generated events to the real pipeline, fold and
exporters in-process, and generated payloads to the fast path's decoder. The nastiest
cases found are kept as explicit examples (tests/hostile.py). What a real broker and
real workers make of the same input is tests/test_hostile_e2e.py.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from celery_sidecar.alerts.engine import AlertEngine
from celery_sidecar.exporters.collectors import StateCollector
from celery_sidecar.exporters.exposition import Exposition
from celery_sidecar.monitor.boundary import parse
from celery_sidecar.monitor.intake.decoder import EventDecoder
from tests.hostile import BAD_ENVELOPES, BAD_EVENTS, NOW, events, valid_event
from tests.support.inproc import DataPath

CAPS = {"state": {"max_tasks": 100, "max_workers": 5},
        "cardinality": {"max_task_names": 5, "max_exceptions": 5}}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])


class Recorder:
    """Stands in for the alert dispatcher: what the engine would have sent."""

    def __init__(self) -> None:
        self.alerts: list[Any] = []

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    def submit(self, alert: Any) -> None:
        self.alerts.append(alert)


def scrape(path: DataPath) -> str:
    exposition = Exposition(path.metrics.exposition, lambda: path.metrics.render_errors)
    exposition.register(StateCollector(path.view, path.config))
    body = b"".join(exposition.render())
    text = body.decode("utf-8")  # must be UTF-8
    list(text_string_to_metric_families(text))  # must parse; raises on anything invalid
    return text


def series(path: DataPath) -> int:
    m = path.metrics
    return (sum(map(len, m.counts.values())) + len(m.runtime.series) + len(m.queue_wait.series)
            + len(m.latency.series))


def label_values(path: DataPath, position: int) -> set[str]:
    return {labels[position] for kind in path.metrics.counts.values() for labels in kind}


@FUZZ
@given(st.lists(events(), min_size=1, max_size=60))
@example([e for e, _ in BAD_EVENTS])
def test_any_events_leave_the_fold_standing_metrics_parseable_and_state_bounded(batch):
    now = NOW
    path = DataPath.build(CAPS, now=now)
    path.pipeline.set_connected(True)
    for event in batch:
        path.pipeline.handle(event)  # must not raise
        path.pipeline.tick(now)
    counters = path.state.counters
    # Every event is either folded or skipped with a reason, once.
    assert sum(counters.events_by_type.values()) + sum(counters.skipped_by_reason.values()) == len(batch)
    assert set(counters.skipped_by_reason) <= set(parse.REASONS)
    text = scrape(path)
    assert path.metrics.render_errors == 0, "the boundary let through a value that cannot be rendered"
    assert "celery_sidecar_render_errors_total 0.0" in text
    # Bounds: in-flight tasks, workers, and label values under their caps ("other" is one more).
    assert len(path.state.tasks) <= 100 and len(path.state.workers) <= 5
    assert len(label_values(path, 0)) <= 5 + 1, "task names"
    assert len(label_values(path, 1)) <= 5 + 1, "hostnames"
    assert len({labels[3] for labels in path.metrics.counts["failed"]} - {""}) <= 5 + 1, "exceptions"


@pytest.mark.parametrize(("event", "reason"), BAD_EVENTS, ids=[f"{r}:{e.get('type')}" for e, r in BAD_EVENTS])
def test_a_refused_event_changes_nothing_but_the_skip_counter(event, reason):
    now = NOW
    recorder = Recorder()
    path = DataPath.build({}, now=now)
    engine = AlertEngine(path.config, path.view, recorder)
    path.pipeline.add_sink(engine)
    path.pipeline.set_connected(True)
    before = (dict(path.state.tasks), dict(path.state.workers), series(path))

    path.handle({**event, "local_received": now})
    for later in (now + 1, now + 30, now + 600):  # long past any heartbeat deadline
        path.pipeline.tick(later)

    assert path.state.counters.skipped_by_reason == {reason: 1}
    assert path.state.counters.events_by_type == {}
    assert (dict(path.state.tasks), dict(path.state.workers), series(path)) == before
    assert recorder.alerts == [], "a refused event must never page anyone"
    scrape(path)


def test_a_phantom_heartbeat_never_becomes_an_offline_page():
    """A story: eight seconds after a malformed heartbeat from
    a worker nobody runs, nothing may page on-call; a real worker that goes silent does."""
    now = time.time()
    recorder = Recorder()
    path = DataPath.build({}, now=now)
    path.pipeline.add_sink(AlertEngine(path.config, path.view, recorder))
    path.pipeline.set_connected(True)
    path.handle({**valid_event("worker-heartbeat", 1, now), "hostname": "fuzzphantom1@host", "freq": "often",
                 "local_received": now},
                {**valid_event("worker-heartbeat", 2, now), "hostname": "real@host", "local_received": now})
    path.at(now + 8).pipeline.tick(now + 8)
    assert [a.title for a in recorder.alerts] == ["Worker offline: real@host"]


@FUZZ
@given(st.lists(st.binary(max_size=300) | st.sampled_from([p for p, _ in BAD_ENVELOPES]), max_size=30))
def test_the_fast_path_decoder_survives_any_payload(payloads):
    out: list[dict] = []
    skipped: list[str] = []
    decoder = EventDecoder(out.append, skipped.append)
    for payload in payloads:
        decoder.feed(payload)  # must not raise
    assert set(skipped) <= set(parse.REASONS)
    assert all(isinstance(e, dict) and "local_received" in e for e in out)


@pytest.mark.parametrize(("payload", "reason"), BAD_ENVELOPES)
def test_every_bad_envelope_is_one_skip_on_the_fast_path(payload, reason):
    path = DataPath.build(now=None)
    decoder = EventDecoder(path.pipeline.handle, path.pipeline.skip)
    decoder.feed(payload)
    assert path.state.counters.skipped_by_reason == {reason: 1}
    assert path.state.counters.events_by_type == {}


def test_free_text_is_cut_not_refused():
    """A 1 MB traceback still counts; what the sidecar keeps of it is bounded."""
    now = time.time()
    path = DataPath.build({}, now=now)
    recorder = Recorder()
    path.pipeline.add_sink(AlertEngine(path.config, path.view, recorder))
    failed = {**valid_event("task-failed", 1, now), "exception": "ValueError('" + "x" * (1 << 20) + "')",
              "traceback": "Traceback\n" * 200_000, "local_received": now}
    path.handle(failed)
    assert path.state.counters.events_by_type == {"task-failed": 1}
    [alert] = recorder.alerts
    assert alert.fields["Exception"] == "ValueError"
    assert len(alert.traceback) <= parse.MAX_TEXT and len(alert.text) <= 2000

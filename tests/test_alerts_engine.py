"""The alert engine's threshold decisions, in-process, on state folded from real event dicts."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry

from celery_sidecar.alerts.delivery.blocks import MessageRenderer
from celery_sidecar.alerts.delivery.dispatcher import build_dispatcher
from celery_sidecar.alerts.delivery.outbox import open_outbox
from celery_sidecar.alerts.delivery.slack import SlackSettings
from celery_sidecar.alerts.engine import AlertEngine
from celery_sidecar.alerts.model import Alert
from celery_sidecar.monitor.fold.records import WorkerInfo
from tests.support.inproc import DataPath, Recorder

T0 = 1_700_000_000.0


def engine_after(tmp_path: Path, config: dict, runs: int, retried: int) -> AlertEngine:
    """An engine whose state saw ``runs`` runs of app.flaky, the first ``retried`` retried once."""
    now = T0 + 100
    path = DataPath.build(config, now=now)
    pipeline = path.pipeline
    dispatcher = build_dispatcher(path.config, SlackSettings(), open_outbox("memory://", tmp_path),
                                  registry=CollectorRegistry(), instance_id="test")
    engine = AlertEngine(path.config, path.view, dispatcher)
    pipeline.add_sink(engine)
    for i in range(runs):
        uid, t = f"flaky-{i}", T0 + i
        pipeline.handle({"type": "task-sent", "uuid": uid, "name": "app.flaky", "queue": "celery",
                         "hostname": "p@x", "timestamp": t, "local_received": t})
        if i < retried:
            pipeline.handle({"type": "task-retried", "uuid": uid, "hostname": "w@x", "timestamp": t + 0.1,
                             "exception": "RetryError('again')", "local_received": t + 0.1})
        pipeline.handle({"type": "task-succeeded", "uuid": uid, "hostname": "w@x", "timestamp": t + 0.2,
                         "runtime": 0.1, "local_received": t + 0.2})
    pipeline.tick(now)
    return engine


def test_retry_rate_is_judged_only_after_the_configured_number_of_outcomes(tmp_path):
    key = ("retry_rate", "app.flaky")
    # 3 runs, 2 retried: 2 retries of 5 outcomes (40 %), above the 5 % limit.
    assert key not in engine_after(tmp_path / "a", {}, runs=3, retried=2).breaches, "default: 10 outcomes"
    lowered = engine_after(tmp_path / "b", {"thresholds": {"retry_rate_min_outcomes": 5}}, runs=3, retried=2)
    assert lowered.breaches[key].value == 0.4
    # 10 outcomes with the default: 6 runs, 4 retried.
    assert key in engine_after(tmp_path / "c", {}, runs=6, retried=4).breaches


def alerts_for(config: dict) -> list[Alert]:
    """A failure of app.flaky (with a traceback) and its retry storm breaching retry_rate, worker offline."""
    now = T0 + 100
    path = DataPath.build(config, now=now)
    recorder = Recorder()
    engine = AlertEngine(path.config, path.view, recorder)
    path.pipeline.add_sink(engine)
    path.at(T0).pipeline.set_connected(True)
    path.handle(
        {"type": "worker-heartbeat", "hostname": "w@x", "timestamp": T0, "local_received": T0, "freq": 2.0},
        {"type": "task-sent", "uuid": "f-1", "name": "app.flaky", "queue": "celery", "hostname": "p@x",
         "timestamp": T0, "local_received": T0},
        {"type": "task-failed", "uuid": "f-1", "hostname": "w@x", "timestamp": T0 + 1, "local_received": T0 + 1,
         "exception": "ValueError('boom')", "traceback": "Traceback (most recent call last):\nValueError: boom"},
    )
    for i in range(10):
        t = T0 + 2 + i
        path.handle(
            {"type": "task-sent", "uuid": f"r-{i}", "name": "app.flaky", "queue": "celery", "hostname": "p@x",
             "timestamp": t, "local_received": t},
            {"type": "task-retried", "uuid": f"r-{i}", "hostname": "w@x", "timestamp": t + 0.1,
             "exception": "RetryError('again')", "local_received": t + 0.1},
            {"type": "task-succeeded", "uuid": f"r-{i}", "hostname": "w@x", "timestamp": t + 0.2, "runtime": 0.1,
             "local_received": t + 0.2},
        )
    path.pipeline.tick(T0 + 20)
    path.at(T0 + 100).pipeline.tick(T0 + 100)  # the worker went silent long ago
    return recorder.alerts


def test_alerts_link_to_the_grafana_dashboard_that_shows_them_when_grafana_url_is_set():
    rules = {"retry_rate": {"for_seconds": 0}}
    linked = alerts_for({"alerts": {"grafana_url": "https://ops.example.com/grafana/", "rules": rules}})
    by_kind = {a.kind: a for a in linked}
    assert {"task_failed", "threshold", "worker_offline"} <= set(by_kind), [a.title for a in linked]
    task = "https://ops.example.com/grafana/d/celery-sidecar-task?var-task=app.flaky"
    assert by_kind["task_failed"].dashboard == f"{task}&var-queue=celery"
    assert by_kind["threshold"].title == "Retry rate above threshold: app.flaky"
    assert by_kind["threshold"].dashboard == task
    assert by_kind["worker_offline"].dashboard == "https://ops.example.com/grafana/d/celery-sidecar?var-hostname=w%40x"

    renderer = MessageRenderer()
    for alert in (by_kind["task_failed"], by_kind["threshold"]):
        message = renderer.message(alert)
        assert alert.dashboard in json.dumps(message.blocks) and alert.dashboard in message.plain
        assert "Open in Grafana" in json.dumps(message.blocks)

    unlinked = alerts_for({"alerts": {"rules": rules}})
    assert {a.kind for a in unlinked} == {a.kind for a in linked}
    assert all(a.dashboard is None for a in unlinked)
    for alert in unlinked:
        assert "Grafana" not in json.dumps(MessageRenderer().message(alert).blocks)


def worker_event(kind: str, at: float) -> dict:
    return {"type": f"worker-{kind}", "hostname": "w@x", "timestamp": at, "local_received": at, "freq": 2.0}


def shutdown_story(config: dict, away: float, outage: float = 0) -> list[Alert]:
    """A worker heartbeats, shuts down gracefully at T0 + 10, is away ``away`` seconds, and is
    back; the broker is unreachable for the first ``outage`` seconds of that."""
    path = DataPath.build(config, now=T0)
    recorder = Recorder()
    path.pipeline.add_sink(AlertEngine(path.config, path.view, recorder))
    path.pipeline.set_connected(True)
    path.handle(worker_event("online", T0), worker_event("heartbeat", T0 + 2))
    path.at(T0 + 10).handle(worker_event("offline", T0 + 10))
    for second in range(11, int(10 + away)):
        path.pipeline.set_connected(second >= 10 + outage)
        path.at(T0 + second).pipeline.tick(T0 + second)
    path.pipeline.set_connected(True)
    back = T0 + 10 + away
    path.at(back).handle(worker_event("online", back))
    path.pipeline.tick(back + 1)
    return recorder.alerts


def test_a_graceful_restart_within_the_grace_window_posts_nothing():
    assert shutdown_story({}, away=50) == []
    assert shutdown_story({"alerts": {"rules": {"worker_shutdown": {"for_seconds": 5}}}}, away=4) == []


def test_a_graceful_shutdown_past_the_grace_window_is_one_message_resolved_by_the_return():
    fired, back = shutdown_story({}, away=90)
    assert (fired.kind, fired.status, fired.severity) == ("worker_shutdown", "firing", "info")
    assert fired.title == "Worker shut down: w@x" and fired.created_at == T0 + 10
    assert "for 60 s" in fired.text, "posted as the default 60 s window closed"
    assert (back.status, back.group, back.severity) == ("resolved", fired.group, "info")
    assert back.title == "Worker back online: w@x"
    short = shutdown_story({"alerts": {"rules": {"worker_shutdown": {"for_seconds": 5}}}}, away=20)
    assert [a.status for a in short] == ["firing", "resolved"] and "for 5 s" in short[0].text


def test_the_grace_window_starts_again_when_an_unreachable_broker_is_back_and_a_disabled_rule_posts_nothing():
    # Away 90 s, the first 50 of them unseen: 40 s of the window have passed since the broker came back.
    assert shutdown_story({}, away=90, outage=50) == []
    assert [a.status for a in shutdown_story({}, away=120, outage=50)] == ["firing", "resolved"]
    assert shutdown_story({"alerts": {"rules": {"worker_shutdown": {"enabled": False}}}}, away=90) == []


def test_a_worker_reported_silent_that_then_shuts_down_gracefully_resolves_its_page():
    """Its heartbeats stopped (a partition), it was paged; then its worker-offline arrives: it was
    alive after all. That page resolves, and the shutdown is judged by its own rule from then on."""
    path = DataPath.build({}, now=T0)
    recorder = Recorder()
    path.pipeline.add_sink(AlertEngine(path.config, path.view, recorder))
    path.pipeline.set_connected(True)
    path.handle(worker_event("online", T0), worker_event("heartbeat", T0 + 2))
    path.at(T0 + 100).pipeline.tick(T0 + 100)
    [lost] = recorder.alerts
    assert (lost.kind, lost.status) == ("worker_offline", "firing")

    path.at(T0 + 101).handle(worker_event("offline", T0 + 101))
    [_, heard] = recorder.alerts
    assert (heard.status, heard.group, heard.kind) == ("resolved", lost.group, "worker_online")
    assert heard.title == "Worker heard from again: w@x"
    assert heard.text == "w@x was heard from again: it shut down gracefully (worker-offline)."

    # Back within the shutdown rule's 60 s: a restart, nothing more. Away past it: its own page.
    path.at(T0 + 130).handle(worker_event("online", T0 + 130))
    path.at(T0 + 131).pipeline.tick(T0 + 131)
    assert len(recorder.alerts) == 2
    path.at(T0 + 140).handle(worker_event("offline", T0 + 140))
    for second in range(141, 205):
        path.at(T0 + second).pipeline.tick(T0 + second)
    assert [(a.kind, a.status) for a in recorder.alerts[2:]] == [("worker_shutdown", "firing")]


def test_a_page_the_sidecar_cannot_see_through_is_held_not_resolved_and_not_paged_again():
    """A zombie worker is paged; the broker goes away for 90 s. Cut off, the sidecar has no news
    of it: nothing is resolved. Back, the worker is still a zombie: the same page stands."""
    path = DataPath.build({"thresholds": {"not_consuming_seconds": 5}}, now=T0)
    recorder = Recorder()
    path.pipeline.add_sink(AlertEngine(path.config, path.view, recorder))
    path.pipeline.set_connected(True)

    def heartbeat(at: float) -> None:
        path.at(at).handle({"type": "worker-heartbeat", "hostname": "w@x", "timestamp": at, "local_received": at,
                            "freq": 2.0, "active": 0, "processed": 0})

    heartbeat(T0)
    path.pipeline.record_inspection({"w@x": WorkerInfo(queues=("orders",), pool_max=2)})
    path.handle({"type": "task-sent", "uuid": "t", "name": "app.a", "queue": "orders", "hostname": "web@app",
                 "timestamp": T0, "local_received": T0})
    heartbeat(T0 + 9)
    path.at(T0 + 10).pipeline.tick(T0 + 10)
    assert [(a.title, a.status) for a in recorder.alerts] == [("Worker not consuming: w@x on orders", "firing")]

    path.pipeline.set_connected(False)
    for second in range(11, 100, 10):
        path.at(T0 + second).pipeline.tick(T0 + second)
    path.at(T0 + 100).pipeline.set_connected(True)
    for second in range(100, 130, 2):
        heartbeat(T0 + second)
        path.at(T0 + second).pipeline.tick(T0 + second)
    about_it = [(a.title, a.status) for a in recorder.alerts if "not consuming" in a.title]
    assert about_it == [("Worker not consuming: w@x on orders", "firing")]

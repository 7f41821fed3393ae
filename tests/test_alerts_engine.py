"""The alert engine's threshold decisions, in-process, on state folded from real event dicts."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from celery_sidecar.alerts.delivery import build_dispatcher
from celery_sidecar.alerts.engine import AlertEngine
from celery_sidecar.alerts.outbox import open_outbox
from celery_sidecar.alerts.slack import SlackSettings
from tests.support.inproc import DataPath

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

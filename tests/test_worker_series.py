"""The per-worker series say only what the sidecar can hear: none while it is cut off from the
broker, so a stale copy never holds a dead worker up (the max across HA sidecars would take it)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from celery_sidecar.exporters.collectors import StateCollector
from celery_sidecar.monitor.fold.records import WorkerInfo
from tests.support.inproc import DataPath
from tests.support.procs import Metrics

T0 = 1_700_000_000.0
HOST = "w1@host"
PER_WORKER = ("celery_worker_up", "celery_worker_tasks_active", "celery_worker_pool_utilization",
              "celery_sidecar_worker_task_events_enabled")
PER_QUEUE = ("celery_active_worker_count", "celery_active_process_count")


def scrape(path: DataPath) -> Metrics:
    registry = CollectorRegistry()
    registry.register(StateCollector(path.view, path.config))
    return Metrics(generate_latest(registry).decode())


def test_per_worker_series_are_absent_while_the_sidecar_cannot_hear_the_workers():
    path = DataPath.build({}, now=T0)
    path.pipeline.set_connected(True)
    path.handle({"type": "worker-online", "hostname": HOST, "timestamp": T0, "local_received": T0, "freq": 2.0},
                {"type": "worker-heartbeat", "hostname": HOST, "timestamp": T0 + 1, "local_received": T0 + 1,
                 "freq": 2.0, "active": 1, "processed": 0})
    path.pipeline.record_inspection({HOST: WorkerInfo(queues=("celery",), pool_max=4)})

    connected = scrape(path.at(T0 + 2))
    assert connected.get("celery_worker_up", hostname=HOST) == 1
    assert connected.get("celery_worker_tasks_active", hostname=HOST) == 1
    assert connected.get("celery_worker_pool_utilization", hostname=HOST) == 0.25
    assert connected.get("celery_active_worker_count", queue_name="celery") == 1
    assert connected.get("celery_active_process_count", queue_name="celery") == 4

    path.pipeline.set_connected(False)
    cut_off = scrape(path.at(T0 + 3))
    for family in PER_WORKER + PER_QUEUE:
        assert cut_off.all(family) == {}, family
    assert cut_off.get("celery_sidecar_broker_connected") == 0, "the reason is on /metrics"

    path.pipeline.set_connected(True)  # the heartbeat grace starts again: no worker is lost by the outage
    back = scrape(path.at(T0 + 60))
    assert back.get("celery_worker_up", hostname=HOST) == 1
    assert back.get("celery_active_worker_count", queue_name="celery") == 1

"""The per-worker series say only what the sidecar can hear: none while it is cut off from the
broker, so a stale copy never holds a dead worker up (the max across HA sidecars would take it),
and the zombie check counts only the time it could watch."""

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


def test_the_zombie_check_counts_only_the_time_the_sidecar_could_watch():
    """A broker outage is no evidence of a zombie: a worker that received a task just before it
    is not one after it, with tasks still waiting; one that took nothing before it still is."""
    path = DataPath.build({"thresholds": {"not_consuming_seconds": 5}}, now=T0)
    path.pipeline.set_connected(True)
    for host in ("healthy@h", "zombie@h"):
        path.handle({"type": "worker-online", "hostname": host, "timestamp": T0, "local_received": T0,
                     "freq": 2.0})
    path.pipeline.record_inspection({h: WorkerInfo(queues=("orders",), pool_max=4)
                                     for h in ("healthy@h", "zombie@h")})
    path.handle({"type": "task-sent", "uuid": "t1", "name": "app.a", "queue": "orders", "hostname": "web@app",
                 "timestamp": T0, "local_received": T0},
                {"type": "task-sent", "uuid": "t2", "name": "app.a", "queue": "orders", "hostname": "web@app",
                 "timestamp": T0 + 1, "local_received": T0 + 1})  # waits on
    path.at(T0 + 9).handle({"type": "task-received", "uuid": "t1", "name": "app.a", "hostname": "healthy@h",
                            "timestamp": T0 + 9, "local_received": T0 + 9})
    for host in ("healthy@h", "zombie@h"):
        path.handle({"type": "worker-heartbeat", "hostname": host, "timestamp": T0 + 9, "local_received": T0 + 9,
                     "freq": 2.0, "active": 0, "processed": 0})
    before = {row.hostname: row.consuming for row in path.view.snapshot(T0 + 10).consuming}
    assert before == {"healthy@h": True, "zombie@h": False}
    path.at(T0 + 10).pipeline.set_connected(False)

    blind = path.at(T0 + 100).view.snapshot(T0 + 100)
    assert blind.consuming == (), "cut off, silence is no evidence"
    assert scrape(path).all("celery_worker_consuming") == {}

    path.at(T0 + 100).pipeline.set_connected(True)
    for host in ("healthy@h", "zombie@h"):  # heartbeats again
        path.handle({"type": "worker-heartbeat", "hostname": host, "timestamp": T0 + 100,
                     "local_received": T0 + 100, "freq": 2.0, "active": 0, "processed": 0})
    after = {row.hostname: row for row in path.at(T0 + 101).view.snapshot(T0 + 101).consuming}
    assert after["healthy@h"].consuming and after["healthy@h"].idle_seconds == 2.0, "1 s before the outage, 1 after"
    assert not after["zombie@h"].consuming and after["zombie@h"].idle_seconds == 11.0, "10 s before it, 1 after"
    assert scrape(path).get("celery_worker_consuming", hostname="zombie@h", queue_name="orders") == 0

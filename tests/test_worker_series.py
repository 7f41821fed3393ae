"""What the sidecar says of workers is what it can hear: a live worker is "up" only while it is
heard (a stale copy would hold a dead worker up under the max across HA sidecars), and the
zombie check counts only the time the sidecar could watch."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from celery_sidecar.exporters.collectors import StateCollector
from celery_sidecar.monitor.fold.records import WorkerInfo
from tests.support.inproc import DataPath
from tests.support.procs import Metrics

T0 = 1_700_000_000.0
HOST, DEAD = "w1@host", "w2@host"


def scrape(path: DataPath) -> Metrics:
    registry = CollectorRegistry()
    registry.register(StateCollector(path.view, path.config))
    return Metrics(generate_latest(registry).decode())


def heartbeat(path: DataPath, host: str, at: float) -> None:
    path.at(at).handle({"type": "worker-heartbeat", "hostname": host, "timestamp": at, "local_received": at,
                        "freq": 2.0, "active": 1, "processed": 0})


def test_a_live_worker_is_up_only_while_the_sidecar_hears_it_and_a_dead_one_is_down_throughout():
    path = DataPath.build({}, now=T0)
    path.pipeline.set_connected(True)
    heartbeat(path, HOST, T0)
    heartbeat(path, DEAD, T0)
    path.pipeline.record_inspection({HOST: WorkerInfo(queues=("celery",), pool_max=4)})
    for second in range(2, 20, 2):  # DEAD falls silent: lost after 2 x 2 s + the grace
        heartbeat(path, HOST, T0 + second)
        path.at(T0 + second).pipeline.tick(T0 + second)

    connected = scrape(path.at(T0 + 19))
    assert connected.get("celery_worker_up", hostname=HOST) == 1
    assert connected.get("celery_worker_up", hostname=DEAD) == 0
    assert connected.get("celery_worker_pool_utilization", hostname=HOST) == 0.25

    path.pipeline.set_connected(False)
    cut_off = scrape(path.at(T0 + 60))
    assert cut_off.get("celery_worker_up", hostname=HOST) is None, "it may have died meanwhile: no 1"
    assert cut_off.get("celery_worker_up", hostname=DEAD) == 0, "a 0 holds nothing up"
    assert cut_off.get("celery_worker_tasks_active", hostname=HOST) == 1, "what it last reported"
    assert cut_off.get("celery_sidecar_broker_connected") == 0, "the reason is on /metrics"

    path.at(T0 + 60).pipeline.set_connected(True)  # a fresh heartbeat grace: nobody is lost by the outage
    back = scrape(path.at(T0 + 61))
    assert back.get("celery_worker_up", hostname=HOST) is None, "not up again before it says so"
    heartbeat(path, HOST, T0 + 62)
    assert scrape(path.at(T0 + 62)).get("celery_worker_up", hostname=HOST) == 1


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

    blind = {row.hostname: row.consuming for row in path.at(T0 + 100).view.snapshot(T0 + 100).consuming}
    assert blind == before, "cut off, silence is no evidence: the verdicts stay as they were"
    assert scrape(path).get("celery_worker_consuming", hostname="zombie@h", queue_name="orders") == 0

    path.at(T0 + 100).pipeline.set_connected(True)
    for host in ("healthy@h", "zombie@h"):  # heartbeats again
        path.handle({"type": "worker-heartbeat", "hostname": host, "timestamp": T0 + 100,
                     "local_received": T0 + 100, "freq": 2.0, "active": 0, "processed": 0})
    after = {row.hostname: row for row in path.at(T0 + 101).view.snapshot(T0 + 101).consuming}
    assert after["healthy@h"].consuming and after["healthy@h"].idle_seconds == 2.0, "1 s before the outage, 1 after"
    assert not after["zombie@h"].consuming and after["zombie@h"].idle_seconds == 11.0, "10 s before it, 1 after"
    assert scrape(path).get("celery_worker_consuming", hostname="zombie@h", queue_name="orders") == 0

"""The watcher against a real Redis broker and real Celery workers, observed on /metrics."""

from __future__ import annotations

import time

import httpx

from tests.support.clients import producer


def test_succeeded_failed_and_retried_tasks_are_counted(redis_srv, sidecar, worker):
    side = sidecar(redis_srv.url)
    worker(redis_srv.url, name="w1")
    app = producer(redis_srv.url)
    for _ in range(4):
        app.send_task("demo.ok", kwargs={"x": 1, "y": 2})
    for _ in range(3):
        app.send_task("demo.fail", kwargs={"reason": "secret-value-123"})
    app.send_task("demo.flaky", kwargs={"p_fail": 1.0})  # retries 3 times, then fails

    side.wait_metric("celery_task_succeeded_total", lambda v: v == 4, name="demo.ok")
    side.wait_metric("celery_task_failed_total", lambda v: v == 3, name="demo.fail")
    side.wait_metric("celery_task_retried_total", lambda v: v == 3, name="demo.flaky")
    side.wait_metric("celery_task_failed_total", lambda v: v == 1, name="demo.flaky")
    # task-sent comes from the producer, not the worker: it can arrive after the worker's events.
    side.wait_metric("celery_task_sent_total", lambda v: v == 4, name="demo.ok", queue_name="celery")
    metrics = side.metrics()
    # The exception label is the class, never the message (cardinality, and secrets).
    assert metrics.get("celery_task_failed_total", name="demo.fail", exception="DemoError") == 3
    assert "secret-value-123" not in metrics.text
    assert metrics.get("celery_task_started_total", name="demo.ok", hostname=next(
        dict(lbl)["hostname"] for lbl in metrics.all("celery_worker_up"))) == 4
    assert metrics.get("celery_task_runtime_count", name="demo.ok") == 4
    assert metrics.get("celery_task_queue_wait_time_count", name="demo.ok") == 4
    # flaky: 3 retries and 1 final failure in the window -> 3 / 4.
    assert metrics.get("celery_task_retry_ratio", name="demo.flaky") == 0.75
    assert metrics.get("celery_sidecar_latency_source", source="sent") == 1


def test_queue_length_counts_priority_sub_queues_and_key_prefix(redis_srv, sidecar, tmp_path):
    options = {"global_keyprefix": "app1:", "priority_steps": list(range(10)), "sep": ":", "queue_order_strategy":
               "priority"}
    config = tmp_path / "sidecar.yml"
    config.write_text("queues: [backlog, never_used]\n")
    side = sidecar(redis_srv.url, "--transport-options", __import__("json").dumps(options), config=config)
    app = producer(redis_srv.url, broker_transport_options=options)
    for priority in (0, 0, 3, 5, 9, 9, 9):
        app.send_task("demo.ok", queue="backlog", priority=priority)

    # Nothing consumes 'backlog': every message waits, spread over priority sub-queues.
    keys = redis_srv.client().keys("app1:backlog*")
    assert len(keys) > 1, f"expected priority sub-queues, got {keys}"
    side.wait_metric("celery_queue_length", lambda v: v == 7, queue_name="backlog")
    metrics = side.metrics()
    assert metrics.get("celery_queue_length", queue_name="never_used") == 0
    assert metrics.get("celery_sidecar_probe_errors_total", probe="queue_length") == 0
    assert metrics.get("celery_threshold", signal="queue_length", level="normal", queue_name="backlog") == 100


def test_sigkilled_worker_goes_down_within_twice_heartbeat_plus_grace(redis_srv, sidecar, worker):
    side = sidecar(redis_srv.url)
    victim = worker(redis_srv.url, name="victim")
    hostname = side.wait_worker_up("victim")

    victim.kill()  # SIGKILL the whole process group: no worker-offline event is sent
    killed_at = time.monotonic()
    side.wait_metric("celery_worker_up", lambda v: v == 0, timeout=20, hostname=hostname)
    took = time.monotonic() - killed_at
    # Default heartbeat freq 2 s and grace 2 s: 2*2+2 = 6 s, plus up to 1 s of tick and 0.2 s of polling.
    assert took <= 7.5, f"worker went down after {took:.1f}s"
    # The series goes to 0; it does not vanish.
    assert side.metrics().get("celery_worker_up", hostname=hostname) == 0
    _, health = side.health()
    assert health["workers"][hostname] == "down"


def test_redis_restart_mid_stream_metrics_resume(redis_srv, sidecar, worker):
    side = sidecar(redis_srv.url)
    worker(redis_srv.url, name="w1")
    app = producer(redis_srv.url)
    app.send_task("demo.ok")
    side.wait_metric("celery_task_succeeded_total", lambda v: v == 1, name="demo.ok", timeout=30)

    redis_srv.stop()
    health = side.wait_health(503, timeout=15)
    assert health["broker"]["connected"] is False and health["broker"]["last_error"]
    redis_srv.restart()

    side.wait_health(200, timeout=40)
    assert side.metrics().get("celery_sidecar_reconnects_total") >= 1
    # Workers reconnect on their own; new tasks are counted without restarting the sidecar.
    side.wait_metric("celery_worker_up", lambda v: v == 1, timeout=40)
    app = producer(redis_srv.url)
    for _ in range(3):
        app.send_task("demo.ok")
    side.wait_metric("celery_task_succeeded_total", lambda v: v == 4, name="demo.ok", timeout=40)
    assert "reconnecting" in side.log()


def test_invalid_config_edit_is_refused_and_a_valid_one_applies_live(redis_srv, sidecar, tmp_path):
    config = tmp_path / "sidecar.yml"
    config.write_text("thresholds:\n  queue_length: {normal: 100, peak: 1000}\n")
    side = sidecar(redis_srv.url, config=config)
    assert side.metrics().get("celery_threshold", signal="queue_length", level="normal", queue_name="celery") == 100

    config.write_text("thresholds:\n  queue_length: {normal: many}\n")
    side.wait_metric("celery_sidecar_config_reloads_total", lambda v: v == 1, result="error", timeout=10)
    status, health = side.health()
    assert status == 200, "a refused edit keeps the previous config live; the sidecar still works"
    assert health["config"]["valid"] is False
    assert "thresholds.queue_length.normal" in health["config"]["error"]
    assert side.metrics().get("celery_threshold", signal="queue_length", level="normal", queue_name="celery") == 100
    assert "config edit refused" in side.log()

    config.write_text("thresholds:\n  queue_length: {normal: 250, peak: 2500}\n  retry_rate_percent: 10\n")
    side.wait_metric("celery_threshold", lambda v: v == 250, signal="queue_length", level="normal",
                     queue_name="celery", timeout=10)
    # The new thresholds are live a moment before the reload is reported: wait for the report.
    side.wait_metric("celery_sidecar_config_valid", lambda v: v == 1)
    assert side.metrics().get("celery_threshold", signal="retry_ratio", level="limit") == 0.10
    assert side.health()[1]["config"]["error"] is None


def test_worker_without_task_events_is_detected_and_enable_events_fixes_it(redis_srv, sidecar, worker):
    side = sidecar(redis_srv.url)
    worker(redis_srv.url, name="quiet", events=False, app="tests.support.plain_app")
    app = producer(redis_srv.url, sent_events=False)
    side.wait_metric("celery_worker_up", lambda v: v == 1, timeout=30)
    for _ in range(3):
        app.send_task("plain.ok")
    side.wait_metric("celery_sidecar_worker_task_events_enabled", lambda v: v == 0, timeout=30)
    side.wait_log("sends heartbeats but no task events", timeout=5)
    assert "quiet@" in side.log() and "-E" in side.log()
    assert side.metrics().sum("celery_task_succeeded_total") == 0

    # A second sidecar with --enable-events turns them on through remote control.
    fixer = sidecar(redis_srv.url, "--enable-events")
    # The tasks above ran before the fixer started, so they are no evidence to it (a worker with
    # -E that ran them would look the same now): it needs to see the worker work without events.
    fixer.wait_metric("celery_sidecar_events_total", lambda v: v >= 2, type="worker-heartbeat", timeout=30)
    app.send_task("plain.ok")
    fixer.wait_log("sent enable_events", timeout=40)
    app.send_task("plain.ok")
    fixer.wait_metric("celery_task_succeeded_total", lambda v: v >= 1, name="plain.ok", timeout=30)
    fixer.wait_metric("celery_sidecar_worker_task_events_enabled", lambda v: v == 1, timeout=10)


def test_metrics_and_health_endpoints(redis_srv, sidecar):
    side = sidecar(redis_srv.url)
    health = side.wait_health(200, timeout=10)
    assert health["broker"]["url"] == redis_srv.url and health["broker"]["connected"]
    assert health["latency_source"] in ("sent", "received")
    assert httpx.get(f"{side.url}/nope").status_code == 404
    for threshold, value in [({"signal": "latency_seconds", "level": "normal"}, 5),
                             ({"signal": "latency_seconds", "level": "heavy"}, 30),
                             ({"signal": "worker_cpu_percent"}, 80), ({"signal": "worker_memory_percent"}, 70),
                             ({"signal": "retry_ratio"}, 0.05), ({"signal": "retry_min_outcomes"}, 10),
                             ({"signal": "queue_length", "level": "peak", "queue_name": "celery"}, 1000)]:
        assert side.metrics().get("celery_threshold", **threshold) == value, threshold


def test_ovalmoney_compat_family_for_dashboard_11497(redis_srv, sidecar, worker):
    side = sidecar(redis_srv.url, "--compat", "ovalmoney", "--namespace", "shop")
    worker(redis_srv.url, name="w1")
    app = producer(redis_srv.url)
    for _ in range(2):
        app.send_task("demo.ok")
    app.send_task("demo.fail")
    side.wait_metric("celery_tasks_total", lambda v: v == 2, name="demo.ok", state="SUCCESS", namespace="shop")
    # demo.fail may still run after both demo.ok are done.
    side.wait_metric("celery_tasks_total", lambda v: v == 1, name="demo.fail", state="FAILURE", namespace="shop")
    metrics = side.metrics()
    assert metrics.get("celery_tasks_total", name="demo.fail", state="FAILURE", queue="celery") == 1
    assert metrics.get("celery_tasks_runtime_seconds_count", name="demo.ok", namespace="shop") == 2
    assert metrics.get("celery_tasks_latency_seconds_count", name="demo.ok", namespace="shop") == 2
    assert metrics.get("celery_workers", namespace="shop") == 1
    side.wait_log("latency source: task-sent events arrive", timeout=5)


def test_an_edit_with_a_broken_alert_template_is_refused_whole(redis_srv, sidecar, tmp_path):
    config = tmp_path / "sidecar.yml"
    config.write_text("thresholds: {worker_cpu_percent: 80}\n")
    side = sidecar(redis_srv.url, config=config)
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "task_failed.json.j2").write_text('[{"type": "section", {{ broken')

    # The thresholds in this edit are valid; the template is not: nothing of it may apply.
    config.write_text(f"thresholds: {{worker_cpu_percent: 50}}\nalerts: {{templates_dir: {templates}}}\n")
    side.wait_metric("celery_sidecar_config_reloads_total", lambda v: v == 1, result="error", timeout=10)
    assert "task_failed.json.j2" in side.health()[1]["config"]["error"]
    assert side.metrics().get("celery_threshold", signal="worker_cpu_percent") == 80
    assert side.health()[0] == 200

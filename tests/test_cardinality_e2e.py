"""Series before their first event and the cardinality controls, on a real sidecar: a private
redis-server, a real Celery worker, ``celery-sidecar run`` scraped over HTTP, and for the
PromQL a real Prometheus scraping it (the in-process tier: tests/test_cardinality_controls.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support.clients import producer
from tests.support.configs import write_config
from tests.support.paths import SIDECAR, SUITE, child_env
from tests.support.procs import Metrics, Process, SidecarProcess
from tests.support.servers import free_port, wait_for

pytestmark = pytest.mark.e2e


def families(metrics: Metrics) -> set[str]:
    return {name for (name, _labels) in metrics.samples}


def label_values(metrics: Metrics, label: str, family: str | None = None) -> set[str]:
    return {dict(labels)[label] for (name, labels) in metrics.samples
            if label in dict(labels) and (family is None or name == family)}


def wait_until(sidecar: SidecarProcess, check: Callable[[Metrics], bool], what: str, timeout: float = 20) -> Metrics:
    """Scrape until ``check`` holds; the scrape that satisfied it."""
    last: list[Metrics] = []

    def holds() -> bool:
        last[:] = [sidecar.metrics()]
        return check(last[0])

    sidecar._wait(holds, timeout, lambda: what)
    return last[0]


# -- PromQL on a live Prometheus ----------------------------------------------------------------


class Prometheus:
    """A Prometheus scraping one target every second, with nothing else configured."""

    def __init__(self, procs: list[Process], tmp: Path, target: str) -> None:
        config = tmp / "prometheus.yml"
        config.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                          f"scrape_configs: [{{job_name: sidecar, static_configs: [{{targets: ['{target}']}}]}}]\n")
        port = free_port()
        self.api = f"http://127.0.0.1:{port}/api/v1"
        self.proc = Process("prometheus", ["prometheus", f"--config.file={config}",
                                           f"--storage.tsdb.path={tmp / 'tsdb'}",
                                           f"--web.listen-address=127.0.0.1:{port}"], child_env(), cwd=tmp)
        procs.append(self.proc)
        wait_for(self._ready, timeout=30, interval=0.2, what="Prometheus ready")

    def _ready(self) -> bool:
        if self.proc.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.proc.log()[-3000:]}")
        return httpx.get(self.api.replace("/api/v1", "/-/ready"), timeout=2).status_code == 200

    def query(self, expr: str) -> dict[str, float]:
        """``expr``'s instant vector, by its ``name`` label."""
        body = httpx.get(f"{self.api}/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", body
        return {r["metric"].get("name", ""): float(r["value"][1]) for r in body["data"]["result"]}

    def wait(self, expr: str, check: Callable[[dict[str, float]], bool], timeout: float = 60) -> dict[str, float]:
        last: list[dict[str, float]] = [{}]

        def holds() -> bool:
            last[0] = self.query(expr)
            return check(last[0])

        try:
            wait_for(holds, timeout=timeout, interval=0.5, what=expr)
        except TimeoutError:
            raise AssertionError(f"{expr}: last {last[0]}") from None
        return last[0]


SUCCESS_RATE = ("sum by (name) (celery_task_succeeded_total) / (sum by (name) (celery_task_succeeded_total)"
                " + sum by (name) (celery_task_failed_total))")


@pytest.mark.skipif(not shutil.which("prometheus"), reason="needs Prometheus (Debian's prometheus package)")
def test_the_success_rate_join_and_the_first_failures_increase_on_a_live_prometheus(
        redis_srv, sidecar, worker, procs, tmp_path):
    side = sidecar(redis_srv.url)
    worker(redis_srv.url, name="rate")
    side.wait_worker_up("rate")
    prometheus = Prometheus(procs, tmp_path, f"127.0.0.1:{side.port}")
    prometheus.wait('up{job="sidecar"}', lambda r: list(r.values()) == [1.0])

    # From here on only Prometheus scrapes the sidecar: a new series is served at 0 by one
    # scrape, whoever makes it, and that 0 is what Prometheus's increase() starts from.
    client = producer(redis_srv.url)
    for _ in range(2):
        client.send_task("demo.ok")
    client.send_task("demo.fail", kwargs={"reason": "first and only"})

    rates = prometheus.wait(SUCCESS_RATE, lambda r: r.get("demo.ok") == 1.0 and "demo.fail" in r)
    assert rates == {"demo.ok": 1.0, "demo.fail": 0.0}, "both sides of the join exist for both tasks"

    # demo.fail's first event ever was this run, and its failure (a series of its own: the
    # exception class) came with it: increase() still sees the one failure. Prometheus
    # extrapolates to the end of the range, by less as samples gather: wait for that to settle.
    prometheus.wait('sum by (name) (increase(celery_task_failed_total{name="demo.fail"}[1m]))',
                    lambda r: 0.95 <= r.get("demo.fail", 0) <= 1.05)
    prometheus.wait('sum by (name) (increase(celery_task_succeeded_total{name="demo.ok"}[1m]))',
                    lambda r: 1.9 <= r.get("demo.ok", 0) <= 2.1)
    assert prometheus.query('sum by (name) (celery_task_failed_total{name="demo.fail"})') == {"demo.fail": 1.0}


# -- each control, through a scrape and through a hot reload ------------------------------------

INITIAL = {
    "exclude_tasks": ["demo.slow"],
    "drop_labels": {"celery_task_runtime": ["hostname"]},
    "disable_families": ["celery_task_queue_wait_time", "celery_worker_rss_bytes"],
    "buckets": {"runtime_seconds": [0.5, 5]},
}


def test_each_control_shapes_a_real_scrape_and_follows_a_hot_reload(redis_srv, sidecar, worker, tmp_path):
    config = write_config(tmp_path / "sidecar.yml", cardinality=INITIAL)
    side = sidecar(redis_srv.url, config=config, env={"SIDECAR_STATIC_LABELS": "cluster=eu-1, team=ops"})
    worker(redis_srv.url, name="controls")
    host = side.wait_worker_up("controls")
    client = producer(redis_srv.url)
    for _ in range(2):
        client.send_task("demo.ok")
    client.send_task("demo.slow", kwargs={"seconds": 0.1})
    side.wait_metric("celery_task_succeeded_total", lambda v: v == 2, timeout=30, name="demo.ok")
    m = wait_until(side, lambda m: m.sum("celery_task_latency_seconds_count") == 3, "the three queue waits")

    assert "demo.slow" not in label_values(m, "name"), "excluded: no series in any family"
    assert label_values(m, "hostname", "celery_task_runtime_count") == set(), "hostname dropped"
    assert m.get("celery_task_runtime_count", name="demo.ok") == 2
    assert label_values(m, "le", "celery_task_runtime_bucket") == {"0.5", "5.0", "+Inf"}
    assert m.get("celery_task_succeeded_total", name="demo.ok", hostname=host) == 2, "other families keep it"
    assert not {"celery_task_queue_wait_time_count", "celery_worker_rss_bytes"} & families(m)
    assert "# HELP celery_task_queue_wait_time " not in m.text, "a family turned off is left out entirely"
    unlabelled = {name for (name, labels) in m.samples if {("cluster", "eu-1"), ("team", "ops")} - labels}
    assert unlabelled == set(), "SIDECAR_STATIC_LABELS is on every series"

    write_config(config, cardinality={"generic_hostname": True, "buckets": {"runtime_seconds": [1, 10, 100]}})
    side.wait_metric("celery_sidecar_config_reloads_total", lambda v: v == 1, result="ok")
    assert side.metrics().get("celery_sidecar_config_valid") == 1
    # No task event is needed for the new controls to show.
    # The reload reaches the families on the next tick and render: wait for all of it at once.
    turned_on = {"celery_task_queue_wait_time_count", "celery_worker_rss_bytes"}
    m = wait_until(side, lambda m: label_values(m, "le", "celery_task_runtime_bucket") == {"1.0", "10.0", "100.0",
                                                                                          "+Inf"}
                   and turned_on <= families(m) and label_values(m, "hostname", "celery_task_succeeded_total")
                   == {"generic"}, "the new runtime buckets, the families turned on and hostname=generic")
    assert m.get("celery_task_succeeded_total", name="demo.ok") == 2, "summed into hostname=generic"
    client.send_task("demo.slow", kwargs={"seconds": 0.1})
    side.wait_metric("celery_task_succeeded_total", lambda v: v == 1, timeout=30, name="demo.slow")

    # A refused edit: the previous controls stay live.
    write_config(config, cardinality={"drop_labels": {"celery_worker_up": ["hostname"]}})
    side.wait_metric("celery_sidecar_config_valid", lambda v: v == 0)
    assert side.metrics().get("celery_sidecar_config_reloads_total", result="error") == 1
    assert "celery_worker_up" in side.health()[1]["config"]["error"]
    m = side.metrics()
    assert label_values(m, "hostname", "celery_task_succeeded_total") == {"generic"}
    assert label_values(m, "le", "celery_task_runtime_bucket") == {"1.0", "10.0", "100.0", "+Inf"}


def test_a_gone_workers_series_are_forgotten_in_every_family(redis_srv, sidecar, worker, tmp_path):
    config = write_config(tmp_path / "sidecar.yml", state={"worker_forget_seconds": 2, "heartbeat_grace_seconds": 1})
    side = sidecar(redis_srv.url, config=config)
    name = f"gone-{uuid.uuid4().hex[:6]}"
    victim = worker(redis_srv.url, name=name)
    host = side.wait_worker_up(name)
    producer(redis_srv.url).send_task("demo.ok")
    side.wait_metric("celery_task_succeeded_total", lambda v: v == 1, timeout=30, hostname=host)
    with_host = wait_until(side, lambda m: "celery_worker_consuming" in families(m), "inspection of the worker")
    held = {name for (name, labels) in with_host.samples if ("hostname", host) in labels}
    assert {"celery_worker_up", "celery_task_failed_total", "celery_worker_consuming",
            "celery_sidecar_task_events_expected_total"} <= held

    victim.stop()  # worker-offline, then forgotten 2 s later
    m = wait_until(side, lambda m: host not in label_values(m, "hostname"), f"{host}'s series to go", timeout=30)
    assert m.all("celery_worker_up", hostname=host) == {}


# -- refusals at the command line ----------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *SIDECAR, *args], capture_output=True, text=True, cwd=SUITE,
                          env=child_env(**(env or {})), timeout=60)


def test_config_check_refuses_a_family_that_is_not_there(tmp_path):
    config = write_config(tmp_path / "sidecar.yml", cardinality={"disable_families": ["celery_task_sendt_total"]})
    result = run_cli("config", "check", str(config))
    assert result.returncode == 1
    assert "cardinality.disable_families: 'celery_task_sendt_total' is not a family" in result.stderr
    assert str(config) in result.stderr


@pytest.mark.parametrize(("args", "env", "says"), [
    (("--static-label", "hostname=x"), None, "'hostname' is a label of the sidecar's own families"),
    (("--static-label", "cluster"), None, "'cluster' is not NAME=VALUE"),
    ((), {"SIDECAR_STATIC_LABELS": "a=1,a=2"}, "'a' is given twice"),
])
def test_a_static_label_that_cannot_work_is_refused_at_start(args, env, says):
    result = run_cli("run", "--broker-url", "redis://127.0.0.1:1/0", "--port", "0", *args, env=env)
    assert result.returncode == 2 and says in result.stderr, result.stderr


def test_the_static_label_flag_labels_a_real_scrape(redis_srv, sidecar):
    side = sidecar(redis_srv.url, "--static-label", "cluster=eu-1", "--static-label", "region=west")
    m = side.metrics()
    assert len(families(m)) > 30 and any(name.startswith("process_") for name in families(m))
    assert all({("cluster", "eu-1"), ("region", "west")} <= labels for (_name, labels) in m.samples)

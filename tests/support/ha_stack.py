"""Two sidecars on one broker, scraped by one Prometheus: the README's redundancy, as a
Kubernetes ServiceMonitor on a two-replica Deployment would scrape it.

redis-server, the live stack's worker, two sidecars (the stack's command line and config) and
Prometheus with the shipped rules, from the configs `celery-sidecar render` writes; the one
difference from compose is a second target in the celery-sidecar job. No traffic of its own:
the test sends what it counts (``send``). No nginx, Flower or Chromium: tests/test_stack_live.py
covers those.
"""

from __future__ import annotations

import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import yaml
from celery import Celery

from celery_sidecar.render import StackSettings, render_stack
from tests.support.paths import ARTIFACTS
from tests.support.servers import free_port, redis_server, wait_for
from tests.support.stack import (
    PASSWORD,
    SIDECAR_CONFIG,
    USER,
    Processes,
    _wait_http,
    start_prometheus,
    start_sidecar,
    start_worker,
)
from tests.support.tier import require_e2e

JOB = "celery-sidecar"
ALERTS_GROUP = "celery-sidecar.alerts"
EVALUATION_INTERVAL = 1.0  # the scrape interval below; render uses it for rule evaluation too


@dataclass
class TwoSidecars:
    procs: Processes
    broker_url: str
    prometheus_api: str
    instances: tuple[str, str]  # each sidecar's `instance` label, host:port
    producer: Celery
    http: httpx.Client  # one connection for the test's hundreds of queries

    def query(self, expr: str, at: float | None = None) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query: {its series' labels, sorted: value}."""
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        body = self.http.get(f"{self.prometheus_api}/query", params=params).json()
        if body.get("status") != "success":
            raise AssertionError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        return {tuple(sorted(s["metric"].items())): float(s["value"][1]) for s in body["data"]["result"]}

    def per_sidecar(self, expr: str) -> dict[str, float]:
        """``expr`` summed per sidecar: {instance: value}, for the sidecars that have it."""
        return {dict(labels)["instance"]: value for labels, value in self.query(f"sum by (instance) ({expr})").items()}

    def api(self, path: str) -> dict:
        return self.http.get(f"{self.prometheus_api}/{path}").json()["data"]

    def active_alerts(self) -> list[dict]:
        """Prometheus's pending and firing alerts, with their labels and value."""
        return self.api("alerts")["alerts"]

    def check_alive(self, *stopped: str) -> None:
        """An AssertionError once a process the test did not stop has exited."""
        dead = {n: p.returncode for n, p in self.procs.procs.items() if n not in stopped and p.poll() is not None}
        if dead:
            raise AssertionError(f"processes exited early: {dead}; logs in {self.procs.logdir}")

    def send(self, name: str, count: int, **kwargs: object) -> None:
        for _ in range(count):
            self.producer.send_task(name, kwargs=kwargs, queue="celery")

    def stop_worker(self) -> None:
        """A warm shutdown: the worker says it goes offline (worker-offline) and exits."""
        worker = self.procs.procs["worker"]
        with suppress(ProcessLookupError):
            worker.send_signal(signal.SIGTERM)  # the leader only: it stops its pool itself
        worker.wait(30)

    def wait_evaluated_after(self, moment: float, *stopped: str) -> None:
        """Until an evaluation of the alert rules that started after ``moment`` has finished:
        the group's next evaluation has started after it (groups evaluate one at a time)."""
        def evaluated() -> bool:
            self.check_alive(*stopped)
            [group] = [g for g in self.api("rules")["groups"] if g["name"] == ALERTS_GROUP]
            return _unix(group["lastEvaluation"]) > moment + EVALUATION_INTERVAL * 1.5

        wait_for(evaluated, timeout=20, interval=0.2, what=f"an evaluation of {ALERTS_GROUP} after {moment}")


def _unix(rfc3339: str) -> float:
    """Prometheus's RFC 3339 timestamps (nanoseconds, Z) as Unix time."""
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", rfc3339).replace("Z", "+00:00")).timestamp()


def _scrape_both(config: Path, targets: list[str]) -> None:
    """The rendered prometheus.yml with both sidecars as targets of the one celery-sidecar job,
    and nothing else scraped (no Flower here)."""
    prometheus = yaml.safe_load(config.read_text())
    [job] = [j for j in prometheus["scrape_configs"] if j["job_name"] == JOB]
    job["static_configs"] = [{"targets": targets}]
    prometheus["scrape_configs"] = [job]
    config.write_text(yaml.safe_dump(prometheus, sort_keys=False))


@contextmanager
def two_sidecars() -> Iterator[TwoSidecars]:
    require_e2e("two sidecars and Prometheus")
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-ha-"))
    logs = tmp / "logs"
    logs.mkdir()
    procs = Processes(logs)
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        cleanup.callback(shutil.copytree, logs, ARTIFACTS / "ha-stack-logs", dirs_exist_ok=True)
        cleanup.callback(procs.stop_all)
        redis = cleanup.enter_context(redis_server())
        ports = {name: free_port() for name in ("a", "b", "prometheus")}
        out = tmp / "rendered"
        render_stack(StackSettings(
            allow_cidrs=("127.0.0.1/32",), flower_user=USER, flower_password=PASSWORD,
            listen=f"127.0.0.1:{free_port()}", sidecar_addr=f"127.0.0.1:{ports['a']}",
            flower_addr=f"127.0.0.1:{free_port()}", prometheus_addr=f"127.0.0.1:{ports['prometheus']}",
            grafana_addr=f"127.0.0.1:{free_port()}", resolver="127.0.0.1", prometheus_ui=True,
            scrape_interval=f"{EVALUATION_INTERVAL:g}s", rules_path=str(out / "prometheus" / "rules" / "*.yml"),
        ), out)
        instances = (f"127.0.0.1:{ports['a']}", f"127.0.0.1:{ports['b']}")
        _scrape_both(out / "prometheus" / "prometheus.yml", list(instances))
        (tmp / "sidecar.yml").write_text(SIDECAR_CONFIG)

        start_worker(procs, redis.url, tmp)
        urls = [start_sidecar(procs, redis.url, ports[name], tmp / "sidecar.yml", name=f"sidecar-{name}")
                for name in ("a", "b")]
        prom = start_prometheus(procs, out / "prometheus" / "prometheus.yml", tmp, ports["prometheus"])
        for url in urls:
            _wait_http(f"{url}/health", procs, f"{url}/health", ok=(200, 503))
        _wait_http(f"{prom}/-/ready", procs, "prometheus")

        producer = Celery("ha-producer", broker=redis.url)
        producer.conf.update(task_send_sent_event=True, broker_connection_retry_on_startup=True)
        cleanup.callback(producer.close)
        http = cleanup.enter_context(httpx.Client(timeout=10))
        yield TwoSidecars(procs=procs, broker_url=redis.url, prometheus_api=f"{prom}/api/v1",
                          instances=instances, producer=producer, http=http)

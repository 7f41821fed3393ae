"""The monitoring stack, natively: the compose file's pieces as local processes.

Everything runs from the configs `celery-sidecar render` writes for compose (rules and
dashboards included, from the installed package's data); only the addresses differ
(127.0.0.1 and free ports instead of service names). Flower's and Prometheus's command
lines are read from docker-compose.monitoring.yml too, so a change there is exercised here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from celery import Celery

from celery_sidecar.render import StackSettings, render_stack
from tests.support.paths import ARTIFACTS, SIDECAR, SOURCE, SUITE, package_file
from tests.support.servers import free_port, redis_server, wait_for

COMPOSE_FILE = SOURCE / "docker-compose.monitoring.yml"
DASHBOARD = package_file("grafana/dashboards/celery-sidecar.json")
RULES = package_file("alerts/prometheus/rules.yml")

USER = "ops"
PASSWORD = "correct horse battery staple"
WORKER_NAME = "live-worker@stack"

SIDECAR_CONFIG = """\
queues: [celery, heavy]
heavy_queues: [heavy]
"""


def compose_command(service: str) -> list[str]:
    """A service's command from the compose file, ${VAR:-default} taken at its default."""
    args = yaml.safe_load(COMPOSE_FILE.read_text())["services"][service]["command"]
    return [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in args]


def with_flags(args: list[str], flags: dict[str, str]) -> list[str]:
    """Replace (or add) `--name=value` flags in a command line."""
    out = [a for a in args if a.split("=", 1)[0] not in flags]
    return out + [f"{k}={v}" for k, v in flags.items()]


@dataclass
class Processes:
    """Started children, each in its own process group so teardown reaches grandchildren."""

    logdir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"processes exited early: {dead}; logs in {self.logdir}")

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(5)
        # Children a TERM'd leader left behind (prefork pool, chromium helpers).
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


class Traffic:
    """A producer thread: a steady mix of demo tasks, including failures, retries and revokes."""

    def __init__(self, broker_url: str) -> None:
        self.app = Celery("traffic", broker=broker_url)
        self.app.conf.update(task_send_sent_event=True, broker_connection_retry_on_startup=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self.sent = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(0.25):
            tick += 1
            send = self.app.send_task
            send("demo.ok", args=(tick, 1), queue="celery")
            if tick % 2 == 0:
                send("demo.flaky", kwargs={"p_fail": 0.5}, queue="celery")
            if tick % 4 == 0:
                send("demo.fail", kwargs={"reason": "harness"}, queue="celery")
                send("demo.slow", kwargs={"seconds": 0.3}, queue="celery")
            if tick % 6 == 0:
                send("demo.report", kwargs={"seconds": 0.5}, queue="heavy")
            if tick % 8 == 0:
                # Revoked before it is sent: the worker announces task-revoked on receipt.
                task_id = str(uuid.uuid4())
                self.app.control.revoke(task_id)
                send("demo.ok", task_id=task_id, queue="celery")
            self.sent += 1


@dataclass
class Stack:
    tmp: Path
    out: Path
    procs: Processes
    broker_url: str
    nginx_url: str
    prometheus_api: str
    sidecar_url: str
    traffic: Traffic

    def client(self, auth: bool = True, source: str | None = None, **kw) -> httpx.Client:
        transport = httpx.HTTPTransport(local_address=source) if source else None
        return httpx.Client(base_url=self.nginx_url, auth=(USER, PASSWORD) if auth else None,
                            transport=transport, timeout=10, **kw)

    def prom_query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.prometheus_api}/query", params={"query": expr}, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def prom_get(self, path: str) -> dict:
        return httpx.get(f"{self.prometheus_api}/{path}", timeout=10).json()["data"]


def _wait_http(url: str, procs: Processes, what: str, timeout: float = 30, ok=(200,)) -> None:
    def ready() -> bool:
        procs.check_alive()
        return httpx.get(url, timeout=2).status_code in ok

    wait_for(ready, timeout=timeout, interval=0.2, what=what)


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SUITE)
    env.update(extra)
    return env


@contextmanager
def running_stack() -> Iterator[Stack]:
    # nginx workers run as nobody and read htpasswd at request time: the tree must be traversable.
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-stack-"))
    tmp.chmod(0o755)
    logs = tmp / "logs"
    logs.mkdir()
    procs = Processes(logs)
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        # Logs outlive the run (tests/artifacts is git-ignored) so a failure can be read afterwards.
        cleanup.callback(shutil.copytree, logs, ARTIFACTS / "stack-logs", dirs_exist_ok=True)
        cleanup.callback(procs.stop_all)
        redis = cleanup.enter_context(redis_server())
        ports = {name: free_port() for name in ("sidecar", "flower", "prometheus", "nginx")}
        out = tmp / "rendered"
        render_stack(StackSettings(
            allow_cidrs=("127.0.0.1/32",),
            flower_user=USER,
            flower_password=PASSWORD,
            listen=f"127.0.0.1:{ports['nginx']}",
            sidecar_addr=f"127.0.0.1:{ports['sidecar']}",
            flower_addr=f"127.0.0.1:{ports['flower']}",
            prometheus_addr=f"127.0.0.1:{ports['prometheus']}",
            grafana_addr=f"127.0.0.1:{free_port()}",  # nothing listens: no Grafana here
            resolver="127.0.0.1",
            prometheus_ui=True,
            scrape_interval="1s",
            rules_path=str(out / "prometheus" / "rules" / "*.yml"),
        ), out)

        (tmp / "sidecar.yml").write_text(SIDECAR_CONFIG)
        broker_env = {"CELERY_BROKER_URL": redis.url}

        # The demo app carries the documented one-line plugin install (celery_sidecar.plugin.ResourceUsage).
        procs.start("worker", [
            sys.executable, "-m", "celery", "-A", "celery_sidecar.demo_tasks", "worker", "-E", "-Q", "celery,heavy",
            "-c", "3", "-n", WORKER_NAME, "--without-mingle", "--without-gossip", "-l", "INFO",
        ], env=_child_env(DEMO_RESOURCE_INTERVAL="1", **broker_env), cwd=tmp)

        procs.start("sidecar", [
            sys.executable, *SIDECAR, "run", "--broker-url", redis.url, "--bind", "127.0.0.1",
            "--port", str(ports["sidecar"]), "--config", str(tmp / "sidecar.yml"),
            # Faster than the defaults so pool/consumer gauges exist within the test's budget.
            "--probe-interval", "1", "--inspect-interval", "2",
        ], env=_child_env())

        flower = with_flags(compose_command("flower"),
                            {"--address": "127.0.0.1", "--port": str(ports["flower"])})
        procs.start("flower", [sys.executable, "-m", *flower],
                    env=_child_env(FLOWER_UNAUTHENTICATED_API="true", **broker_env))

        prometheus = with_flags(compose_command("prometheus"), {
            "--config.file": str(out / "prometheus" / "prometheus.yml"),
            "--storage.tsdb.path": str(tmp / "tsdb"),
            "--web.listen-address": f"127.0.0.1:{ports['prometheus']}",
        })
        procs.start("prometheus", ["prometheus", *prometheus], cwd=tmp)

        (tmp / "nginx-prefix").mkdir()
        nginx = compose_command("nginx")
        nginx[nginx.index("-c") + 1] = str(out / "nginx" / "nginx.conf")
        daemon_off = nginx.index("-g") + 1
        nginx[daemon_off] += f" pid {tmp / 'nginx.pid'};"
        procs.start("nginx", [*nginx, "-p", str(tmp / "nginx-prefix"), "-e", "stderr"])

        sidecar_url = f"http://127.0.0.1:{ports['sidecar']}"
        prom = f"http://127.0.0.1:{ports['prometheus']}/prometheus"
        _wait_http(f"{sidecar_url}/health", procs, "sidecar /health", ok=(200, 503))
        _wait_http(f"http://127.0.0.1:{ports['flower']}/flower/healthcheck", procs, "flower")
        _wait_http(f"{prom}/-/ready", procs, "prometheus")
        _wait_http(f"http://127.0.0.1:{ports['nginx']}/", procs, "nginx")

        traffic = Traffic(redis.url)
        traffic.start()
        cleanup.callback(traffic.stop)
        yield Stack(tmp=tmp, out=out, procs=procs, broker_url=redis.url,
                    nginx_url=f"http://127.0.0.1:{ports['nginx']}", prometheus_api=f"{prom}/api/v1",
                    sidecar_url=sidecar_url, traffic=traffic)


# --- Dashboard expressions -------------------------------------------------------------

# Grafana's built-ins, as a Grafana with a 1 s scrape and a short time range would expand them.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m", "__range_s": "300",
            "__interval_ms": "15000"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title/refId, expr) for every target, nested row panels included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((f"{panel.get('title')} [{target.get('refId')}]", target["expr"]))

    walk(dashboard.get("panels", []))
    return found


def variable_queries(dashboard: dict) -> list[tuple[str, str]]:
    """label_values(metric, label) variables, as the plain metric selector they list."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert m, f"variable {var['name']}: unsupported query {query!r}"
        out.append((f"variable ${var['name']}", m.group(1)))
    return out


def substitute(expr: str, dashboard: dict) -> str:
    """Expand template variables the way Grafana does for 'All' (its allValue regex)."""
    values = dict(BUILTINS)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            values[var["name"]] = var.get("allValue") or ".*"

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"unknown template variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(repl, expr)


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


# --- Browser ---------------------------------------------------------------------------

def chromium(*args: str, user_data_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={user_data_dir}", *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        # Chromium leaves helper processes (zygote, GPU, network service) in its group.
        _signal_group(proc, signal.SIGKILL)
    if proc.returncode is None:
        proc.wait(5)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


_ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"'#]+)["']""", re.I)


def asset_urls(html: str, base_path: str = "/flower/") -> list[str]:
    """Same-site scripts, styles and images the page references (links to other pages excluded)."""
    urls = set()
    for ref in _ASSET.findall(html):
        if ref.startswith(("http:", "https:", "//", "data:", "javascript:", "mailto:")):
            continue
        path = ref if ref.startswith("/") else base_path + ref
        if "/static/" in path:
            urls.add(path)
    return sorted(urls)

"""The whole monitoring stack, running: what an operator sees through the one published port.

redis-server, a real Celery worker with the resource plugin and steady traffic, the sidecar,
Flower, Prometheus and nginx run natively from the configs `celery-sidecar render` writes
for docker-compose (addresses templated to 127.0.0.1). Grafana is not installable here, so
/grafana/ is only checked up to nginx's access control.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from tests.support.paths import SOURCE
from tests.support.servers import wait_for
from tests.support.stack import (
    ARTIFACTS,
    DASHBOARD,
    DASHBOARDS,
    PASSWORD,
    RULES,
    TASK_DASHBOARD,
    USER,
    WORKER_NAME,
    Stack,
    asset_urls,
    chromium,
    dashboard_expressions,
    load_dashboard,
    running_stack,
    substitute,
    variable_queries,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not all(shutil.which(t) for t in ("nginx", "prometheus", "promtool", "chromium")),
                       reason="needs nginx, prometheus and chromium from Debian's packages"),
    pytest.mark.timeout(300),
]

OUTSIDER = "127.0.0.2"  # a loopback source address that is not in ALLOW_CIDRS=127.0.0.1/32


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack() as running:
        yield running


def test_an_address_outside_the_allow_list_gets_403_everywhere(stack: Stack):
    with stack.client() as inside:
        assert inside.get("/flower/").status_code == 200
    with stack.client(source=OUTSIDER) as outside:
        for path in ("/", "/flower/", "/flower/workers", "/grafana/", "/prometheus/graph"):
            assert outside.get(path).status_code == 403, path
        # A forged X-Forwarded-For is not believed: no trusted proxy is configured.
        forged = outside.get("/flower/", headers={"X-Forwarded-For": "127.0.0.1"})
        assert forged.status_code == 403


def test_flower_needs_the_password_and_hides_its_internals(stack: Stack):
    with stack.client(auth=False) as anonymous:
        assert anonymous.get("/flower/").status_code == 401
        assert anonymous.get("/flower/", auth=(USER, "wrong")).status_code == 401
        assert anonymous.get("/flower/api/workers").status_code == 401
        assert anonymous.get("/prometheus/graph").status_code == 401, "optional Prometheus UI needs auth too"
        for path in ("/flower/metrics", "/flower/healthcheck", "/flower//metrics", "/flower/metrics/",
                     "/flower/%6detrics", "/metrics"):
            assert anonymous.get(path, auth=(USER, PASSWORD)).status_code == 404, path

        redirect = anonymous.get("/flower")
        assert redirect.status_code == 301 and redirect.headers["location"] == "/flower/"

    with stack.client() as ops:
        page = ops.get("/flower/")
        assert page.status_code == 200 and "Flower" in page.text
        assert page.headers["x-frame-options"] == "SAMEORIGIN"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "access-control-allow-origin" not in page.headers
        assert ops.get("/prometheus/api/v1/status/buildinfo").status_code == 200


def test_grafana_route_is_guarded_before_proxying(stack: Stack):
    # No Grafana runs here: an allowed client reaches the proxy step (502), an outsider does not.
    with stack.client(auth=False) as inside:
        assert inside.get("/grafana/").status_code == 502
        assert inside.get("/grafana").headers["location"] == "/grafana/"
    with stack.client(auth=False, source=OUTSIDER) as outside:
        assert outside.get("/grafana/").status_code == 403


def test_a_cross_site_post_to_flower_is_refused(stack: Stack):
    with stack.client() as ops:
        evil = ops.post(f"/flower/api/worker/pool/grow/{WORKER_NAME}",
                        headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
        assert evil.status_code == 403
        no_fetch_metadata = ops.post(f"/flower/api/worker/pool/grow/{WORKER_NAME}",
                                     headers={"Origin": "http://evil.example"})
        assert no_fetch_metadata.status_code == 403
        # The same request from Flower's own page goes through to Flower.
        same = ops.post("/flower/api/task/types", headers={"Origin": stack.nginx_url,
                                                           "Sec-Fetch-Site": "same-origin"})
        assert same.status_code != 403


def test_flower_in_a_browser_lists_the_live_worker_and_loads_every_asset(stack: Stack):
    base = stack.nginx_url.replace("http://", f"http://{USER}:{PASSWORD.replace(' ', '%20')}@")
    profile = stack.tmp / "chromium-profile"

    def worker_online() -> bool:
        stack.procs.check_alive()
        dom = chromium("--dump-dom", "--virtual-time-budget=5000", f"{base}/flower/workers",
                       user_data_dir=profile).stdout
        # Flower can list the worker (from inspect) before a heartbeat has shown it online.
        return WORKER_NAME in dom and "Online" in dom

    wait_for(worker_online, timeout=60, interval=1, what=f"{WORKER_NAME} online on Flower's workers page")

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "flower-workers.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,720", "--hide-scrollbars",
             "--virtual-time-budget=5000", f"{base}/flower/", user_data_dir=profile)
    assert shot.exists() and shot.stat().st_size > 10_000
    if os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1":  # a test run must not dirty the work tree
        shutil.copyfile(shot, SOURCE / "docs" / "img" / "flower.png")

    # Every asset the pages reference, fetched through nginx with the same credentials.
    with stack.client() as ops:
        for page in ("/flower/", "/flower/workers", "/flower/tasks", "/flower/broker"):
            html = ops.get(page).text
            assets = asset_urls(html)
            assert assets, f"{page} references no assets?"
            for url in assets:
                assert ops.get(url).status_code == 200, url

    # And what the browser itself requested: nothing it asked for was missing.
    browser_requests = [line for line in stack.procs.log("nginx").splitlines() if "HeadlessChrome" in line]
    assert browser_requests
    statuses = [(m.group(1), m.group(2)) for line in browser_requests
                if (m := re.search(r'"[A-Z]+ (\S+) HTTP/[\d.]+" (\d{3})', line))]
    missing = [(path, code) for path, code in statuses if code == "404"]
    assert not missing, missing


def test_prometheus_scrapes_the_sidecar(stack: Stack):
    # Each target is scraped on its own schedule: one being up says nothing of the other.
    stack.wait_target_up("celery-sidecar")
    stack.wait_target_up("flower")  # Prometheus reaches /flower/metrics internally


def test_rules_load_and_pass_promtool(stack: Stack):
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    # A rule's health is "unknown" until its first evaluation: only then can it be "err".
    def evaluated() -> list[dict] | None:
        stack.procs.check_alive()
        rules = [r for g in stack.prom_get("rules")["groups"] for r in g["rules"]]
        return rules if rules and all(r.get("health") != "unknown" for r in rules) else None

    rules = wait_for(evaluated, timeout=30, interval=0.5, what="Prometheus to evaluate every rule")
    unhealthy = {r["name"]: r.get("lastError") for r in rules if r["health"] == "err"}
    assert not unhealthy, unhealthy


def test_every_dashboard_query_returns_data(stack: Stack):
    """Each panel's PromQL of every dashboard, with template variables at 'All' (the per-task
    dashboard's $task too), finds series in the live Prometheus. The worker runs normal tasks
    and heavy ones (demo.report on queue heavy), so both classes' threshold lines have data."""
    assert {p.name for p in DASHBOARDS} == {DASHBOARD.name, TASK_DASHBOARD.name}
    queries = []
    for path in DASHBOARDS:
        dashboard = load_dashboard(path)
        queries += [(f"{path.name}: {where}", substitute(expr, dashboard))
                    for where, expr in [*dashboard_expressions(dashboard), *variable_queries(dashboard)]]
    assert len(queries) >= 70

    empty: dict[str, str] = dict(queries)

    def every_query_has_data() -> bool:
        stack.procs.check_alive()
        for where, expr in list(empty.items()):
            if stack.prom_query(expr):
                del empty[where]
        return not empty

    with contextlib.suppress(TimeoutError):  # the assert below names the queries still empty
        wait_for(every_query_has_data, timeout=90, interval=2, what="data for every dashboard query")
    assert not empty, "queries with no series:\n" + "\n".join(f"  {w}: {e}" for w, e in empty.items())


def test_sidecar_metrics_are_not_published(stack: Stack):
    # Reachable on its own internal address (as Prometheus does), never through nginx.
    assert httpx.get(f"{stack.sidecar_url}/metrics", timeout=5).status_code == 200
    with stack.client() as ops:
        assert ops.get("/metrics").status_code == 404
        assert ops.get("/health").status_code == 404

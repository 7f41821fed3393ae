"""`celery-sidecar doctor`: the checklist against the live stack, healthy and with one fault at
a time, and its Grafana and Slack checks against stand-ins that answer those APIs as documented.

The live stack is tests/support/stack.py's (nginx, Prometheus, Flower, a worker and the
sidecar), started once for the module: each fault test breaks one thing, runs doctor, and
puts it back. Grafana cannot run here, so every doctor run points at `FakeGrafana`, which
answers Grafana's login form and search API; Slack is tests/support/fake_slack.py.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from click.testing import CliRunner

from celery_sidecar.cli import main
from celery_sidecar.doctor import doctor_command
from celery_sidecar.doctor_checks import BROKER_FIX, RENDER_AGAIN, RULES_FIX, TARGET_FIX, address_scope
from celery_sidecar.doctor_integrations import DASHBOARDS_FIX, TOKEN_FIX
from celery_sidecar.doctor_model import DoctorSettings, Masker, Result, fail, ok
from celery_sidecar.doctor_run import CHECKS, report, run_checks
from celery_sidecar.embedded_redis import EmbeddedRedis
from celery_sidecar.monitor.config.dashboard_links import OVERVIEW_UID, TASK_UID
from tests.support.fake_slack import TOKEN, FakeSlack, fake_slack
from tests.support.paths import SIDECAR, SUITE
from tests.support.servers import free_port, wait_for
from tests.support.stack import PASSWORD, USER, Stack, compose_command, running_stack

GRAFANA_USER, GRAFANA_PASSWORD, GRAFANA_TOKEN = "admin", "grafana admin secret", "glsa_fake_service_token"
BOTH_DASHBOARDS = {OVERVIEW_UID: "Celery", TASK_UID: "Celery task"}
# Every variable doctor reads: none of the developer's own may leak into a run.
DOCTOR_VARS = {p.envvar for p in doctor_command.params if isinstance(p.envvar, str)} | {"NGINX_BIND", "NGINX_PORT"}
LINE = re.compile(r"^(OK|FAIL|SKIP)\s+(.+?): (.*)$")


# -- a Grafana that answers the documented login form and search API -----------------------------

@dataclass
class FakeGrafana:
    """Served under /grafana, as the stack's Grafana is: POST /login (JSON user/password, a session
    cookie), GET /api/search (dashboards and a folder; `type` filters), 401 without a login."""

    dashboards: dict[str, str]
    anonymous: bool = False  # GF_AUTH_ANONYMOUS_ENABLED=true
    port: int = field(default_factory=free_port)
    sessions: set[str] = field(default_factory=set)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/grafana"

    def items(self, kind: str | None) -> list[dict[str, Any]]:
        folder = {"id": 1, "uid": "celery", "title": "Celery", "url": "/grafana/dashboards/f/celery",
                  "type": "dash-folder", "tags": [], "isStarred": False}
        found: list[dict[str, Any]] = [folder]
        found += [{"id": n, "uid": uid, "title": title, "uri": f"db/{uid}", "url": f"/grafana/d/{uid}/{uid}",
                   "slug": "", "type": "dash-db", "tags": [], "isStarred": False, "folderUid": "celery",
                   "folderTitle": "Celery"} for n, (uid, title) in enumerate(self.dashboards.items(), 2)]
        return [item for item in found if kind in (None, item["type"])]

    def authorized(self, headers: Any) -> bool:
        cookie = re.search(r"grafana_session=(\w+)", headers.get("Cookie") or "")
        return (self.anonymous or headers.get("Authorization") == f"Bearer {GRAFANA_TOKEN}"
                or bool(cookie and cookie.group(1) in self.sessions))

    def up(self) -> None:
        grafana = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path.rstrip("/") != "/grafana/api/search":
                    return self.answer(404, {"message": "Not found"})
                if not grafana.authorized(self.headers):
                    return self.answer(401, {"message": "Unauthorized"})
                kind = parse_qs(parts.query).get("type", [None])[0]
                self.answer(200, grafana.items(kind))

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path != "/grafana/login":
                    return self.answer(404, {"message": "Not found"})
                if (body.get("user"), body.get("password")) != (GRAFANA_USER, GRAFANA_PASSWORD):
                    return self.answer(401, {"message": "Invalid username or password"})
                session = secrets.token_hex(16)
                grafana.sessions.add(session)
                self.answer(200, {"message": "Logged in"},
                            {"Set-Cookie": f"grafana_session={session}; Path=/grafana/; HttpOnly"})

            def answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-grafana",
                         daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@contextmanager
def fake_grafana(dashboards: dict[str, str] = BOTH_DASHBOARDS, anonymous: bool = False) -> Iterator[FakeGrafana]:
    grafana = FakeGrafana(dict(dashboards), anonymous)
    grafana.up()
    try:
        yield grafana
    finally:
        grafana.down()


# -- helpers -------------------------------------------------------------------------------------

def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def settings(**kw: Any) -> DoctorSettings:
    return DoctorSettings(**{"nginx_url": closed_url(), "timeout": 3.0, **kw})


def only(s: DoctorSettings, *names: str) -> dict[str, Result]:
    """The lines of the named checks (doctor_run.CHECKS names), by line name."""
    chosen = tuple((name, check) for name, check in CHECKS if name in names)
    assert len(chosen) == len(names), f"unknown checks: {set(names) - {n for n, _ in chosen}}"
    return {r.check: r for r in run_checks(s, chosen)}


def invoke(*args: str, **env: str):
    clean: dict[str, str | None] = dict.fromkeys(DOCTOR_VARS)
    return CliRunner().invoke(main, ["doctor", *args], env={**clean, **env})


def parse(output: str) -> dict[str, tuple[str, str, str]]:
    """{check: (verdict, detail, fix)} from the printed checklist."""
    lines: dict[str, tuple[str, str, str]] = {}
    last = None
    for line in output.splitlines():
        if m := LINE.match(line):
            last = m.group(2)
            lines[last] = (m.group(1), m.group(3), "")
        elif line.startswith("      fix: ") and last is not None:
            verdict, detail, _ = lines[last]
            lines[last] = (verdict, detail, line.removeprefix("      fix: "))
    assert lines, f"no checklist in the output:\n{output}"
    return lines


def failed(lines: dict[str, tuple[str, str, str]]) -> set[str]:
    return {name for name, (verdict, _, _) in lines.items() if verdict == "FAIL"}


# -- Grafana -------------------------------------------------------------------------------------

GRAFANA_CHECKS = ("Grafana refuses requests without credentials", "Grafana dashboards")


@pytest.mark.parametrize("login", ["password", "token"])
def test_grafana_with_both_dashboards_is_green(login: str):
    creds = {"grafana_password": GRAFANA_PASSWORD} if login == "password" else {"grafana_token": GRAFANA_TOKEN}
    with fake_grafana() as grafana:
        lines = only(settings(grafana_url=grafana.url, **creds), *GRAFANA_CHECKS)
    assert {name: r.status for name, r in lines.items()} == {
        "Grafana refuses requests without credentials": "ok",
        "Grafana accepts the credentials": "ok",
        "Grafana dashboards provisioned": "ok",
    }
    assert "401" in lines["Grafana refuses requests without credentials"].detail
    assert lines["Grafana dashboards provisioned"].detail == f"Celery ({OVERVIEW_UID}), Celery task ({TASK_UID})"


def test_grafana_missing_a_dashboard_is_red_with_the_fix():
    with fake_grafana({OVERVIEW_UID: "Celery"}) as grafana:
        lines = only(settings(grafana_url=grafana.url, grafana_password=GRAFANA_PASSWORD), *GRAFANA_CHECKS)
    dashboards = lines["Grafana dashboards provisioned"]
    assert dashboards.status == "fail"
    assert f"missing: {TASK_UID}" in dashboards.detail and OVERVIEW_UID in dashboards.detail
    assert dashboards.fix == DASHBOARDS_FIX
    assert lines["Grafana accepts the credentials"].status == "ok"


def test_a_refused_grafana_login_fails_and_skips_the_dashboards():
    with fake_grafana() as grafana:
        lines = only(settings(grafana_url=grafana.url, grafana_password="wrong"), *GRAFANA_CHECKS)
    assert lines["Grafana accepts the credentials"].status == "fail"
    assert "GRAFANA_ADMIN_PASSWORD" in lines["Grafana accepts the credentials"].fix
    assert lines["Grafana dashboards provisioned"].status == "skip"


def test_a_grafana_open_to_anonymous_callers_fails():
    with fake_grafana(anonymous=True) as grafana:
        lines = only(settings(grafana_url=grafana.url), *GRAFANA_CHECKS)
    anonymous = lines["Grafana refuses requests without credentials"]
    assert anonymous.status == "fail" and "GF_AUTH_ANONYMOUS_ENABLED=false" in anonymous.fix
    # Without a password or token there is nothing to log in with: skipped, not failed.
    assert lines["Grafana accepts the credentials"].status == "skip"


# -- Slack ---------------------------------------------------------------------------------------

def test_a_valid_bot_token_passes_auth_test_and_posts_nothing(slack: FakeSlack):
    line = only(settings(slack_bot_token=TOKEN, slack_api_url=slack.api_url), "Slack")["Slack bot token"]
    assert line.status == "ok" and "Fake Workspace" in line.detail
    assert [r.method for r in slack.requests] == ["auth.test"]
    assert slack.accepted() == []


def test_an_invalid_bot_token_fails_with_the_fix_and_is_not_printed(slack: FakeSlack):
    bad_token = "not-the-fake-bot-token"
    s = settings(slack_bot_token=bad_token, slack_api_url=slack.api_url)
    line = only(s, "Slack")["Slack bot token"]
    assert line.status == "fail" and "invalid_auth" in line.detail and line.fix == TOKEN_FIX
    printed: list[str] = []
    report([line, fail("leak", f"Bearer {bad_token}", bad_token)], Masker(s.secrets), printed.append)
    assert bad_token not in "\n".join(printed) and "Bearer ***" in "\n".join(printed)


def test_a_webhook_is_reported_as_not_checked_and_never_posted_to(slack: FakeSlack):
    line = only(settings(slack_webhook_url=slack.webhook_url), "Slack")["Slack webhook"]
    assert line.status == "skip"
    assert line.detail.startswith("not checked: a webhook can only be tested by posting")
    assert slack.requests == []


def test_a_webhook_url_slack_would_refuse_fails():
    line = only(settings(slack_webhook_url="http://hooks.example.com/services/T/B/X"), "Slack")["Slack webhook"]
    assert line.status == "fail" and "https" in line.detail


# -- the command, without a stack ----------------------------------------------------------------

def test_a_check_without_what_it_needs_is_skipped_not_failed():
    result = invoke("--nginx-url", closed_url(), "--timeout", "1")
    lines = parse(result.output)
    assert result.exit_code == 1, result.output  # nothing answers where nginx should
    assert lines["nginx answers"][0] == "FAIL" and "cannot connect" in lines["nginx answers"][1]
    for name in ("Prometheus targets", "Prometheus rules", "sidecar /health", "sidecar event stream",
                 "Grafana accepts the credentials", "Slack bot token", "Slack webhook"):
        assert lines[name][0] == "SKIP", (name, lines[name])


def test_the_stack_variables_are_the_defaults():
    port = free_port()
    result = invoke(NGINX_BIND="0.0.0.0", NGINX_PORT=str(port), ENABLE_PROMETHEUS_UI="true", DOCTOR_TIMEOUT="1")
    lines = parse(result.output)
    assert f"http://127.0.0.1:{port}/" in lines["nginx answers"][1]
    # With the Prometheus UI routed, Prometheus is checked through nginx (here: not answering).
    assert lines["Prometheus rules"][0] == "FAIL"
    assert f"http://127.0.0.1:{port}/prometheus/api/v1/rules" in lines["Prometheus rules"][1]
    assert f"http://127.0.0.1:{port}/grafana/api/search" in lines["Grafana refuses requests without credentials"][1]


@pytest.mark.parametrize("args", [["--nginx-url", "ftp://example.com"], ["--timeout", "0"], ["--no-such-flag"]])
def test_a_flag_that_cannot_work_exits_2(args: list[str]):
    assert invoke(*args).exit_code == 2


def test_a_silent_server_costs_one_timeout_and_a_broken_check_stops_no_other():
    # Accepts connections (the kernel does, from the backlog) and never answers.
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]

    def broken(s: DoctorSettings) -> list[Result]:
        raise RuntimeError("boom")

    checks = (("broken", broken), *((n, c) for n, c in CHECKS if n in ("sidecar /health", "Slack")))
    with silent:
        started = time.monotonic()
        lines = {r.check: r for r in run_checks(settings(sidecar_url=f"http://127.0.0.1:{port}", timeout=0.5),
                                                checks)}
        took = time.monotonic() - started
    assert lines["broken"].status == "fail" and "RuntimeError: boom" in lines["broken"].detail
    assert lines["sidecar /health"].status == "fail" and "no answer within 0.5 s" in lines["sidecar /health"].detail
    assert lines["sidecar event stream"].status == "skip"
    assert lines["Slack bot token"].status == "skip"
    assert took < 5, f"one 0.5 s timeout took {took:.1f} s"


def test_no_secret_reaches_the_output():
    s = settings(flower_user="ops", flower_password="flower-pw", grafana_password="grafana-pw",
                 grafana_token="glsa_tok", slack_bot_token="bot-tok",
                 slack_webhook_url="https://hooks.slack.com/services/T1/B2/hookpath")
    leaky = [fail(f"check {n}", f"said {secret} at http://ops:flower-pw@host/x", f"fix {secret}")
             for n, secret in enumerate([*s.secrets, "/services/T1/B2/hookpath"])]
    printed: list[str] = []
    report([*leaky, ok("fine", "http://user:anything@host/")], Masker(s.secrets), printed.append)
    text = "\n".join(printed)
    for secret in ("flower-pw", "grafana-pw", "glsa_tok", "bot-tok", "hookpath", "anything"):
        assert secret not in text, secret
    assert "http://***@host/x" in text


@pytest.mark.parametrize(("address", "scope"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.9", "private"),
    ("172.18.0.1", "private"), ("fd00::1", "private"), ("8.8.8.8", "public"), ("2001:4860:4860::8888", "public"),
])
def test_address_scope(address: str, scope: str):
    assert address_scope(address) == scope


def test_a_sidecar_on_a_public_address_fails():
    line = only(settings(sidecar_url="http://8.8.8.8:9808"), "sidecar not on a public address")
    result = line["sidecar not on a public address"]
    assert result.status == "fail" and "8.8.8.8 (public)" in result.detail and "SIDECAR_BIND" in result.fix


# -- the live stack ------------------------------------------------------------------------------

live_tools = pytest.mark.skipif(not all(shutil.which(t) for t in ("nginx", "prometheus")),
                                reason="needs nginx and prometheus from Debian's packages")


@dataclass
class Live:
    stack: Stack
    grafana: FakeGrafana
    slack: FakeSlack
    cleanup: ExitStack

    def env(self, **overrides: str) -> dict[str, str]:
        """The stack's variables, as an operator's .env would hold them, plus the two addresses
        compose does not publish (the test can reach them)."""
        return {
            "NGINX_URL": self.stack.nginx_url, "FLOWER_USER": USER, "FLOWER_PASSWORD": PASSWORD,
            "ENABLE_PROMETHEUS_UI": "true", "SIDECAR_URL": self.stack.sidecar_url,
            "GRAFANA_ROOT_URL": self.grafana.url, "GRAFANA_ADMIN_PASSWORD": GRAFANA_PASSWORD,
            "SLACK_BOT_TOKEN": TOKEN, "SLACK_API_URL": self.slack.api_url,
            "SLACK_WEBHOOK_URL": self.slack.webhook_url, "DOCTOR_TIMEOUT": "5", **overrides,
        }

    def doctor(self, **overrides: str) -> tuple[int, dict[str, tuple[str, str, str]], str]:
        result = invoke(**self.env(**overrides))
        return result.exit_code, parse(result.output), result.output

    def prometheus_jobs(self) -> dict[str, str]:
        return {t["scrapePool"]: t["health"] for t in self.stack.prom_get("targets")["activeTargets"]}

    def sidecar_health(self) -> tuple[int, dict[str, Any]]:
        r = httpx.get(f"{self.stack.sidecar_url}/health", timeout=5)
        return r.status_code, r.json()


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    with ExitStack() as cleanup:
        stack = cleanup.enter_context(running_stack())
        grafana = cleanup.enter_context(fake_grafana())
        slack = cleanup.enter_context(fake_slack())
        yield Live(stack, grafana, slack, cleanup)


def wait_healthy(live: Live) -> None:
    """What the green run needs, as conditions: both targets scraped, rules evaluated, events in."""
    live.stack.wait_target_up("celery-sidecar")
    live.stack.wait_target_up("flower")

    def sidecar_live() -> bool:
        live.stack.procs.check_alive()
        code, body = live.sidecar_health()
        return code == 200 and body["last_event_age_seconds"] is not None

    wait_for(sidecar_live, timeout=30, interval=0.5, what="the sidecar connected, with events")


GREEN = {"nginx answers", "Flower refuses requests without credentials", "Flower accepts the credentials",
         "nothing internal through nginx without credentials", "Prometheus target celery-sidecar",
         "Prometheus target flower", "Prometheus rules", "sidecar /health", "sidecar config", "sidecar event stream",
         "sidecar not on a public address", "Grafana refuses requests without credentials",
         "Grafana accepts the credentials", "Grafana dashboards provisioned", "Slack bot token"}


@pytest.mark.e2e
@live_tools
def test_the_live_stack_is_all_green(live: Live):
    """Through a pipe, from the stack's variables alone, as an operator runs it."""
    wait_healthy(live)
    env = {k: v for k, v in os.environ.items() if k not in DOCTOR_VARS and not k.startswith(("SLACK_", "GRAFANA_"))}
    run = subprocess.run([sys.executable, *SIDECAR, "doctor"], env={**env, "PYTHONPATH": str(SUITE), **live.env()},
                         capture_output=True, text=True, timeout=60)
    lines = parse(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert {name for name, (verdict, _, _) in lines.items() if verdict == "OK"} == GREEN, run.stdout
    assert lines["Slack webhook"][:2] == ("SKIP", f"not checked: a webhook can only be tested by posting "
                                                  f"(on 127.0.0.1:{live.slack.port})")
    assert "live: last event" in lines["sidecar event stream"][1]
    assert "celery-sidecar.rules, celery-sidecar.alerts loaded" in lines["Prometheus rules"][1]
    assert "\x1b[" not in run.stdout, "colour codes through a pipe"
    for secret in (PASSWORD, GRAFANA_PASSWORD, TOKEN, "/services/"):
        assert secret not in run.stdout + run.stderr, secret
    # auth.test only: Slack got no message, and the webhook was never called.
    assert {r.method for r in live.slack.requests} == {"auth.test"} and live.slack.accepted() == []


@pytest.mark.e2e
@live_tools
def test_a_prometheus_target_down(live: Live):
    wait_healthy(live)
    flower = live.stack.procs.procs["flower"]
    os.killpg(flower.pid, signal.SIGTERM)
    flower.wait(10)
    try:
        wait_for(lambda: live.prometheus_jobs().get("flower") == "down", timeout=30, interval=0.5,
                 what="Prometheus to see Flower down")
        code, lines, output = live.doctor()
        assert code == 1, output
        verdict, detail, fix = lines["Prometheus target flower"]
        assert verdict == "FAIL" and "/flower/metrics" in detail and fix == TARGET_FIX["flower"]
        # nginx still asks for the password before it proxies; with it, Flower is not there.
        assert failed(lines) == {"Prometheus target flower", "Flower accepts the credentials"}, output
    finally:
        env = dict(os.environ, PYTHONPATH=str(SUITE), FLOWER_UNAUTHENTICATED_API="true",
                   CELERY_BROKER_URL=live.stack.broker_url)
        live.stack.procs.start("flower", list(flower.args), env=env)
        live.stack.wait_target_up("flower")


@pytest.mark.e2e
@live_tools
def test_the_rules_missing(live: Live):
    wait_healthy(live)
    rules = next((live.stack.out / "prometheus" / "rules").glob("*.yml"))
    aside = live.stack.tmp / rules.name
    prometheus = live.stack.procs.procs["prometheus"]

    def groups() -> list[str]:
        live.stack.procs.check_alive()
        return [g["name"] for g in live.stack.prom_get("rules")["groups"]]

    rules.rename(aside)
    try:
        prometheus.send_signal(signal.SIGHUP)  # Prometheus reloads its config and rule files
        wait_for(lambda: groups() == [], timeout=30, interval=0.3, what="Prometheus without rules")
        code, lines, output = live.doctor()
        assert code == 1, output
        verdict, detail, fix = lines["Prometheus rules"]
        assert verdict == "FAIL" and "not loaded: celery-sidecar.rules, celery-sidecar.alerts" in detail
        assert fix == RULES_FIX
        assert failed(lines) == {"Prometheus rules"}, output
    finally:
        aside.rename(rules)
        prometheus.send_signal(signal.SIGHUP)
        wait_for(groups, timeout=30, interval=0.3, what="Prometheus with its rules again")


@pytest.mark.e2e
@live_tools
def test_nginx_without_auth_on_flower(live: Live):
    wait_healthy(live)
    # Under the stack's own 0755 tree: nginx's workers read htpasswd as another user.
    here = live.stack.tmp / "nginx-without-auth"
    here.mkdir(mode=0o755)
    rendered = live.stack.out / "nginx"
    conf = (rendered / "nginx.conf").read_text()
    port = free_port()
    # The Flower location is the first to ask for the password; the Prometheus one keeps asking.
    open_conf = conf.replace('auth_basic "Flower";', "", 1).replace("auth_basic_user_file htpasswd;", "", 1)
    open_conf = re.sub(r"listen [\d.]+:\d+;", f"listen 127.0.0.1:{port};", open_conf)
    assert open_conf.count("auth_basic_user_file") == conf.count("auth_basic_user_file") - 1
    (here / "nginx.conf").write_text(open_conf)
    shutil.copy(rendered / "htpasswd", here / "htpasswd")
    (here / "prefix").mkdir()
    args = compose_command("nginx")
    args[args.index("-c") + 1] = str(here / "nginx.conf")
    args[args.index("-g") + 1] += f" pid {here / 'nginx.pid'};"
    nginx = subprocess.Popen([*args, "-p", str(here / "prefix"), "-e", "stderr"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        open_url = f"http://127.0.0.1:{port}"
        wait_for(lambda: nginx.poll() is None and httpx.get(f"{open_url}/", timeout=2).status_code == 200,
                 timeout=15, what="the nginx without auth")
        code, lines, output = live.doctor(NGINX_URL=open_url)
        assert code == 1, output
        verdict, detail, fix = lines["Flower refuses requests without credentials"]
        assert verdict == "FAIL" and "answered 200 without credentials" in detail and fix == RENDER_AGAIN
        assert failed(lines) == {"Flower refuses requests without credentials"}, output
    finally:
        os.killpg(nginx.pid, signal.SIGTERM)
        nginx.wait(10)


@pytest.mark.e2e
@live_tools
def test_the_sidecars_broker_gone(live: Live):
    wait_healthy(live)
    # The producer would die on its first failed send; the workers' heartbeats keep events coming.
    live.stack.traffic.stop()
    port = urlsplit(live.stack.broker_url).port
    assert port is not None
    redis.Redis(port=port).shutdown(nosave=True)
    try:
        wait_for(lambda: live.sidecar_health()[0] == 503, timeout=30, interval=0.3, what="/health 503")
        code, lines, output = live.doctor()
        assert code == 1, output
        verdict, detail, fix = lines["sidecar /health"]
        assert verdict == "FAIL" and "answered 503: broker unreachable" in detail and fix == BROKER_FIX
        assert lines["sidecar event stream"][:2] == ("FAIL", "broker disconnected: no event can arrive")
        assert {"sidecar /health", "sidecar event stream"} <= failed(lines), output
    finally:
        # The same port, so the sidecar, worker and Flower reconnect to it on their own.
        broker = live.cleanup.enter_context(_redis_on(port))
        assert broker.url.startswith("redis://127.0.0.1:")
        wait_for(lambda: live.sidecar_health()[0] == 200, timeout=60, interval=0.5, what="the sidecar reconnected")


@contextmanager
def _redis_on(port: int) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(port).start()
    try:
        yield server
    finally:
        server.cleanup()

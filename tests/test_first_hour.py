"""A new user's first hour: the mistakes everyone makes, and what the sidecar says about each.

Each story runs real parts: private redis-servers (one with ``requirepass`` where the story
needs a password), RabbitMQ, real Celery workers, and the sidecar through its real CLI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from celery_sidecar.embedded_redis import EmbeddedRedis
from tests.support.clients import producer
from tests.support.paths import SIDECAR, SUITE, child_env
from tests.support.procs import SidecarProcess
from tests.support.servers import free_port, wait_for

# Every story runs the sidecar: as a process, or its CLI.
pytestmark = pytest.mark.e2e


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`celery-sidecar ARGS` as a user types it, with none of the developer's settings."""
    return subprocess.run([sys.executable, *SIDECAR, *args], capture_output=True, text=True, cwd=SUITE,
                          env=child_env(), timeout=timeout)


def said(result: subprocess.CompletedProcess) -> list[str]:
    """Every line the command printed, stdout and stderr together."""
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def threshold(side: SidecarProcess, signal: str) -> float | None:
    return side.metrics().get("celery_threshold", signal=signal)


def ticked_past(side: SidecarProcess, moment: float) -> None:
    """The sidecar has run its once-a-second checks (advice included) after ``moment``."""
    side.wait_metric("celery_sidecar_last_tick_timestamp_seconds", lambda v: v >= moment, timeout=30)


# -- 1. hot reload survives anything written to the file -------------------------------------------

NOT_UTF8 = b"# r\xe9glages\nthresholds: {worker_cpu_percent: 50}\n"
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"


@pytest.mark.parametrize(("edit", "says"), [
    pytest.param(lambda f: f.write_bytes(NOT_UTF8), "not UTF-8 text", id="latin-1 accent"),
    pytest.param(lambda f: f.write_bytes(BINARY), "a binary file", id="binary"),
    pytest.param(lambda f: f.unlink(), "No such file", id="deleted"),
])
def test_an_unreadable_edit_is_refused_and_the_next_valid_edit_is_live_within_a_second(
        redis_srv, sidecar, tmp_path, edit, says):
    config = tmp_path / "sidecar.yml"
    config.write_text("thresholds: {worker_cpu_percent: 80}\n")
    side = sidecar(redis_srv.url, config=config)

    edit(config)
    side.wait_metric("celery_sidecar_config_valid", lambda v: v == 0, timeout=10)
    status, health = side.health()
    assert status == 200, "a refused edit keeps the previous config live; the sidecar still works"
    assert health["config"]["valid"] is False and says in health["config"]["error"], health["config"]
    assert health["config"]["reloader"]["running"] is True
    assert threshold(side, "worker_cpu_percent") == 80
    refusals = [line for line in side.log().splitlines() if "config edit refused" in line]
    assert len(refusals) == 1, side.log()
    assert "Exception in thread config-reload" not in side.log()

    # The user fixes the file (for a deleted one: writes it again); the reloader is still there.
    config.write_text("thresholds: {worker_cpu_percent: 55}\n")
    written = time.monotonic()
    wait_for(lambda: threshold(side, "worker_cpu_percent") == 55, timeout=10, interval=0.05,
             what="the fixed file to be live")
    # Polled once a second; the rest is this test's own scrapes on a busy machine.
    assert time.monotonic() - written < 1.6
    assert side.metrics().get("celery_sidecar_config_valid") == 1
    assert side.health()[1]["config"]["error"] is None


def test_whatever_a_symlink_swap_leaves_at_the_path_is_refused_once_and_a_valid_file_applies(tmp_path):
    """Kubernetes swaps a ConfigMap's symlink; a hand edit can leave it dangling, or pointing
    at a directory or a FIFO (whose read would block the reloader for good)."""
    from celery_sidecar.monitor.config.reload import ConfigReloader
    from celery_sidecar.monitor.config.settings import LiveConfig, load_config
    from celery_sidecar.monitor.fold.status import Status

    first = tmp_path / "..data-1" / "sidecar.yml"
    first.parent.mkdir()
    first.write_text("thresholds: {worker_cpu_percent: 80}\n")
    path = tmp_path / "sidecar.yml"
    path.symlink_to(first)
    live, status = LiveConfig(load_config(path)), Status()
    reloader = ConfigReloader(path, live, status.reload_result)

    def swap(target: Path) -> None:
        new = tmp_path / "swapping"
        new.symlink_to(target)
        os.replace(new, path)  # atomic, as kubelet does it

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for n, (target, says) in enumerate([(tmp_path / "gone.yml", "No such file or directory"),
                                        (first.parent, "not a regular file"),
                                        (fifo, "not a regular file")], 1):
        swap(target)
        assert reloader.check() is False
        assert status.config_error is not None and says in status.config_error
        assert reloader.check() is False, "the same state again is no new edit"
        assert status.reloads == {"error": n}
        assert live.current.thresholds.worker_cpu_percent == 80

    second = tmp_path / "..data-2" / "sidecar.yml"
    second.parent.mkdir()
    second.write_text("thresholds: {worker_cpu_percent: 60}\n")
    swap(second)
    assert reloader.check() is True
    assert live.current.thresholds.worker_cpu_percent == 60 and status.config_error is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_a_file_made_unreadable_is_refused_and_readable_again_applies(tmp_path):
    from celery_sidecar.monitor.config.reload import ConfigReloader
    from celery_sidecar.monitor.config.settings import LiveConfig, load_config
    from celery_sidecar.monitor.fold.status import Status

    path = tmp_path / "sidecar.yml"
    path.write_text("thresholds: {worker_cpu_percent: 80}\n")
    live, status = LiveConfig(load_config(path)), Status()
    reloader = ConfigReloader(path, live, status.reload_result)
    path.chmod(0)
    assert reloader.check() is False
    assert status.config_error is not None and "Permission denied" in status.config_error
    path.chmod(0o644)
    path.write_text("thresholds: {worker_cpu_percent: 70}\n")
    assert reloader.check() is True and live.current.thresholds.worker_cpu_percent == 70


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the point of the test
def test_the_reloader_stopping_is_shown_on_health(tmp_path):
    """Nothing an edit holds stops the reload loop; if something stopped it anyway (a bug),
    /health must not go on saying all is well while edits are ignored."""
    from celery_sidecar.monitor.config.settings import load_config
    from celery_sidecar.wiring import RunSettings, Sidecar

    config = tmp_path / "sidecar.yml"
    config.write_text("{}\n")
    # In-process and never started: nothing connects to this broker.
    side = Sidecar(RunSettings(broker_url="redis://127.0.0.1:9/0", port=0, config_path=config, alerts=False,
                               reload_interval=0.05), load_config(config))
    side.pipeline.set_connected(True)  # /health is about the reloader here, not the broker
    reloader = side.reloader
    assert reloader is not None

    def die() -> bool:
        raise SystemExit("a bug that escapes every handler")

    side.http.start()
    try:
        health = f"http://127.0.0.1:{side.http.port}/health"
        reloader.start()
        assert httpx.get(health).json()["config"]["reloader"]["running"] is True
        reloader.check = die  # type: ignore[method-assign]
        wait_for(lambda: not reloader.running, timeout=5, what="the reload thread to stop")
        response = httpx.get(health)
    finally:
        reloader.stop()
        side.http.stop()
    assert response.status_code == 503
    assert response.json()["status"] == "config reloader stopped"
    assert response.json()["config"]["reloader"]["running"] is False


UNREADABLE = {
    "latin-1 accent": (lambda f: f.write_bytes(NOT_UTF8), "not UTF-8 text: byte 0xe9 on line 1"),
    "binary": (lambda f: f.write_bytes(BINARY), "a binary file"),
    "utf-16": (lambda f: f.write_text("thresholds: {}\n", encoding="utf-16"), "UTF-16"),
    "missing": (lambda f: None, "No such file or directory"),
    "a directory": (lambda f: f.mkdir(), "not a regular file"),
    "a fifo": (lambda f: os.mkfifo(f), "not a regular file"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_config_check_says_in_one_line_why_a_file_cannot_be_read(tmp_path, case):
    make, says = UNREADABLE[case]
    path = tmp_path / "sidecar.yml"
    make(path)
    result = cli("config", "check", str(path), timeout=20)
    assert result.returncode == 1
    lines = said(result)
    assert len(lines) == 1 and lines[0].startswith(f"Error: {path}: "), lines
    assert says in lines[0]


def test_the_unknown_key_hint_points_to_a_command_that_lists_every_key(tmp_path):
    config = tmp_path / "sidecar.yml"
    config.write_text("thresholds:\n  retry_rate: 5\n")
    result = cli("config", "check", str(config))
    assert result.returncode == 1
    hint = re.search(r"`(celery-sidecar [^`]+)`", result.stderr)
    assert hint, result.stderr
    listing = cli(*hint.group(1).split()[1:])
    assert listing.returncode == 0
    # The key the user meant, and the rest of the section, are in what the hint points to.
    for key in ("retry_rate_percent", "retry_rate_min_outcomes", "worker_cpu_percent", "latency_seconds"):
        assert key in listing.stdout, f"{hint.group(1)} does not list {key}"


# -- 2. no false -E warning, no latency advice before evidence ---------------------------------------

EVENTS_WARNING = "sends heartbeats but no task events"
SENT_ADVICE = "Set task_send_sent_event=True"


def heartbeats(side: SidecarProcess) -> float:
    return side.metrics().get("celery_sidecar_events_total", type="worker-heartbeat") or 0


def test_an_idle_worker_with_events_that_ran_tasks_before_the_sidecar_is_not_reported(redis_srv, sidecar, worker):
    busy = worker(redis_srv.url, name="busy")  # -E
    app = producer(redis_srv.url)
    for _ in range(3):
        app.send_task("demo.ok")
    wait_for(lambda: busy.log().count(" succeeded in ") == 3, timeout=30, what="the worker to run 3 tasks")

    # The sidecar starts next to a worker that has processed 3 tasks and now idles. Its first
    # heartbeat is the reply to the sidecar's own request, which carries no processed count.
    side = sidecar(redis_srv.url)
    side.wait_metric("celery_worker_up", lambda v: v == 1, timeout=30)
    # Six heartbeats (freq 2 s) is past the 3-beat grace after which a worker that processes
    # tasks without sending task events is reported.
    wait_for(lambda: heartbeats(side) >= 6, timeout=40, what="six heartbeats")
    side.decided(time.time())
    assert EVENTS_WARNING not in side.log()
    assert side.metrics().get("celery_sidecar_worker_task_events_enabled") == 1


def test_a_worker_without_events_started_before_the_sidecar_is_reported_once_it_runs_tasks(
        redis_srv, sidecar, worker):
    worker(redis_srv.url, name="quiet", events=False, app="tests.support.plain_app")
    side = sidecar(redis_srv.url)
    wait_for(lambda: heartbeats(side) >= 2, timeout=30, what="a heartbeat with a processed count")
    app = producer(redis_srv.url, sent_events=False)
    for _ in range(3):
        app.send_task("plain.ok")
    side.wait_metric("celery_sidecar_worker_task_events_enabled", lambda v: v == 0, timeout=40)
    wait_for(lambda: EVENTS_WARNING in side.log(), timeout=5, what="the warning")
    assert "quiet@" in side.log()


def test_no_latency_advice_before_any_task_event(redis_srv, sidecar):
    side = sidecar(redis_srv.url)
    ticked_past(side, time.time() + 3)
    assert "latency source:" not in side.log()
    assert SENT_ADVICE not in side.log()


@pytest.mark.parametrize("app", [None, "tests.support.plain_app"], ids=["no app", "app leaves it off"])
def test_tasks_received_without_task_sent_events_bring_the_advice(redis_srv, sidecar, worker, app):
    name = "plain.ok" if app else "demo.ok"
    side = sidecar(redis_srv.url, *(["--app", app] if app else []))
    worker(redis_srv.url, name="w", **({"app": app} if app else {}))
    client = producer(redis_srv.url, sent_events=False)
    for _ in range(3):
        client.send_task(name)
    side.wait_metric("celery_task_received_total", lambda v: v == 3, timeout=30)
    wait_for(lambda: SENT_ADVICE in side.log(), timeout=20, what="the advice")
    advice = next(line for line in side.log().splitlines() if SENT_ADVICE in line)
    assert "no task-sent events" in advice
    if app:
        assert "The app leaves task_send_sent_event off" in advice


def test_an_app_that_sends_task_sent_events_is_not_told_to_set_it(redis_srv, sidecar, worker):
    side = sidecar(redis_srv.url, "--app", "celery_sidecar.demo_tasks")
    ticked_past(side, time.time() + 3)
    assert "latency source:" not in side.log(), "no advice before any task event"

    worker(redis_srv.url, name="w")
    app = producer(redis_srv.url)  # the demo app's own settings: task-sent events on
    for _ in range(3):
        app.send_task("demo.ok")
    side.wait_metric("celery_task_succeeded_total", lambda v: v == 3, timeout=30)
    wait_for(lambda: "latency source: task-sent events arrive" in side.log(), timeout=10, what="the source")
    ticked_past(side, time.time() + 6)
    assert SENT_ADVICE not in side.log()


def test_when_the_app_sets_task_sent_events_but_none_arrive_the_sidecar_says_what_it_saw(
        redis_srv, sidecar, worker):
    side = sidecar(redis_srv.url, "--app", "celery_sidecar.demo_tasks")
    worker(redis_srv.url, name="w")
    # Another producer, with celery's default settings: its tasks come with no task-sent event.
    other = producer(redis_srv.url, sent_events=False)
    for _ in range(3):
        other.send_task("demo.ok")
    side.wait_metric("celery_task_received_total", lambda v: v == 3, timeout=30)
    wait_for(lambda: "latency source:" in side.log(), timeout=20, what="what the sidecar saw")
    line = next(line for line in side.log().splitlines() if "latency source:" in line)
    assert "the app sets task_send_sent_event=True, but" in line and "no task-sent event" in line
    assert SENT_ADVICE not in side.log()


# -- 3. broker URL mistakes: one clear line each, with what to do ----------------------------------

SCHEMES_LINE = "The sidecar reads Celery events from Redis (redis://, rediss://, redis+socket://, sentinel://)"


@pytest.mark.parametrize(("url", "says"), [
    ("sqs://AKIA:s3cret-key@", "'sqs://' is not supported; Celery sends no events over SQS"),
    ("filesystem://", "'filesystem://' is not supported"),
    ("memory://", "'memory://' is not supported"),
    ("127.0.0.1:6391", "has no scheme: write redis://127.0.0.1:6391/0 for Redis"),
    ("redis://127.0.0.1:637910/0", "has an invalid port"),
])
def test_a_broker_url_the_sidecar_cannot_read_is_one_line_and_exit_code_2(url, says):
    result = cli("run", "--broker-url", url, "--port", "0", timeout=20)
    assert result.returncode == 2, said(result)
    assert len(said(result)) == 1, said(result)
    assert says in said(result)[0]
    assert "s3cret-key" not in result.stderr
    if "not supported" in says:
        assert SCHEMES_LINE in said(result)[0]


def broker_lines(side: SidecarProcess) -> list[str]:
    """Log lines at warning level or above about the broker or the probes that use it."""
    return [line for line in side.log().splitlines()
            if re.search(r" (WARNING|ERROR) ", line) and re.search(r"broker|probe|inspection", line)]


def attempts(side: SidecarProcess) -> int:
    return side.health()[1]["broker"]["attempts"]


def start_unreachable(sidecar, url: str) -> SidecarProcess:
    return sidecar(url, "--probe-interval", "0.5", wait_connected=False)


@pytest.fixture
def locked_redis(redis_srv):
    """The user's Redis, with a password."""
    redis_srv.client().config_set("requirepass", "the-real-one")
    return redis_srv


@pytest.mark.parametrize(("credentials", "says"), [
    (":wrong-password@", "authentication refused: check the user name and password in the broker URL"),
    ("", "authentication refused: check the user name and password in the broker URL"),
], ids=["wrong password", "no password"])
def test_a_wrong_redis_password_is_one_clear_line_then_quiet_retries_counted_on_health(
        locked_redis, sidecar, credentials, says):
    url = f"redis://{credentials}127.0.0.1:{locked_redis.port}/0"
    side = start_unreachable(sidecar, url)
    wait_for(lambda: attempts(side) >= 4, timeout=30, what="four attempts")
    status, health = side.health()
    assert status == 503
    assert says in health["broker"]["last_error"]
    lines = broker_lines(side)
    assert len(lines) == 1, lines
    assert says in lines[0] and "retrying" in lines[0]
    assert "wrong-password" not in side.log() and "wrong-password" not in json.dumps(health)


def test_a_wrong_rabbitmq_password_is_one_clear_line(amqp_url, sidecar):
    url = amqp_url.replace("guest:guest@", "guest:not-guest@")
    side = start_unreachable(sidecar, url)
    wait_for(lambda: attempts(side) >= 3, timeout=40, what="three attempts")
    lines = broker_lines(side)
    assert len(lines) == 1, lines
    assert "authentication refused" in lines[0]
    assert "not-guest" not in side.log()


@pytest.mark.parametrize(("host", "says"), [
    ("127.0.0.1:{free}", "connection refused: nothing listens at 127.0.0.1:{free}"),
    ("no-such-host.invalid:6379", "name not found: the broker's host name does not resolve"),
], ids=["nothing listens", "no such host"])
def test_an_unreachable_broker_is_one_clear_line_and_no_advice_about_events_never_seen(sidecar, host, says):
    free = free_port()
    side = start_unreachable(sidecar, f"redis://{host.format(free=free)}/0")
    wait_for(lambda: attempts(side) >= 4, timeout=30, what="four attempts")
    lines = broker_lines(side)
    assert len(lines) == 1, lines
    assert says.format(free=free) in lines[0]
    health = side.health()[1]
    assert health["broker"]["connected"] is False and says.format(free=free) in health["broker"]["last_error"]
    assert "latency source:" not in side.log(), "nothing is known about task-sent events yet"
    assert httpx.get(f"{side.url}/health", timeout=5).status_code == 503


def test_the_broker_coming_up_after_the_sidecar_is_picked_up(sidecar):
    """The other side of quiet retries: the sidecar keeps trying, so it needs no restart."""
    port = free_port()
    side = start_unreachable(sidecar, f"redis://127.0.0.1:{port}/0")
    wait_for(lambda: attempts(side) >= 2, timeout=30, what="two attempts")
    server = EmbeddedRedis(port).start()
    try:
        wait_for(lambda: side.health()[0] == 200, timeout=40, what="the sidecar to connect")
        assert side.health()[1]["broker"]["attempts"] == 0
        assert "connected" in side.log()
    finally:
        server.cleanup()


def test_the_sidecar_talks_to_the_broker_it_was_given_whatever_the_environment_says(monkeypatch):
    """Celery's own settings read CELERY_BROKER_URL first: control and inspect must not follow it."""
    from celery_sidecar.monitor.intake.consumer import make_app

    monkeypatch.setenv("CELERY_BROKER_URL", "redis://elsewhere.invalid:6379/9")
    monkeypatch.setenv("CELERY_BROKER_WRITE_URL", "redis://elsewhere.invalid:6379/8")
    app = make_app("redis://127.0.0.1:6391/2", {})
    for connection in (app.connection_for_write(), app.connection_for_read(), app.connection()):
        assert (connection.hostname, connection.port, connection.virtual_host) == ("127.0.0.1", 6391, "2")

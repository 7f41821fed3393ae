"""`celery-sidecar demo` on a machine with nothing else: it shows metrics, stops by itself, cleans up."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from tests.support.paths import ARTIFACTS, SIDECAR, SUITE, child_env
from tests.support.procs import Metrics
from tests.support.servers import free_port, redis_server, wait_for

# Every test here starts the demo: a redis-server, a worker, Beat and a sidecar.
pytestmark = pytest.mark.e2e

DURATION = 25


def _redis_workdir(proc: psutil.Process) -> str | None:
    """The temp dir of the demo's private redis-server: ``--dir`` makes it redis' cwd."""
    try:
        return proc.cwd() if proc.name() == "redis-server" else None
    except psutil.Error:
        return None


def final_summary(output: str) -> dict:
    """The piped run's closing summary, parsed; fails when it is missing."""
    match = re.search(
        r"^demo summary: ran \d+ s on a private Redis: .*\((?P<sent>\d+) tasks sent\).*\n"
        r"  task outcomes: (?P<succeeded>\d+) succeeded, (?P<failed>\d+) failed, \d+ retried.*\n"
        r"  periodic entries: (?P<periodic>.*)\n"
        r"  alerts raised: (?P<raised>\d+)(?P<alerts>.*)$", output, re.MULTILINE)
    assert match, f"no final summary in the demo's output:\n{output}"
    found = match.groupdict()
    return {k: int(v) if v.isdigit() else v for k, v in found.items()}


def _check_piped_summary(output: str) -> None:
    """Through a pipe there is no live summary: the run ends with a short one instead."""
    final = final_summary(output)
    assert final["sent"] > 0 and final["succeeded"] > 0 and final["failed"] > 0, output
    assert final["raised"] >= 2 and "Task stuck" in final["alerts"] and "Task failed" in final["alerts"], output
    assert "demo-audit: " in final["periodic"] and "demo-tick: last ran" in final["periodic"], output


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class _Family:
    """Every process the demo started, as seen while it ran, and its private Redis' temp dirs."""

    def __init__(self, pid: int) -> None:
        self.me = psutil.Process(pid)
        self.children: dict[int, psutil.Process] = {}
        self.workdirs: set[str] = set()

    def record(self) -> None:
        try:
            for child in self.me.children(recursive=True):
                self.children.setdefault(child.pid, child)
                workdir = _redis_workdir(child)
                if workdir:
                    self.workdirs.add(workdir)
        except psutil.NoSuchProcess:
            pass

    def check_gone(self, workdir: str, port: int) -> None:
        try:
            wait_for(lambda: not any(_alive(p) for p in self.children.values()), timeout=10,
                     what="the demo's processes to exit")
        except TimeoutError:
            left = [(p.pid, p.cmdline()[:3]) for p in self.children.values() if _alive(p)]
            raise AssertionError(f"the demo left processes behind: {left}") from None
        assert not Path(workdir).exists(), f"the demo left its temp dir {workdir}"
        with httpx.Client() as http:
            try:
                http.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
            except httpx.TransportError:
                pass
            else:
                raise AssertionError(f"something still serves /metrics on :{port}")


def test_demo_shows_metrics_stops_by_itself_and_leaves_nothing_behind():
    port = free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out_path = ARTIFACTS / f"demo-{os.getpid()}-{time.monotonic_ns()}.log"
    with out_path.open("wb") as out:
        demo = subprocess.Popen(
            [sys.executable, *SIDECAR, "demo", "--duration", str(DURATION), "--port", str(port)],
            cwd=SUITE, env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    started = time.monotonic()
    family = _Family(demo.pid)

    def metrics() -> Metrics:
        family.record()
        return Metrics(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=3).text)

    try:
        def demo_is_busy() -> Metrics | None:
            if demo.poll() is not None:
                raise AssertionError(f"demo exited early with {demo.returncode}:\n{out_path.read_text()}")
            m = metrics()
            busy = (m.sum("celery_task_succeeded_total") > 0 and m.sum("celery_task_failed_total") > 0
                    and m.all("celery_worker_up") and all(v == 1 for v in m.all("celery_worker_up").values()))
            return m if busy else None

        try:
            m = wait_for(demo_is_busy, timeout=DURATION, interval=0.5, what="demo task metrics")
        except TimeoutError:
            raise AssertionError(f"no demo metrics on :{port}\n{out_path.read_text()}") from None
        # Every known task has its series from the start, at 0 (the pre-initialised series); the
        # ones that must never succeed stay there.
        demo_names = {dict(labels)["name"] for labels, value in m.all("celery_task_succeeded_total").items()
                      if value > 0}
        assert demo_names <= {"demo.ok", "demo.flaky", "demo.slow", "demo.report", "demo.tick"}, demo_names
        assert m.all("celery_queue_oldest_task_age_seconds", queue_name="celery")
        # The demo sends a task that runs past its 10 s limit, on purpose: it shows as stuck.
        try:
            wait_for(lambda: metrics().get("celery_task_stuck", name="demo.stuck") == 1, timeout=DURATION,
                     interval=0.5, what="the demo's stuck task")
        except TimeoutError:
            raise AssertionError(f"no stuck demo.stuck\n{out_path.read_text()}") from None
        # Beat runs the app's demo-tick every 10 s; demo-audit is only in the demo's sidecar config,
        # so it is missed (15 s + 3 s grace).
        def beat_seen() -> Metrics | None:
            m = metrics()
            ran = m.get("celery_beat_entry_last_run_timestamp_seconds", entry="demo-tick")
            return m if ran and m.get("celery_beat_entry_missed_total", entry="demo-audit") else None

        try:
            m = wait_for(beat_seen, timeout=DURATION, interval=0.5, what="demo-tick run and demo-audit missed")
        except TimeoutError:
            raise AssertionError(f"no Beat metrics\n{out_path.read_text()}") from None
        assert m.get("celery_beat_down") == 0
        assert m.get("celery_beat_entry_missed_total", entry="demo-tick") == 0
        assert {dict(labels)["exception"] for labels in m.all("celery_task_failed_total")} <= {"", "DemoError"}
        hosts = {dict(labels)["hostname"] for labels in m.all("celery_worker_up")}
        assert len(hosts) == 1 and hosts.pop().startswith("demo-worker@")

        # Children while it runs: redis-server, Beat, the worker and its pool processes.
        family.record()
        assert len(family.workdirs) == 1, f"expected one private redis-server among {family.children}"
        workdir = family.workdirs.pop()
        assert Path(workdir).is_dir()
        assert Path(workdir).name.startswith("celery-sidecar-redis-")
        assert Path(workdir).parent == Path(tempfile.gettempdir())
        assert len(family.children) >= 4, family.children
        assert any("beat" in p.cmdline() for p in family.children.values() if _alive(p)), family.children

        returncode = demo.wait(DURATION + 60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(5)
    elapsed = time.monotonic() - started
    output = out_path.read_text()

    assert returncode == 0, output
    assert elapsed >= DURATION, f"exited after {elapsed:.1f}s, before --duration {DURATION}"
    assert f"http://127.0.0.1:{port}/metrics" in output
    assert "exited unexpectedly" not in output, output
    _check_piped_summary(output)
    # (Tracebacks of demo.fail do appear: the console alert notifier prints them, on purpose.)
    family.check_gone(workdir, port)


# What would point the demo (or the celery processes it starts) somewhere else: someone's broker,
# result backend, config, state dir and Slack.
def _elsewhere(url: str, tmp: Path) -> dict[str, str]:
    config = tmp / "their-sidecar.yml"
    config.write_text("thresholds:\n  retry_rate_percent: 50\n")
    return {
        "CELERY_BROKER_URL": url, "SIDECAR_BROKER_URL": url, "BROKER_URL": url,
        "CELERY_BROKER_READ_URL": url, "CELERY_BROKER_WRITE_URL": url,
        "CELERY_RESULT_BACKEND": url.replace("/0", "/1"), "RESULT_BACKEND": url.replace("/0", "/1"),
        "SIDECAR_STATE_DIR": str(tmp / "state"), "SIDECAR_CONFIG": str(config),
        "CELERY_WORKER_STATEDB": str(tmp / "state" / "worker.db"),
        "CELERY_BEAT_SCHEDULE": str(tmp / "state" / "beat-schedule"),
        "SLACK_WEBHOOK_URL": "http://127.0.0.1:9/hooks/theirs",
    }


def test_the_demo_ignores_variables_pointing_elsewhere_and_touches_nothing_outside_its_own(tmp_path):
    duration = 8
    tmp, state, cwd = tmp_path / "tmp", tmp_path / "state", tmp_path / "cwd"
    for directory in (tmp, state, cwd):
        directory.mkdir()
    with redis_server() as theirs:
        # One connection per database, opened before counting: no other may come.
        clients = {db: redis.Redis(host="127.0.0.1", port=theirs.port, db=db) for db in (0, 1)}
        clients[0].set("app:key", "theirs")
        clients[1].set("app:result", "theirs")

        def keyspace() -> dict:
            return {db: (c.dbsize(), sorted(c.keys("*"))) for db, c in clients.items()}

        before = keyspace()
        connections = clients[0].info("stats")["total_connections_received"]
        elsewhere = _elsewhere(theirs.url, tmp_path)
        port = free_port()
        result = subprocess.run(
            [sys.executable, *SIDECAR, "demo", "--duration", str(duration), "--port", str(port)],
            cwd=cwd, env=child_env(TMPDIR=str(tmp), **elsewhere), capture_output=True, text=True,
            timeout=duration + 90,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        after = keyspace()
        assert after == before, f"the demo changed their Redis: {before} -> {after}\n{output}"
        assert clients[0].info("stats")["total_connections_received"] == connections, \
            f"something connected to their Redis\n{output}"
        for client in clients.values():
            client.close()

    first = result.stdout.splitlines()[0]
    assert first.startswith("the demo ignores ") and "private Redis" in first, result.stdout
    for name in elsewhere:
        assert name in first, (name, first)
    assert final_summary(result.stdout)["sent"] > 0, result.stdout
    assert f"http://127.0.0.1:{port}/metrics" in result.stdout
    assert "demo stopped: worker, Beat, sidecar and private Redis are gone" in result.stdout
    for directory in (tmp, state, cwd):
        assert not list(directory.iterdir()), f"the demo left files in {directory}: {list(directory.iterdir())}"


def test_the_demo_with_its_port_busy_says_so_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, *SIDECAR, "demo", "--duration", "30", "--port", str(port)],
            cwd=tmp_path, env=child_env(TMPDIR=str(tmp_path)), capture_output=True, text=True, timeout=60,
        )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{port}" in lines[0] and "--port 0" in lines[0], lines
    assert not list(tmp_path.iterdir()), "its private Redis and temp dir are removed"

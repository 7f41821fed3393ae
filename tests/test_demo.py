"""`celery-sidecar demo` on a machine with nothing else: it shows metrics, stops by itself, cleans up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from tests.support.paths import ARTIFACTS, SIDECAR, SUITE, child_env
from tests.support.procs import Metrics
from tests.support.servers import free_port, wait_for

DURATION = 25


def _redis_workdir(proc: psutil.Process) -> str | None:
    """The temp dir of the demo's private redis-server: ``--dir`` makes it redis' cwd."""
    try:
        return proc.cwd() if proc.name() == "redis-server" else None
    except psutil.Error:
        return None


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
    me = psutil.Process(demo.pid)
    children: dict[int, psutil.Process] = {}
    workdirs: set[str] = set()

    def record_children() -> None:
        try:
            for child in me.children(recursive=True):
                children.setdefault(child.pid, child)
                workdir = _redis_workdir(child)
                if workdir:
                    workdirs.add(workdir)
        except psutil.NoSuchProcess:
            pass

    def alive(proc: psutil.Process) -> bool:
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def metrics() -> Metrics:
        record_children()
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
        demo_names = {dict(labels)["name"] for labels in m.all("celery_task_succeeded_total")}
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
        assert {dict(labels)["exception"] for labels in m.all("celery_task_failed_total")} <= {"DemoError"}
        hosts = {dict(labels)["hostname"] for labels in m.all("celery_worker_up")}
        assert len(hosts) == 1 and hosts.pop().startswith("demo-worker@")

        # Children while it runs: redis-server, Beat, the worker and its pool processes.
        record_children()
        assert len(workdirs) == 1, f"expected one private redis-server among {children}"
        workdir = workdirs.pop()
        assert Path(workdir).is_dir()
        assert Path(workdir).name.startswith("celery-sidecar-redis-")
        assert Path(workdir).parent == Path(tempfile.gettempdir())
        assert len(children) >= 4, children
        assert any("beat" in p.cmdline() for p in children.values() if alive(p)), children

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
    # (Tracebacks of demo.fail do appear: the console alert notifier prints them, on purpose.)

    def all_gone() -> bool:
        return not any(alive(p) for p in children.values())

    try:
        wait_for(all_gone, timeout=10, what="the demo's processes to exit")
    except TimeoutError:
        left = [(p.pid, p.cmdline()[:3]) for p in children.values() if alive(p)]
        raise AssertionError(f"the demo left processes behind: {left}") from None
    assert not Path(workdir).exists(), f"the demo left its temp dir {workdir}"
    with httpx.Client() as http:
        try:
            http.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
        except httpx.TransportError:
            pass
        else:
            raise AssertionError(f"something still serves /metrics on :{port}")

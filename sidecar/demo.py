"""`celery-sidecar demo`: the whole loop on one machine, with nothing installed but this package.

It starts a private Redis (unless --broker-url is given), a demo Celery worker and Celery
Beat running sidecar/demo_tasks.py, a producer that keeps sending tasks that succeed, fail,
retry and run slowly, and the sidecar itself (reading the app's settings, as
``celery -A proj sidecar`` does); then draws a live summary until Ctrl-C or --duration.
Everything it started is stopped and its temp files removed on the way out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from celery_sidecar.app import read
from celery_sidecar.embedded_redis import EmbeddedRedis, free_port
from celery_sidecar.monitor.config import load_config, parse_config
from celery_sidecar.wiring import RunSettings, Sidecar

# Without --config: the documented defaults, except that demo.stuck may run 10 s (it runs 25),
# and one periodic entry that Beat does not have, so the demo shows a missed run (the app's
# own entry, demo-tick, comes from its beat_schedule and runs every 10 s).
DEMO_CONFIG = {"heavy_queues": ["heavy"],
               "thresholds": {"task_runtime_seconds": {"overrides": {"demo.stuck": 10}}},
               "beat": [{"entry": "demo-audit", "task": "demo.audit", "every": 15}]}
STUCK_EVERY = 60.0  # seconds between two demo.stuck tasks

# (task name, kwargs, weight): a mix with ~10 % failures and ~15 % flaky retries.
TRAFFIC = [
    ("demo.ok", {}, 60),
    ("demo.fail", {"reason": "demo failure"}, 8),
    ("demo.flaky", {"p_fail": 0.5}, 15),
    ("demo.slow", {"seconds": 1.5}, 12),
    ("demo.report", {"seconds": 3.0}, 5),
]


class _AlertLog(logging.Handler):
    """Keeps the last alert lines for the summary instead of scrolling them past it."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=6)

    def emit(self, record: logging.LogRecord) -> None:
        first = record.getMessage().splitlines()[0]
        self.lines.append(f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {first}")


class Demo:
    def __init__(self, broker_url: str | None, port: int, duration: float | None, config_path: Path | None,
                 rate: float, no_summary: bool) -> None:
        self.broker_url = broker_url
        self.port = port or free_port()
        self.duration = duration
        self.config_path = config_path
        self.rate = rate
        self.live = not no_summary and sys.stdout.isatty()
        self.stop = threading.Event()
        self.redis: EmbeddedRedis | None = None
        self.worker: subprocess.Popen | None = None
        self.beat: subprocess.Popen | None = None
        self.workdir = tempfile.TemporaryDirectory(prefix="celery-sidecar-demo-")
        self.sidecar: Sidecar | None = None
        self.sent = 0
        self.alert_log = _AlertLog()

    def run(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop.set())
        try:
            self._start()
            self._loop()
        finally:
            self._shutdown()

    # -- start and stop -----------------------------------------------------------------

    def _start(self) -> None:
        if self.broker_url is None:
            self.redis = EmbeddedRedis().start()
            self.broker_url = self.redis.url
            print(f"started a private Redis at {self.broker_url}")
        config = load_config(self.config_path) if self.config_path else parse_config(DEMO_CONFIG, "demo defaults")
        from celery_sidecar.demo_tasks import app

        self.sidecar = Sidecar(
            RunSettings(broker_url=self.broker_url, port=self.port, config_path=self.config_path,
                        app=read(app).defaults, probe_interval=2.0, inspect_interval=10.0,
                        state_dir=Path(self.workdir.name)),
            config,
        )
        logging.getLogger("alerts.console").addHandler(self.alert_log)
        logging.getLogger("alerts.console").propagate = not self.live
        self.sidecar.start()
        env = {**os.environ, "CELERY_BROKER_URL": self.broker_url}
        self.worker = self._celery(env, "worker", "-E", "-Q", "celery,heavy", "-c", "4", "-n", "demo-worker@%h",
                                   "--without-gossip", "--without-mingle")
        self.beat = self._celery(env, "beat", "-s", str(Path(self.workdir.name) / "celerybeat-schedule"))
        print(f"metrics: http://127.0.0.1:{self.port}/metrics   health: http://127.0.0.1:{self.port}/health")
        until = "" if self.duration is None else f" for {self.duration:g} s"
        print(f"demo worker and Beat started; sending tasks{until}")
        threading.Thread(target=self._produce, name="producer", daemon=True).start()

    @staticmethod
    def _celery(env: dict[str, str], *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_sidecar.demo_tasks", *args, "--loglevel=WARNING"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )

    def _shutdown(self) -> None:
        self.stop.set()
        print("\nstopping the demo...")
        # The sidecar goes first, so the worker's shutdown is not reported as an incident.
        if self.sidecar is not None:
            self.sidecar.stop()
        if self.beat is not None and self.beat.poll() is None:
            self.beat.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.beat.wait(10)
            if self.beat.poll() is None:
                self.beat.kill()
                self.beat.wait(5)
        if self.worker is not None and self.worker.poll() is None:
            # Cold shutdown: the demo's long tasks (demo.stuck runs 25 s) are not waited for.
            self.worker.send_signal(signal.SIGQUIT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.worker.wait(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.worker.pid, signal.SIGKILL)  # pool children too
            self.worker.wait(5)
        if self.redis is not None:
            self.redis.cleanup()
        self.workdir.cleanup()
        print("demo stopped: worker, Beat, sidecar and private Redis are gone")

    # -- traffic and summary --------------------------------------------------------------

    def _produce(self) -> None:
        from celery_sidecar.demo_tasks import app

        app.conf.broker_url = self.broker_url
        names = [t[0] for t in TRAFFIC]
        weights = [t[2] for t in TRAFFIC]
        kwargs = {t[0]: t[1] for t in TRAFFIC}
        next_stuck = time.monotonic()
        with app.producer_or_acquire() as producer:
            while not self.stop.wait(1.0 / self.rate):
                name = random.choices(names, weights)[0]
                if time.monotonic() >= next_stuck:
                    name, next_stuck = "demo.stuck", time.monotonic() + STUCK_EVERY
                try:
                    app.send_task(name, kwargs=kwargs.get(name, {}), producer=producer)
                    self.sent += 1
                except Exception as exc:  # noqa: BLE001 - the demo keeps going while the broker recovers
                    print(f"producer: {exc}", file=sys.stderr)

    def _loop(self) -> None:
        started = time.monotonic()
        while not self.stop.wait(1.0 if self.live else 5.0):
            for name, process in (("worker", self.worker), ("Beat", self.beat)):
                if process is not None and process.poll() is not None:
                    print(f"the demo {name} exited unexpectedly", file=sys.stderr)
                    self.stop.set()
            if self.stop.is_set():
                break
            self._draw(time.monotonic() - started)
            if self.duration is not None and time.monotonic() - started >= self.duration:
                break

    def _draw(self, elapsed: float) -> None:
        text = summary(self.sidecar, elapsed, self.sent, list(self.alert_log.lines))
        if self.live:
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
        else:
            sys.stdout.write(text.splitlines()[0] + "\n")
        sys.stdout.flush()


def summary(sidecar: Sidecar, elapsed: float, sent: int, alerts: list[str]) -> str:
    """The live summary: workers, queues, latency and retry rate against thresholds."""
    config = sidecar.config.current
    snap = sidecar.view.snapshot()
    t = config.thresholds
    intake = snap.intake
    events = sum(intake.events_by_type.values())
    p95 = snap.latency_p95
    retries = sorted(snap.retries.items())
    flag = {True: "!!", False: "ok"}
    lines = [
        f"celery-sidecar demo  {elapsed:5.0f}s  tasks sent {sent}  events {events}  "
        f"broker {'connected' if intake.connected else 'DISCONNECTED'}  latency from task-"
        f"{intake.latency_source}",
        "",
        f"WORKERS       up    active  pool  cpu%   (< {t.worker_cpu_percent:g})  mem%  (< {t.worker_memory_percent:g})",
    ]
    for w in snap.workers:
        lines.append(f"  {w.hostname[:28]:<28} {'up' if w.alive else 'DOWN':<5} {w.active:>3}/{w.pool_max or '?':<4}"
                     f" {_num(w.cpu_percent):>6}  {_num(w.memory_percent):>6}")
    lines += ["", "QUEUES        length   threshold normal/peak   oldest waiting (threshold)"]
    for queue, reading in sorted(snap.queues.items()):
        limits = config.queue_thresholds(queue)
        age = snap.queue_ages.get(queue)
        wait, wait_limit = (age.seconds, getattr(t.latency_seconds, age.task_class)) if age else (0.0, 0.0)
        lines.append(f"  {queue:<12} {reading.length:>6}   {limits.normal}/{limits.peak}  "
                     f"{flag[reading.length > limits.normal]}      {wait:6.1f}s (< {wait_limit:g}s) "
                     f"{flag[wait > wait_limit] if age else ''}")
    lines += ["", "RUNNING       now  longest so far   stuck (past its limit)"]
    for name, running in sorted(snap.running.items()):
        lines.append(f"  {name[:12]:<12} {running.running:>3}  {running.oldest_seconds:>8.1f}s       "
                     f"{running.stuck}  {flag[running.stuck > 0]}")
    lines += ["", "PERIODIC (Beat)   last run     next due in   late    missed"]
    for entry in snap.beat:
        last = "never" if entry.last_run is None else f"{snap.at - entry.last_run:5.0f}s ago"
        lines.append(f"  {entry.entry[:16]:<16} {last:>10}   {entry.next_due - snap.at:>8.0f}s   "
                     f"{entry.late:5.1f}s  {entry.missed_total:>4}  {flag[entry.missing_since is not None]}")
    if snap.beat_down_since is not None:
        lines.append("  !! Beat is not scheduling")
    lines += ["", "LATENCY (p95 queue wait)"]
    for task_class, limit in (("normal", t.latency_seconds.normal), ("heavy", t.latency_seconds.heavy)):
        value = p95.get(task_class)
        verdict = "" if value is None else flag[value > limit]
        lines.append(f"  {task_class:<8} {_num(value, 's'):>8}  threshold {limit:g}s  {verdict}")
    lines += ["", f"RETRY RATE (last {config.state.retry_window_seconds:g}s, threshold {t.retry_rate_percent:g}%)"]
    for name, (hits, total) in retries:
        ratio = hits / total if total else 0.0
        lines.append(f"  {name:<16} {ratio:>6.1%}  ({hits}/{total})  {flag[ratio * 100 > t.retry_rate_percent]}")
    lines += ["", "RECENT ALERTS (console; set SLACK_WEBHOOK_URL for Slack)"]
    lines += [f"  {line}" for line in alerts] or ["  none"]
    lines += ["", "Ctrl-C to stop"]
    return "\n".join(lines)


def _num(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.1f}{unit}"

"""`celery-sidecar demo`: the whole loop on one machine, with nothing installed but this package.

It starts a private Redis (unless --broker-url is given), a demo Celery worker and Celery
Beat running sidecar/demo_tasks.py, a producer that keeps sending tasks that succeed, fail,
retry and run slowly, and the sidecar itself (reading the app's settings, as
``celery -A proj sidecar`` does); then draws a live summary until Ctrl-C or --duration.
Everything it started is stopped and its temp files removed on the way out.

The demo is private: environment variables that would point it, or the celery processes it
starts, at another broker, result backend, config or state directory are ignored (and
removed from its children's environment), so it touches nothing but its private Redis and
its temp dir. Only its flags configure it.
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
from collections import Counter, deque
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import click
from click.core import ParameterSource

from celery_sidecar.app import read
from celery_sidecar.demo_summary import final_summary, raised_thresholds, summary
from celery_sidecar.embedded_redis import EmbeddedRedis
from celery_sidecar.monitor.config.settings import parse_config
from celery_sidecar.running import load_or_exit
from celery_sidecar.wiring import RunSettings, Sidecar

# Without --config: the documented defaults, except that demo.stuck may run 10 s (it runs 25),
# and one periodic entry that Beat does not have, so the demo shows a missed run (the app's
# own entry, demo-tick, comes from its beat_schedule and runs every 10 s).
DEMO_CONFIG = {"heavy_queues": ["heavy"],
               "thresholds": {"task_runtime_seconds": {"overrides": {"demo.stuck": 10}}},
               "beat": [{"entry": "demo-audit", "task": "demo.audit", "every": 15}]}
STUCK_EVERY = 60.0  # seconds between two demo.stuck tasks
STATUS_EVERY = 5.0  # seconds between two status lines when there is no live summary

# What celery and the sidecar read from the environment that could send the demo elsewhere:
# celery's settings (CELERY_BROKER_URL, CELERY_RESULT_BACKEND, CELERY_BROKER_READ_URL,
# CELERY_CONFIG_MODULE, CELERY_LOADER...) and its subcommands' options (CELERY_WORKER_STATEDB,
# CELERY_BEAT_SCHEDULE, pid and log files...); its global options (BROKER_URL, RESULT_BACKEND,
# APP, LOADER, CONFIG_MODULE, SKIP_CHECKS); DJANGO_SETTINGS_MODULE, which makes celery import a
# Django project; the sidecar's SIDECAR_* (state dir, config, broker) and SLACK_* (the demo's
# alerts go to the console only).
FOREIGN_PREFIXES = ("CELERY_", "SIDECAR_", "SLACK_")
FOREIGN_NAMES = frozenset({"BROKER_URL", "RESULT_BACKEND", "APP", "LOADER", "CONFIG_MODULE", "SKIP_CHECKS",
                           "DJANGO_SETTINGS_MODULE"})

# (task name, kwargs, weight): a mix with ~10 % failures and ~15 % flaky retries.
TRAFFIC = [
    ("demo.ok", {}, 60),
    ("demo.fail", {"reason": "demo failure"}, 8),
    ("demo.flaky", {"p_fail": 0.5}, 15),
    ("demo.slow", {"seconds": 1.5}, 12),
    ("demo.report", {"seconds": 3.0}, 5),
]


def foreign_variables(environ: Mapping[str, str]) -> list[str]:
    """The variables of ``environ`` the demo ignores, sorted."""
    return sorted(k for k in environ if k.startswith(FOREIGN_PREFIXES) or k in FOREIGN_NAMES)


@contextlib.contextmanager
def _environment_without(names: Collection[str]) -> Iterator[None]:
    """This process's environment without ``names`` while the demo runs.

    Celery reads CELERY_BROKER_URL and CELERY_RESULT_BACKEND from os.environ on every
    connection, ahead of an app's own settings: the producer's and the sidecar's Celery apps
    would use them in spite of the broker URL they were given.
    """
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _from_environment(param: str) -> bool:
    """Whether the running click command took ``param`` from an environment variable."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(param) is ParameterSource.ENVIRONMENT


def _param_default(param: str, fallback: int) -> int:
    ctx = click.get_current_context(silent=True)
    for option in ctx.command.params if ctx is not None else ():
        if option.name == param:
            return option.get_default(ctx) or fallback
    return fallback


class _AlertLog(logging.Handler):
    """Keeps the last alert lines for the summary instead of scrolling them past it, and counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=6)
        self.raised: Counter[str] = Counter()  # by title up to its first colon: "Task failed"
        self.resolved = 0

    def emit(self, record: logging.LogRecord) -> None:
        first = record.getMessage().splitlines()[0]
        self.lines.append(f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {first}")
        # The console's first line is "[SEVERITY] title" (alerts/delivery/templates/default.txt.j2).
        title = first.split("] ", 1)[-1]
        if title.lower().startswith("resolved"):
            self.resolved += 1
        else:
            self.raised[title.split(":", 1)[0]] += 1


class Demo:
    def __init__(self, broker_url: str | None, port: int, duration: float | None, config_path: Path | None,
                 rate: float, no_summary: bool) -> None:
        # The command's flags also read environment variables; from there they are ignored too.
        self.ignored = foreign_variables(os.environ)
        if _from_environment("broker_url"):
            broker_url = None
        if _from_environment("config_path"):
            config_path = None
        if _from_environment("port"):
            port = _param_default("port", 9808)
        self.broker_url = broker_url
        self.port = port
        self.duration = duration
        self.config_path = config_path
        self.rate = rate
        self.live = not no_summary and sys.stdout.isatty()
        self.stop = threading.Event()
        self.redis: EmbeddedRedis | None = None
        self.worker: subprocess.Popen | None = None
        self.beat: subprocess.Popen | None = None
        self.producer: threading.Thread | None = None
        self.workdir: tempfile.TemporaryDirectory | None = None
        self.sidecar: Sidecar | None = None
        self.running = False  # everything started: the way out reports what it stops
        self.started_at = time.monotonic()
        self.sent = 0
        self.alert_log = _AlertLog()

    def run(self) -> None:
        if self.ignored:
            where = "the broker of --broker-url" if self.broker_url else "its own private Redis"
            print(f"the demo ignores {', '.join(self.ignored)} from the environment: it runs on {where} "
                  "and its own temp dir")
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop.set())
        with _environment_without(self.ignored):
            try:
                self._start()
                self._loop()
            finally:
                self._shutdown()

    # -- start and stop -----------------------------------------------------------------

    def _start(self) -> None:
        config = load_or_exit(self.config_path) if self.config_path else parse_config(DEMO_CONFIG, "demo defaults")
        self.workdir = tempfile.TemporaryDirectory(prefix="celery-sidecar-demo-")
        broker_url = self.broker_url
        if broker_url is None:
            self.redis = EmbeddedRedis()
            try:
                self.redis.start()
            except (OSError, RuntimeError) as exc:
                raise click.ClickException(f"cannot start the demo's private Redis: {exc}") from None
            broker_url = self.redis.url
        from celery_sidecar.demo_tasks import app

        # The producer runs here on the demo app: its broker is the demo's, whatever the
        # module read at import.
        app.conf.broker_url = broker_url
        try:
            self.sidecar = Sidecar(
                RunSettings(broker_url=broker_url, port=self.port, config_path=self.config_path,
                            app=read(app).defaults, probe_interval=2.0, inspect_interval=10.0,
                            state_dir=Path(self.workdir.name)),
                config,
            )
        except OSError as exc:
            hint = "; --port 0 picks a free port" if self.port else ""
            raise click.ClickException(f"{exc}{hint}") from None
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        if self.redis is not None:
            print(f"started a private Redis at {broker_url}")
        logging.getLogger("alerts.console").addHandler(self.alert_log)
        logging.getLogger("alerts.console").propagate = not self.live
        self.started_at = time.monotonic()
        self.running = True
        self.sidecar.start()
        env = {k: v for k, v in os.environ.items() if k not in self.ignored}
        env["CELERY_BROKER_URL"] = broker_url
        self.worker = self._celery(env, "worker", "-E", "-Q", "celery,heavy", "-c", "4", "-n", "demo-worker@%h",
                                   "--without-gossip", "--without-mingle")
        self.beat = self._celery(env, "beat", "-s", str(Path(self.workdir.name) / "celerybeat-schedule"))
        port = self.sidecar.http.port
        print(f"metrics: http://127.0.0.1:{port}/metrics   health: http://127.0.0.1:{port}/health")
        until = "" if self.duration is None else f" for {self.duration:g} s"
        print(f"demo worker and Beat started; sending tasks{until}", flush=True)
        self.producer = threading.Thread(target=self._produce, args=(app,), name="producer", daemon=True)
        self.producer.start()

    def _celery(self, env: dict[str, str], *args: str) -> subprocess.Popen:
        assert self.workdir is not None
        # In the temp dir, so nothing celery writes by default lands where the demo was started.
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_sidecar.demo_tasks", *args, "--loglevel=WARNING"],
            env=env, cwd=self.workdir.name, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _shutdown(self) -> None:
        self.stop.set()
        elapsed = time.monotonic() - self.started_at
        if self.running:
            print("\nstopping the demo...")
        # The sidecar goes first, so the worker's shutdown is not reported as an incident.
        if self.sidecar is not None and self.running:
            self.sidecar.stop()
        if self.producer is not None:
            # Before the environment comes back: a send after that could reach another broker.
            self.producer.join(10)
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
        if self.workdir is not None:
            self.workdir.cleanup()
        logging.getLogger("alerts.console").removeHandler(self.alert_log)
        if self.running and self.sidecar is not None:
            print(final_summary(self.sidecar.view.snapshot(), elapsed, self.sent, self.alert_log,
                                private=self.redis is not None, alerts_logged=not self.live))
            gone = ["worker", "Beat", "sidecar"] + (["private Redis"] if self.redis is not None else [])
            print(f"demo stopped: {', '.join(gone[:-1])} and {gone[-1]} are gone", flush=True)

    # -- traffic and summary --------------------------------------------------------------

    def _produce(self, app) -> None:
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
        every = 1.0 if self.live else STATUS_EVERY
        deadline = None if self.duration is None else self.started_at + self.duration
        while True:
            timeout = every if deadline is None else max(0.0, min(every, deadline - time.monotonic()))
            if self.stop.wait(timeout):
                break
            for name, process in (("worker", self.worker), ("Beat", self.beat)):
                if process is not None and process.poll() is not None:
                    print(f"the demo {name} exited unexpectedly", file=sys.stderr)
                    self.stop.set()
            if self.stop.is_set():
                break
            self._draw(time.monotonic() - self.started_at)
            if deadline is not None and time.monotonic() >= deadline:
                break

    def _draw(self, elapsed: float) -> None:
        assert self.sidecar is not None
        text = summary(self.sidecar.config.current, self.sidecar.view.snapshot(), elapsed, self.sent,
                       list(self.alert_log.lines), raised_thresholds(self.sidecar.alerts))
        if self.live:
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
        else:
            sys.stdout.write(text.splitlines()[0] + "\n")
        sys.stdout.flush()

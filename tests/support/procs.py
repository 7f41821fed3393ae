"""Real processes for tests: the sidecar and Celery workers, each killed after the test."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.support.paths import ARTIFACTS, SIDECAR, SUITE, child_env
from tests.support.servers import free_port, wait_for
from tests.support.tier import require_e2e

_env = child_env
T = TypeVar("T")


class Process:
    """A child process in its own session, with its output in a log file kept for failures."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        require_e2e(f"a {name} process")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = ARTIFACTS / f"{name}-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            args, env=env, cwd=cwd or SUITE, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole process group."""
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self.kill(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def start_worker(broker_url: str, *, name: str, events: bool = True, queues: str = "celery,heavy",
                 concurrency: int = 2, app: str = "celery_sidecar.demo_tasks", extra: Iterable[str] = (),
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> Process:
    args = [sys.executable, "-m", "celery", "-A", app, "worker", "-n", f"{name}@%h", "-Q", queues,
            "-c", str(concurrency), "--loglevel=INFO", "--without-gossip", "--without-mingle", *extra]
    if events:
        args.append("-E")
    return Process(f"worker-{name}", args, _env(CELERY_BROKER_URL=broker_url, **(env or {})), cwd=cwd)


class Metrics:
    """Parsed /metrics: samples by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, /, **labels: str) -> float | None:
        """The value of the one sample whose labels include ``labels`` (None if absent)."""
        matches = self.all(name, **labels)
        if len(matches) > 1:
            raise AssertionError(f"{name}{labels} matches {len(matches)} series: {matches}")
        return next(iter(matches.values()), None)

    def sum(self, name: str, /, **labels: str) -> float:
        return sum(self.all(name, **labels).values())

    def all(self, name: str, /, **labels: str) -> dict[frozenset, float]:
        want = set(labels.items())
        return {lbl: v for (n, lbl), v in self.samples.items() if n == name and want <= set(lbl)}


def _by(metrics: Metrics, name: str, label: str) -> dict[str, float]:
    return {dict(lbl).get(label, ""): v for lbl, v in metrics.all(name).items() if v}


class SidecarProcess(Process):
    def __init__(self, broker_url: str | None, *args: str, config: Path | None = None,
                 env: dict[str, str] | None = None, wait_connected: bool = True,
                 command: Sequence[str] = (*SIDECAR, "run")) -> None:
        """Start the sidecar (``python -m celery_sidecar run`` unless ``command`` says otherwise,
        e.g. ``-m celery -A app sidecar``); by default wait until it is subscribed, so no event
        is missed. Without ``broker_url`` the broker comes from the app."""
        self.port = free_port()
        self.state_dir = tempfile.mkdtemp(prefix="sidecar-state-")
        self._wait_connected = wait_connected
        self.url = f"http://127.0.0.1:{self.port}"
        broker = ["--broker-url", broker_url] if broker_url else []
        cmd = [sys.executable, *command, *broker, "--port", str(self.port),
               "--probe-interval", "0.5", "--inspect-interval", "2", "--probe-timeout", "2",
               "--state-dir", self.state_dir, *args]
        if config is not None:
            cmd += ["--config", str(config)]
        super().__init__("sidecar", cmd, _env(**(env or {})))
        try:
            wait_for(self._ready, timeout=20, what="the sidecar's /health")
        except TimeoutError:
            self.stop()
            raise AssertionError(f"sidecar did not start:\n{self.log()}") from None
        except BaseException:
            self.stop()  # it exited: nobody else holds it to stop
            raise

    def _ready(self) -> bool:
        code = self._get("/health", timeout=2).status_code
        return code == 200 or (code == 503 and not self._wait_connected)

    def check_alive(self) -> None:
        """An AssertionError, with the log, once the sidecar has exited: every wait on it ends at once."""
        if self.proc.poll() is not None:
            raise AssertionError(f"sidecar exited with {self.proc.returncode}:\n{self.log()[-4000:]}")

    def _get(self, path: str, timeout: float = 5) -> httpx.Response:
        self.check_alive()
        return httpx.get(f"{self.url}{path}", timeout=timeout)

    def stop(self, timeout: float = 10) -> int | None:
        code = super().stop(timeout)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return code

    def metrics(self) -> Metrics:
        return Metrics(self._get("/metrics").text)

    def health(self) -> tuple[int, dict]:
        response = self._get("/health")
        return response.status_code, response.json()

    def settled(self, timeout: float = 20) -> None:
        """Every alert this sidecar took on is delivered."""
        self.wait_metric("celery_sidecar_alerts_pending", lambda v: v == 0, timeout=timeout)

    def decided(self, moment: float, timeout: float = 30) -> None:
        """Wait until the sidecar has evaluated its time-based alerts at or after ``moment``
        (wall clock) and delivered whatever that produced: from then on, nothing about
        ``moment`` can still arrive. For "and nothing else happens", instead of a sleep."""
        self.wait_metric("celery_sidecar_last_tick_timestamp_seconds", lambda v: v >= moment, timeout=timeout)
        self.settled(timeout)

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def wait_metric(self, name: str, predicate: Callable[[float], bool], /, timeout: float = 20,
                    **labels: str) -> float:
        """Poll /metrics until the summed value of matching series satisfies predicate."""
        last: float | None = None
        seen: Metrics | None = None

        def check() -> bool:
            nonlocal last, seen
            seen = self.metrics()
            last = seen.sum(name, **labels) if seen.all(name, **labels) else None
            return last is not None and predicate(last)

        def failure() -> str:
            # What the sidecar did see, so that a failure says whether events arrived at all.
            said = f"{name}{labels} never satisfied the condition; last value {last}"
            if seen is None:
                return said
            series = {tuple(sorted(dict(lbl).items())): v for lbl, v in seen.all(name).items() if v}
            return (f"{said}\n{name}, every non-zero series: {series}\n"
                    f"events folded: {_by(seen, 'celery_sidecar_events_total', 'type')}\n"
                    f"events skipped: {_by(seen, 'celery_sidecar_events_skipped_total', 'reason')}")

        self._wait(check, timeout, failure, interval=0.2)
        return last  # type: ignore[return-value]

    def wait_health(self, status: int, timeout: float = 20) -> dict:
        """Poll /health until it answers ``status`` (200: connected to the broker; 503: not); its body."""
        last: int | None = None

        def check() -> dict | None:
            nonlocal last
            last, body = self.health()
            return body if last == status else None

        return self._wait(check, timeout, lambda: f"/health never answered {status}; last {last}")

    def wait_worker_up(self, name: str, timeout: float = 30) -> str:
        """Wait until the sidecar sees the worker ``name`` (``-n name@%h``) up; its full hostname."""
        workers: dict[str, str] = {}

        def up() -> str | None:
            workers.clear()
            workers.update(self.health()[1]["workers"])
            return next((h for h, s in workers.items() if h.startswith(f"{name}@") and s == "up"), None)

        return self._wait(up, timeout, lambda: f"the sidecar never saw worker {name} up; workers: {workers}")

    def wait_log(self, text: str, timeout: float = 10) -> None:
        """Wait until the sidecar's log holds ``text``."""
        self._wait(lambda: text in self.log(), timeout, lambda: f"{text!r} never appeared in the sidecar's log")

    def wait_probe_rounds(self, rounds: int, timeout: float = 15) -> None:
        """Wait until the queue probe has run ``rounds`` more times (its reading's age drops)."""
        age: float | None = None
        seen = 0

        def another_round() -> bool:
            nonlocal age, seen
            now = self.metrics().get("celery_queue_probe_age_seconds")
            if now is not None and age is not None and now < age:
                seen += 1
            age = now
            return seen >= rounds

        self._wait(another_round, timeout, lambda: f"{seen} of {rounds} more queue probe rounds")

    def _wait(self, predicate: Callable[[], T], timeout: float, failure: Callable[[], str],
              interval: float = 0.1) -> T:
        """wait_for; on a timeout, an AssertionError saying ``failure()``, with the end of the log."""
        try:
            return wait_for(predicate, timeout=timeout, interval=interval, what="the sidecar")
        except TimeoutError:
            raise AssertionError(f"{failure()}\n--- sidecar log ---\n{self.log()[-4000:]}") from None

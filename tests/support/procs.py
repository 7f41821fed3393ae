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
from collections.abc import Iterable, Sequence
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.support.paths import ARTIFACTS, SIDECAR, SUITE, child_env
from tests.support.servers import free_port, wait_for

_env = child_env


class Process:
    """A child process in its own session, with its output in a log file kept for failures."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
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

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"sidecar exited with {self.proc.returncode}:\n{self.log()}")
        code = httpx.get(f"{self.url}/health", timeout=2).status_code
        return code == 200 or (code == 503 and not self._wait_connected)

    def stop(self, timeout: float = 10) -> int | None:
        code = super().stop(timeout)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return code

    def metrics(self) -> Metrics:
        return Metrics(httpx.get(f"{self.url}/metrics", timeout=5).text)

    def health(self) -> tuple[int, dict]:
        response = httpx.get(f"{self.url}/health", timeout=5)
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

    def wait_metric(self, name: str, predicate, /, timeout: float = 20, **labels: str) -> float:
        """Poll /metrics until the summed value of matching series satisfies predicate."""
        last: list[float | None] = [None]

        def check() -> bool:
            metrics = self.metrics()
            last[0] = metrics.sum(name, **labels) if metrics.all(name, **labels) else None
            return last[0] is not None and predicate(last[0])

        try:
            wait_for(check, timeout=timeout, interval=0.2, what=f"{name}{labels}")
        except TimeoutError:
            raise AssertionError(
                f"{name}{labels} never satisfied the condition; last value {last[0]}\n--- sidecar log ---\n"
                + self.log()[-4000:]
            ) from None
        return last[0]  # type: ignore[return-value]

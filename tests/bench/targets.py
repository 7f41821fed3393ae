"""The consumers under test, each a separate process: the real sidecar, or a bare counter."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.support.paths import SIDECAR, SUITE
from tests.support.servers import free_port, wait_for

_EVENTS_TOTAL = re.compile(rb"^celery_sidecar_events_total\{[^}]*\} ([0-9.e+]+)$", re.M)
_SKIPPED_TOTAL = re.compile(rb"^celery_sidecar_events_skipped_total\{[^}]*\} ([0-9.e+]+)$", re.M)
_RECONNECTS = re.compile(rb"^celery_sidecar_reconnects_total ([0-9.e+]+)$", re.M)


@dataclass
class Target:
    """A consumer process; ``count()`` is how many events it has taken in."""

    label: str
    argv: list[str]
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="sidecar-bench-"))
    process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(os.path.join(self.workdir, "consumer.log"), "wb")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(self.argv, cwd=SUITE, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def ps(self) -> psutil.Process:
        assert self.process is not None
        return psutil.Process(self.process.pid)

    def count(self) -> int:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = Path(self.workdir, "consumer.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the process and remove its working directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


class CountingConsumer(Target):
    """tests/bench/consumers.py: a bare EventReceiver or fast-path reader that only counts."""

    def __init__(self, mode: str, broker_url: str) -> None:
        super().__init__(label=f"bare {mode} consumer", argv=[])
        self.count_file = os.path.join(self.workdir, "count")
        self.argv = [sys.executable, "-m", "tests.bench.consumers", mode, broker_url, self.count_file]

    def count(self) -> int:
        try:
            return int(Path(self.count_file).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def ready(self) -> bool:
        return Path(self.count_file).exists()


class Sidecar(Target):
    """The real sidecar: ``python -m celery_sidecar run``; counts come from its /metrics."""

    def __init__(self, broker_url: str, fast_path: bool = True, config: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        argv = [sys.executable, *SIDECAR, "run", "--broker-url", broker_url, "--port", str(self.port)]
        if config:
            argv += ["--config", config]
        if not fast_path:
            argv.append("--no-fast-path")
        label = "sidecar" + ("" if fast_path else " (stock EventReceiver)")
        super().__init__(label=label, argv=argv + list(extra))
        # Anything the sidecar writes (an alert outbox on non-Redis brokers) stays in our workdir.
        self.argv += ["--state-dir", self.workdir]

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def scrape(self, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as response:
            return response.read()

    def timed_scrape(self) -> tuple[float, int]:
        """(seconds, bytes) of one /metrics request."""
        start = time.perf_counter()
        body = self.scrape()
        return time.perf_counter() - start, len(body)

    def health(self, timeout: float = 30.0) -> dict:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:  # 503 while the broker is unreachable: same body
            body = exc.read()
        return json.loads(body)

    def count(self) -> int:
        """Events consumed, from /health. Not from /metrics: a scrape renders every dirty
        series, and it also wakes the sidecar's prerender thread for ten minutes (it renders
        ahead only for a scraper), so polling /metrics through a drain would measure the
        scrapes as much as the events. (Sidecars older than /health's ``events``: /metrics.)"""
        events = self.health().get("events")
        if events is not None:
            return int(events["consumed"])
        return int(sum(float(v) for v in _EVENTS_TOTAL.findall(self.scrape())))

    def skipped(self) -> int:
        return int(sum(float(v) for v in _SKIPPED_TOTAL.findall(self.scrape())))

    def reconnects(self) -> int:
        found = _RECONNECTS.findall(self.scrape())
        return int(float(found[0])) if found else 0

    def ready(self) -> bool:
        try:
            self.health(timeout=1)
            return True
        except (OSError, ValueError):
            return False


def start_and_wait(target: Target, timeout: float = 30.0) -> None:
    target.start()
    try:
        wait_for(lambda: target.ready() or not target.alive(), timeout=timeout,
                 what=f"{target.label} to start")
    except TimeoutError:
        target.stop()
        raise
    if not target.alive():
        raise RuntimeError(f"{target.label} exited at start:\n{target.log_tail()}")

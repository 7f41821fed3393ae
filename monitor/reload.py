"""Hot reload: poll the config file and swap in a valid edit live; refuse an invalid one.

An edit is loaded and validated whole (the schema, then every check the wiring
registered: templates that must render, channels bot mode needs) before it replaces
``LiveConfig.current``. A refused edit changes nothing: the previous config stays live.

Polling (once a second, by content hash) rather than inotify, because it also follows
Kubernetes ConfigMap symlink swaps and editors that replace the file.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from celery_sidecar.monitor.config import Config, ConfigError, LiveConfig, load_config
from celery_sidecar.monitor.status import Status

log = logging.getLogger(__name__)


class ConfigReloader:
    def __init__(
        self, path: Path, live: LiveConfig, status: Status, checks: list[Callable[[Config], None]] | None = None,
        interval: float = 1.0,
    ) -> None:
        self._path = path
        self._live = live
        self._checks = list(checks or [])
        self._status = status
        self._interval = interval
        self._digest = self._read_digest()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="config-reload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self._path.read_bytes()).hexdigest()
        except OSError:
            return None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check()

    def check(self) -> bool:
        """Reload if the file changed; True when a new config was applied."""
        digest = self._read_digest()
        if digest == self._digest:
            return False
        self._digest = digest
        try:
            config = load_config(self._path)
        except ConfigError as exc:
            log.error("config edit refused, previous config stays live:\n%s", exc)
            self._status.reload_result(False, str(exc))
            return False
        try:
            for check in self._checks:
                check(config)
        except ValueError as exc:  # e.g. an alert template that does not render
            log.error("config edit refused, previous config stays live:\n%s: %s", self._path, exc)
            self._status.reload_result(False, f"{self._path}: {exc}")
            return False
        self._live.current = config
        self._status.reload_result(True)
        log.info("config reloaded from %s: %s", self._path, describe_thresholds(config))
        return True


def describe_thresholds(cfg: Config) -> str:
    t = cfg.thresholds
    return (
        f"latency < {t.latency_seconds.normal:g}s normal / {t.latency_seconds.heavy:g}s heavy, "
        f"queue length < {t.queue_length.normal} normal / {t.queue_length.peak} peak, "
        f"cpu < {t.worker_cpu_percent:g}%, memory < {t.worker_memory_percent:g}%, "
        f"retry rate < {t.retry_rate_percent:g}%"
    )

"""Hot reload: poll the config file and swap in a valid edit live; refuse an invalid one.

An edit is loaded and validated whole (the schema, then every check the wiring
registered: templates that must render, channels bot mode needs) before it replaces
``LiveConfig.current``. A refused edit changes nothing: the previous config stays live.

Polling (once a second, by content hash) rather than inotify, because it also follows
Kubernetes ConfigMap symlink swaps and editors that replace the file.

Whatever the path holds at a poll (bytes that are not UTF-8, a binary file, nothing at all,
a directory, a file it may not read) is a refused edit like an invalid key: said once in the
log, on /health and in ``celery_sidecar_config_valid``, until the file changes again. The
loop outlives anything one poll raises; ``running`` and ``last_check_at`` let /health tell
when it has stopped anyway.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from celery_sidecar.monitor.config.settings import (
    Config,
    ConfigError,
    LiveConfig,
    config_from_bytes,
    read_config_file,
)

log = logging.getLogger(__name__)


class ConfigReloader:
    def __init__(
        self, path: Path, live: LiveConfig, report: Callable[[bool, str | None], None],
        checks: list[Callable[[Config], None]] | None = None, interval: float = 1.0,
    ) -> None:
        """``report(ok, error)`` hears every reload's outcome (the wiring passes
        ``Status.reload_result``: config is a leaf, it does not know the fold's status)."""
        self._path = path
        self._live = live
        self._checks = list(checks or [])
        self._report = report
        self._interval = interval
        self._seen, _ = self._read()
        self.last_check_at: float | None = None  # wall clock of the last finished poll
        self._last_failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="config-reload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def health(self, now: float | None = None) -> dict[str, bool | float | None]:
        """For /health: whether edits are still being followed. A loop alive but stuck (a
        read hanging on a dead network mount) counts as stopped once it has missed ten polls."""
        now = time.time() if now is None else now
        age = None if self.last_check_at is None else round(now - self.last_check_at, 1)
        stalled = age is not None and age > max(30.0, 10 * self._interval)
        return {"running": self.running and not stalled, "last_check_seconds_ago": age}

    def _read(self) -> tuple[str, bytes | ConfigError]:
        """(what identifies the file's state, its bytes or why they cannot be read). An
        unreadable file is identified by its error, so it is reported once, not every poll,
        and the same content coming back after it counts as a change."""
        try:
            data = read_config_file(self._path)
        except ConfigError as exc:
            return f"unreadable: {exc}", exc
        return hashlib.sha256(data).hexdigest(), data

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check()
            except Exception as exc:  # one poll's failure must not end hot reload: log it, poll again
                # Once per distinct failure: a failure that repeats every poll would flood the log.
                if repr(exc) != self._last_failure:
                    self._last_failure = repr(exc)
                    log.exception("config reload: checking %s failed; trying again every %gs",
                                  self._path, self._interval)
            self.last_check_at = time.time()

    def check(self) -> bool:
        """Reload if the file changed; True when a new config was applied."""
        seen, data = self._read()
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            if isinstance(data, ConfigError):
                raise data
            config = config_from_bytes(data, str(self._path))
            for check in self._checks:
                check(config)
        except ConfigError as exc:
            return self._refuse(str(exc))
        except Exception as exc:  # noqa: BLE001 - e.g. an alert template that does not render
            return self._refuse(f"{self._path}: {exc}" if isinstance(exc, ValueError) else
                                f"{self._path}: cannot be used: {type(exc).__name__}: {exc}")
        self._live.current = config
        self._report(True, None)
        log.info("config reloaded from %s: %s", self._path, describe_thresholds(config))
        return True

    def _refuse(self, error: str) -> bool:
        log.error("config edit refused, previous config stays live:\n%s", error)
        self._report(False, error)
        return False


def describe_thresholds(cfg: Config) -> str:
    t = cfg.thresholds
    return (
        f"latency < {t.latency_seconds.normal:g}s normal / {t.latency_seconds.heavy:g}s heavy, "
        f"queue length < {t.queue_length.normal} normal / {t.queue_length.peak} peak, "
        f"cpu < {t.worker_cpu_percent:g}%, memory < {t.worker_memory_percent:g}%, "
        f"retry rate < {t.retry_rate_percent:g}%"
    )

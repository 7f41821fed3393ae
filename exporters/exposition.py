"""What /metrics serves, rendered so that nothing in it can fail the whole scrape.

The body is the fast task metrics (exporters/event_metrics.py) followed by every
registered collector. Each collector is collected on its own and each family rendered on
its own: a collector that raises, or a family with a sample prometheus_client cannot
render, loses only that (a family is retried sample by sample), and the loss is counted
in ``celery_sidecar_render_errors_total``. Prometheus keeps seeing the target up, and
every other series, whatever one bad value does.

``Exposition`` is also the registry the sidecar's own metrics register with (it has the
``register``/``unregister``/``collect`` of a prometheus_client registry).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import generate_latest

log = logging.getLogger(__name__)


class _One:
    """One family, in the shape generate_latest renders."""

    def __init__(self, family: Metric) -> None:
        self._family = family

    def collect(self) -> Iterable[Metric]:
        return (self._family,)


class Exposition:
    def __init__(self, fast: Callable[[], bytes] = bytes, fast_errors: Callable[[], int] = int) -> None:
        self._fast = fast
        self._fast_errors = fast_errors
        self._collectors: list[Any] = []
        self._lock = threading.Lock()
        self.render_errors = 0

    # -- the registry side ---------------------------------------------------------------

    def register(self, collector: Any) -> None:
        with self._lock:
            self._collectors.append(collector)

    def unregister(self, collector: Any) -> None:
        with self._lock:
            self._collectors.remove(collector)

    def collect(self) -> Iterator[Metric]:
        """Every family of every collector; a collector that raises is skipped and counted."""
        with self._lock:
            collectors = list(self._collectors)
        for collector in collectors:
            try:
                families = list(collector.collect())
            except Exception:  # noqa: BLE001 - one broken collector must not blind /metrics
                self._failed(f"collector {type(collector).__name__}")
                continue
            yield from families

    # -- /metrics ------------------------------------------------------------------------

    def render(self) -> list[bytes]:
        """The /metrics body as chunks (written one by one: the task metrics can be tens of MB)."""
        chunks = [self._fast()]
        for family in self.collect():
            chunks.append(self._render_family(family))
        errors = CounterMetricFamily(
            "celery_sidecar_render_errors",
            "Series left out of /metrics because they could not be rendered (the scrape still succeeds).",
            value=self.render_errors + self._fast_errors(),
        )
        chunks.append(generate_latest(_One(errors)))
        return chunks

    def _render_family(self, family: Metric) -> bytes:
        try:
            return generate_latest(_One(family))
        except Exception:  # noqa: BLE001 - retry sample by sample, keep what renders
            pass
        kept = Metric(family.name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            single = Metric(family.name, family.documentation, family.type, family.unit)
            single.samples = [sample]
            try:
                generate_latest(_One(single))
            except Exception:  # noqa: BLE001
                self._failed(f"a sample of {family.name}")
                continue
            kept.samples.append(sample)
        try:
            return generate_latest(_One(kept))
        except Exception:  # noqa: BLE001 - the family itself (its name) does not render
            self._failed(f"family {family.name!r}")
            return b""

    def _failed(self, what: str) -> None:
        self.render_errors += 1
        if self.render_errors <= 10 or self.render_errors % 1000 == 0:
            log.exception("left %s out of /metrics (%d so far)", what, self.render_errors)

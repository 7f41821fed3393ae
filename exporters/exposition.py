"""What /metrics serves, rendered so that nothing in it can fail the whole scrape.

The body is the fast task metrics (exporters/event_metrics.py) followed by every
registered collector. Each collector is collected on its own and each family rendered on
its own: a collector that raises, or a family with a sample prometheus_client cannot
render, loses only that (a family is retried sample by sample), and the loss is counted
in ``celery_sidecar_render_errors_total``. Prometheus keeps seeing the target up, and
every other series, whatever one bad value does.

It is also the one place every collector's family passes through, so the controls that
apply to all of them are applied here (exporters/controls.py): a family turned off
(``cardinality.disable_families``) is left out, a series of a task left out by
``cardinality.include_tasks``/``exclude_tasks`` (a ``name`` label) is dropped, and the
static labels (``--static-label``) are added to every series. The fast task metrics apply
the same controls themselves, as they render.

``Exposition`` is also the registry the sidecar's own metrics register with (it has the
``register``/``unregister``/``collect`` of a prometheus_client registry).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from celery_sidecar.exporters.controls import Controls, ControlsOf
from celery_sidecar.monitor.config.settings import LiveConfig

log = logging.getLogger(__name__)


class _One:
    """One family, in the shape generate_latest renders."""

    def __init__(self, family: Metric) -> None:
        self._family = family

    def collect(self) -> Iterable[Metric]:
        return (self._family,)


class Exposition:
    def __init__(self, fast: Callable[[], bytes] = bytes, fast_errors: Callable[[], int] = int,
                 config: LiveConfig | None = None, static_labels: Sequence[tuple[str, str]] = ()) -> None:
        self._fast = fast
        self._fast_errors = fast_errors
        self._config = config
        self._controls_of = ControlsOf()
        self._static = dict(static_labels)
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
        controls = self._controls_of(self._config.current) if self._config is not None else Controls()
        chunks = [self._fast()]
        for family in self.collect():
            if controls.is_on(family.name):
                chunks.append(self._render_family(self._shaped(family, controls)))
        errors = CounterMetricFamily(
            "celery_sidecar_render_errors",
            "Series left out of /metrics because they could not be rendered (the scrape still succeeds).",
            value=self.render_errors + self._fast_errors(),
        )
        if controls.is_on(errors.name):
            chunks.append(generate_latest(_One(self._shaped(errors, controls))))
        return chunks

    def _shaped(self, family: Metric, controls: Controls) -> Metric:
        """``family`` without the series of tasks left out, with the static labels. Families
        are built anew by every collect, so they are changed in place."""
        static, every_task = self._static, controls.every_task
        if static or not every_task:
            family.samples = [
                sample._replace(labels={**sample.labels, **static}) if static else sample
                for sample in family.samples
                if every_task or "name" not in sample.labels or controls.exported(sample.labels["name"])
            ]
        return family

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

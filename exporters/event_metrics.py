"""Task counters and histograms, updated from the event path, exported at scrape time.

Values live in plain dicts keyed by label tuples rather than prometheus_client
``Counter``/``Histogram`` children: an increment is one dict operation instead of a
``labels()`` lookup plus a lock, which is what lets one process keep up with tens of
thousands of events a second (see docs/performance.md). ``/metrics`` serves them through
``exposition()``, which keeps every series rendered and re-renders only what changed;
``collect()`` is the prometheus_client rendering it is tested against.

Label cardinality is capped here: task names and exception classes beyond their caps
are exported as ``other``; ``generic_hostname`` replaces the hostname label on task
series (worker series keep real hostnames; they are bounded by the state's worker cap).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from celery_sidecar.monitor.config import Config, LiveConfig
from celery_sidecar.monitor.pipeline import Sink
from celery_sidecar.monitor.state import MAX_QUEUES, TASK_KINDS, TaskUpdate, WorkerUpdate

OTHER = "other"
GENERIC_HOST = "generic"
RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

Labels = tuple[str, ...]
LabelText = Callable[[tuple[str, ...], Labels], str]


class CappedLabel:
    """Maps values to themselves until ``cap`` distinct values were seen, then to 'other'.

    A lower cap from a config reload applies to new values: exported ones keep their label.
    """

    __slots__ = ("cap", "seen")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        seen = self.seen
        if value in seen:
            return value
        if len(seen) < self.cap:
            seen.add(value)
            return value
        return OTHER


class Histogram:
    """Per-label-set bucket counts (non-cumulative) and sums, and their rendered text."""

    __slots__ = ("_dirty", "_text", "bounds", "series")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.series: dict[Labels, list[float]] = {}  # [b0..bn, +Inf, sum]
        self._text: dict[Labels, bytes] = {}
        self._dirty: set[Labels] = set()  # series whose text is out of date

    def observe(self, labels: Labels, value: float) -> None:
        row = self.series.get(labels)
        if row is None:
            row = self.series[labels] = [0] * (len(self.bounds) + 1) + [0.0]  # counts..., sum
        row[bisect.bisect_left(self.bounds, value)] += 1
        row[-1] += value
        self._dirty.add(labels)

    @property
    def pending(self) -> int:
        """Series whose text is out of date."""
        return len(self._dirty)

    def forget(self, labels: Labels) -> None:
        del self.series[labels]
        self._text.pop(labels, None)

    def render(self, name: str, label_names: tuple[str, ...], label_text: LabelText) -> int:
        """Bring the text of every changed series up to date; returns how many could not be.

        A render fills the label text and the values into a list of line fragments shared
        by all series and joins it: C-level slice assignment and join, about twice as fast
        as ``str.format`` on a 21-field template. A series whose labels cannot be rendered
        (the schema should have refused them) is dropped, never the whole exposition.
        """
        failed = 0
        dirty, series, text = self._dirty, self.series, self._text
        if not dirty:
            return failed
        parts: list[str] = []
        for edge in [*map(_fmt, self.bounds), "+Inf"]:
            parts += [f"{name}_bucket{{", "", f',le="{edge}"}} ', "", "\n"]
        parts += [f"{name}_count{{", "", "} ", "", "\n", f"{name}_sum{{", "", "} ", "", "\n"]
        lines = len(parts) // 5
        while dirty:
            labels = dirty.pop()  # atomic: an update from now on marks the series again
            row = series.get(labels)
            if row is None:
                continue
            values = list(accumulate(row[:-1]))
            values += (values[-1], float(row[-1]))
            try:
                parts[1::5] = [label_text(label_names, labels)] * lines
                parts[3::5] = map(str, values)
                text[labels] = "".join(parts).encode()
            except (AttributeError, TypeError, UnicodeError):
                failed += 1  # no text: the series is left out of every exposition
        return failed

    def exposition(self, out: list[bytes], name: str, doc: str) -> None:
        out.append(f"# HELP {name} {doc}\n# TYPE {name} histogram\n".encode())
        _append_text(out, self.series, self._text)

    def family(self, name: str, doc: str, label_names: list[str]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=label_names)
        edges = [*(_fmt(b) for b in self.bounds), "+Inf"]
        for labels, row in list(self.series.items()):
            row = list(row)
            cumulative, buckets = 0.0, []
            for edge, count in zip(edges, row[:-1], strict=True):
                cumulative += count
                buckets.append((edge, cumulative))
            fam.add_metric(list(labels), buckets, row[-1])
        return fam


class EventMetrics(Sink):
    update_kinds = frozenset(TASK_KINDS)

    def __init__(self, config: LiveConfig) -> None:
        self._live = config
        self._config: Config | None = None
        self.counts: dict[str, dict[Labels, float]] = {kind: {} for kind in TASK_KINDS}
        self._count_text: dict[str, dict[Labels, bytes]] = {kind: {} for kind in TASK_KINDS}
        self._count_dirty: dict[str, set[Labels]] = {kind: set() for kind in TASK_KINDS}
        self._label_text: dict[tuple[tuple[str, ...], Labels], str] = {}
        self.runtime = Histogram(RUNTIME_BUCKETS)
        self.queue_wait = Histogram(WAIT_BUCKETS)
        self.latency = Histogram(WAIT_BUCKETS)
        self._render_lock = threading.Lock()  # one render at a time: scrapes and the prerender thread
        self.render_errors = 0  # series dropped because they could not be rendered
        self._scraped_at = -math.inf
        self._name = CappedLabel(0)
        self._exception = CappedLabel(0)
        # Hostnames and queues come from the event stream too: a buggy producer inventing
        # them must not grow the series without bound (the worker and queue caps of state).
        self._host = CappedLabel(0)
        self._queue = CappedLabel(MAX_QUEUES)
        self._generic_host = False
        self._follow(config.current)

    def _follow(self, config: Config) -> None:
        """Take the caps of the config in force (called when it is not the one last seen)."""
        caps = config.cardinality
        self._name.cap = caps.max_task_names
        self._exception.cap = caps.max_exceptions
        self._host.cap = config.state.max_workers
        self._generic_host = caps.generic_hostname
        self._config = config

    def on_update(self, update: TaskUpdate) -> None:  # update_kinds: task updates only
        if self._live.current is not self._config:
            self._follow(self._live.current)
        name, host, queue = update.name, update.hostname, update.queue
        # Membership first: the common case (a label seen before) costs no call.
        if name not in self._name.seen:
            name = self._name(name)
        if self._generic_host:
            host = GENERIC_HOST
        elif host not in self._host.seen:
            host = self._host(host)
        if queue not in self._queue.seen:
            queue = self._queue(queue)
        labels = (name, host, queue)
        kind = update.kind
        key = (*labels, self._exception(update.exception or "unknown")) if kind == "failed" else labels
        bucket = self.counts[kind]
        bucket[key] = bucket.get(key, 0) + 1
        self._count_dirty[kind].add(key)
        if update.runtime is not None:
            self.runtime.observe(labels, update.runtime)
        if update.latency is not None:
            self.queue_wait.observe(labels, update.latency)
            self.latency.observe((queue, update.task_class), update.latency)

    def on_tick(self, now: float, offline: list[WorkerUpdate], forgotten: list[str]) -> None:
        for hostname in forgotten:
            self.forget_hostname(hostname)

    def forget_hostname(self, hostname: str) -> None:
        """Drop every task series of a worker that is gone for good."""
        for kind, series in self.counts.items():
            for labels in [k for k in series if k[1] == hostname]:
                del series[labels]
                self._count_text[kind].pop(labels, None)
        for histogram in (self.runtime, self.queue_wait):
            for labels in [k for k in histogram.series if k[1] == hostname]:
                histogram.forget(labels)
        self._host.seen.discard(hostname)  # its slot under the cap is free again
        self._label_text.clear()

    def collect(self) -> Iterator[Metric]:
        """The reference rendering, through prometheus_client (see ``exposition``)."""
        for kind in TASK_KINDS:
            labels = FAILED_LABELS if kind == "failed" else BASE_LABELS
            fam = CounterMetricFamily(f"celery_task_{kind}", COUNTER_DOCS[kind], labels=list(labels))
            for key, value in list(self.counts[kind].items()):
                fam.add_metric(list(key), value)
            yield fam
        for attr, name, doc, names in HISTOGRAMS:
            yield getattr(self, attr).family(name, doc, list(names))

    def exposition(self) -> bytes:
        """The same families as ``collect()``, in the text format, 20-100x faster.

        prometheus_client re-validates and escapes every label on every scrape (~9 µs a
        sample); 200 task names x 20 workers is ~170k samples, i.e. seconds. Here each
        series keeps its rendered text, and an update marks it for rendering again
        (a set insert on the event path), so a scrape only renders what changed.
        """
        with self._render_lock:
            self._scraped_at = time.monotonic()
            self._render()
            out: list[bytes] = []
            for kind in TASK_KINDS:
                name = f"celery_task_{kind}_total"
                out.append(f"# HELP {name} {COUNTER_DOCS[kind]}\n# TYPE {name} counter\n".encode())
                _append_text(out, self.counts[kind], self._count_text[kind])
            for attr, name, doc, _names in HISTOGRAMS:
                getattr(self, attr).exposition(out, name, doc)
            return b"".join(out)

    def prerender(self, warm_for: float, backlog: int) -> bool:
        """Render what changed, ahead of the next scrape, once that is more than ``backlog``
        histogram series (a counter line counts a tenth: it is about ten times cheaper).

        Called about once a second, this bounds what a scrape has to render to about
        ``backlog`` plus one second of changes, without rendering small or slowly changing
        series sets more often than Prometheus scrapes them. It does nothing unless
        something scraped in the last ``warm_for`` seconds. Returns whether it rendered.
        """
        if time.monotonic() - self._scraped_at > warm_for:
            return False
        histograms = (self.runtime, self.queue_wait, self.latency)
        pending = sum(h.pending for h in histograms) + sum(map(len, self._count_dirty.values())) / 10
        if pending <= backlog:
            return False
        with self._render_lock:
            self._render()
        return True

    def _render(self) -> None:
        text = self._labels
        for kind in TASK_KINDS:
            dirty, series, rendered = self._count_dirty[kind], self.counts[kind], self._count_text[kind]
            name = f"celery_task_{kind}_total"
            names = FAILED_LABELS if kind == "failed" else BASE_LABELS
            while dirty:
                labels = dirty.pop()  # atomic: an update from now on marks the series again
                value = series.get(labels)
                if value is not None:
                    try:
                        rendered[labels] = f"{name}{{{text(names, labels)}}} {value}\n".encode()
                    except (AttributeError, TypeError, UnicodeError):
                        self.render_errors += 1  # no text: left out of every exposition
        for attr, name, _doc, names in HISTOGRAMS:
            self.render_errors += getattr(self, attr).render(name, names, text)

    def _labels(self, names: tuple[str, ...], values: Labels) -> str:
        key = (names, values)
        text = self._label_text.get(key)
        if text is None:
            text = self._label_text[key] = ",".join(
                f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)
            )
        return text


def _append_text(out: list[bytes], series: dict[Labels, Any], text: dict[Labels, bytes]) -> None:
    """Append the text of ``series`` in their order; text of forgotten series is dropped.

    A series created after the last render has no text yet and is left to the next scrape.
    """
    out += filter(None, map(text.get, list(series)))
    if len(text) > len(series):  # a render raced with forget_hostname
        for labels in [k for k in text if k not in series]:
            del text[labels]


BASE_LABELS = ("name", "hostname", "queue_name")
FAILED_LABELS = (*BASE_LABELS, "exception")
COUNTER_DOCS = {kind: f"Tasks {kind} (task-{kind} events)." for kind in TASK_KINDS}
HISTOGRAMS = (
    ("runtime", "celery_task_runtime", "Task runtime in seconds.", BASE_LABELS),
    ("queue_wait", "celery_task_queue_wait_time", "Seconds from sent (or eta, or received) to started.", BASE_LABELS),
    ("latency", "celery_task_latency_seconds",
     "Queue wait by queue and task class (normal/heavy), for comparison with thresholds.",
     ("queue_name", "task_class")),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(bound: float) -> str:
    return repr(float(bound))

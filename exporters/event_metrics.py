"""Task counters and histograms, updated from the event path, exported at scrape time.

Values live in plain dicts keyed by label tuples rather than prometheus_client
``Counter``/``Histogram`` children: an increment is one dict operation instead of a
``labels()`` lookup plus a lock, which is what lets one process keep up with tens of
thousands of events a second (see docs/performance.md). ``collect()`` turns them into
metric families when Prometheus scrapes.

Label cardinality is capped here: task names and exception classes beyond their caps
are exported as ``other``; ``generic_hostname`` replaces the hostname label on task
series (worker series keep real hostnames; they are bounded by the state's worker cap).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from itertools import accumulate

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from monitor.config import Config
from monitor.pipeline import Sink, Update
from monitor.state import TASK_KINDS, TaskUpdate, WorkerUpdate

OTHER = "other"
GENERIC_HOST = "generic"
RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

Labels = tuple[str, ...]


class CappedLabel:
    """Maps values to themselves until ``cap`` distinct values were seen, then to 'other'."""

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
    """Per-label-set bucket counts (non-cumulative) and sums."""

    __slots__ = ("bounds", "series")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.series: dict[Labels, list[float]] = {}  # [b0..bn, +Inf, sum]

    def observe(self, labels: Labels, value: float) -> None:
        row = self.series.get(labels)
        if row is None:
            row = self.series[labels] = [0] * (len(self.bounds) + 1) + [0.0]  # counts..., sum
        row[bisect.bisect_left(self.bounds, value)] += 1
        row[-1] += value

    def exposition(self, out: list[str], name: str, doc: str, label_names: tuple[str, ...],
                   label_text: Callable[[tuple[str, ...], Labels], str]) -> None:
        """Append the text-format lines of this histogram to ``out``.

        One ``str.format`` call per series on a template shared by all series: the
        C-level formatter does the per-bucket work.
        """
        lines = [f'{name}_bucket{{{{{{0}},le="{_fmt(b)}"}}}} {{{i + 1}}}' for i, b in enumerate(self.bounds)]
        n = len(self.bounds)
        lines += [f'{name}_bucket{{{{{{0}},le="+Inf"}}}} {{{n + 1}}}', f"{name}_count{{{{{{0}}}}}} {{{n + 1}}}",
                  f"{name}_sum{{{{{{0}}}}}} {{{n + 2}}}"]
        template = "\n".join(lines) + "\n"
        out.append(f"# HELP {name} {doc}\n# TYPE {name} histogram\n")
        for labels, row in list(self.series.items()):
            counts = list(accumulate(row[:-1]))
            out.append(template.format(label_text(label_names, labels), *counts, float(row[-1])))

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
    def __init__(self, config: Config) -> None:
        self.counts: dict[str, dict[Labels, float]] = {kind: {} for kind in TASK_KINDS}
        self._label_text: dict[tuple[tuple[str, ...], Labels], str] = {}
        self._counter_prefix: dict[tuple[str, Labels], str] = {}
        self.runtime = Histogram(RUNTIME_BUCKETS)
        self.queue_wait = Histogram(WAIT_BUCKETS)
        self.latency = Histogram(WAIT_BUCKETS)
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        caps = config.cardinality
        self._name = CappedLabel(caps.max_task_names)
        self._exception = CappedLabel(caps.max_exceptions)
        self._generic_host = caps.generic_hostname
        # Names already exported keep their label; the cap applies to new ones.
        for kind in self.counts.values():
            for labels in list(kind):
                self._name(labels[0])

    def on_update(self, update: Update) -> None:
        if type(update) is not TaskUpdate:
            return
        name = self._name(update.name)
        host = GENERIC_HOST if self._generic_host else update.hostname
        labels = (name, host, update.queue)
        kind = update.kind
        if kind == "failed":
            exc_labels = (*labels, self._exception(update.exception or "unknown"))
            bucket = self.counts["failed"]
            bucket[exc_labels] = bucket.get(exc_labels, 0) + 1
        else:
            bucket = self.counts[kind]
            bucket[labels] = bucket.get(labels, 0) + 1
        if update.runtime is not None:
            self.runtime.observe(labels, update.runtime)
        if update.latency is not None:
            self.queue_wait.observe(labels, update.latency)
            self.latency.observe((update.queue, update.task_class), update.latency)

    def on_tick(self, now: float, offline: list[WorkerUpdate], forgotten: list[str]) -> None:
        for hostname in forgotten:
            self.forget_hostname(hostname)

    def forget_hostname(self, hostname: str) -> None:
        """Drop every task series of a worker that is gone for good."""
        for series in [*self.counts.values(), self.runtime.series, self.queue_wait.series]:
            for labels in [k for k in series if k[1] == hostname]:
                del series[labels]
        self._label_text.clear()
        self._counter_prefix.clear()

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
        """The same families as ``collect()``, in the text format, about 20x faster.

        prometheus_client re-validates and escapes every label on every scrape (~9 µs a
        sample); 200 task names x 20 workers is ~170k samples, i.e. seconds. Here each
        label set is rendered once and cached, so a scrape is mostly string joins.
        """
        out: list[str] = []
        text = self._labels
        prefixes = self._counter_prefix
        for kind in TASK_KINDS:
            name = f"celery_task_{kind}_total"
            names = FAILED_LABELS if kind == "failed" else BASE_LABELS
            out.append(f"# HELP {name} {COUNTER_DOCS[kind]}\n# TYPE {name} counter\n")
            for labels, value in list(self.counts[kind].items()):
                prefix = prefixes.get((kind, labels))
                if prefix is None:
                    prefix = prefixes[(kind, labels)] = f"{name}{{{text(names, labels)}}} "
                out.append(f"{prefix}{value}\n")
        for attr, name, doc, names in HISTOGRAMS:
            getattr(self, attr).exposition(out, name, doc, names, text)
        return "".join(out).encode()

    def _labels(self, names: tuple[str, ...], values: Labels) -> str:
        key = (names, values)
        text = self._label_text.get(key)
        if text is None:
            text = self._label_text[key] = ",".join(
                f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)
            )
        return text


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

"""Task counters and histograms, updated from the event path, exported at scrape time.

Values live in plain dicts keyed by label tuples rather than prometheus_client
``Counter``/``Histogram`` children: an increment is one dict operation instead of a
``labels()`` lookup plus a lock, which is what lets one process keep up with tens of
thousands of events a second (see docs/performance.md). ``/metrics`` serves them through
``exposition()``, which keeps every series rendered and re-renders only what changed;
``collect()`` is the prometheus_client rendering it is tested against.

Each (name, hostname, queue) an update carries is routed once (``Route``): its label values
under the caps (names and exception classes beyond them are ``other``; hostnames and queues
are capped like the state's workers and queues), ``generic_hostname``, the task name
filters, dropped labels and families turned off (exporters/controls.py). After that an
update costs one dict lookup more than a bare increment. The first time a label set comes
from a worker (any update but task-sent, whose hostname is the producer's) with a known
queue, every state counter and both task histograms get their series at 0, as
danihodovic/celery-exporter does, so a ratio or ``increase()`` over them has both sides from
the start.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence

from prometheus_client.core import Metric

from celery_sidecar.exporters.controls import (
    COUNTERS,
    LATENCY,
    QUEUE_WAIT,
    RUNTIME,
    Controls,
    ControlsOf,
    escape,
    static_label_text,
)
from celery_sidecar.exporters.reshape import GENERIC_HOST, Route, idle_producers, regroup
from celery_sidecar.exporters.series import OTHER, CappedLabel, Histogram, Labels, append_text, present
from celery_sidecar.monitor.config.settings import Config, LiveConfig
from celery_sidecar.monitor.sinks import MAX_QUEUES, TASK_KINDS, UNKNOWN, Sink, TaskUpdate, WorkerUpdate

__all__ = ["GENERIC_HOST", "OTHER", "EventMetrics"]

# Routes are cached by the labels as updates carry them, before the caps: a producer that
# invents task names would grow the cache without end, so past this it starts again.
MAX_RAW_ROUTES = 50_000
# How often hostnames seen only on task-sent (producers) are checked for having gone quiet.
PRODUCER_SWEEP_SECONDS = 60.0
NOT_COUNTED = dict.fromkeys(TASK_KINDS)


class EventMetrics(Sink):
    update_kinds = frozenset(TASK_KINDS)

    def __init__(self, config: LiveConfig, static_labels: Sequence[tuple[str, str]] = ()) -> None:
        self._live = config
        self._config: Config | None = None
        self._controls_of = ControlsOf()
        self._controls = Controls()
        self.static_labels = tuple(static_labels)
        self._static_text = static_label_text(self.static_labels)
        self.counts: dict[str, dict[Labels, float]] = {kind: {} for kind in TASK_KINDS}
        self._count_text: dict[str, dict[Labels, bytes]] = {kind: {} for kind in TASK_KINDS}
        self._count_dirty: dict[str, set[Labels]] = {kind: set() for kind in TASK_KINDS}
        # New series are served at 0 once before their count (exporters/series.py says why).
        self._unserved: dict[str, set[Labels]] = {kind: set() for kind in TASK_KINDS}
        self._born: dict[str, set[Labels]] = {kind: set() for kind in TASK_KINDS}
        self._label_text: dict[tuple[tuple[str, ...], Labels], str] = {}
        self.runtime = Histogram(())  # bounds from the config, in _follow
        self.queue_wait = Histogram(())
        self.latency = Histogram(())
        self._render_lock = threading.Lock()  # one render at a time: scrapes, the prerender thread, a reshape
        self.render_errors = 0  # series dropped because they could not be rendered
        self._scraped_at = -math.inf
        self._name = CappedLabel(0)
        self._exception = CappedLabel(0)
        self._keep_exception = True
        # Hostnames and queues come from the event stream too: a buggy producer inventing
        # them must not grow the series without bound (the worker and queue caps of state).
        self._host = CappedLabel(0)
        self._queue = CappedLabel(MAX_QUEUES)
        self._routes: dict[tuple[str, str, str], Route] = {}  # of updates from workers
        self._sent_routes: dict[tuple[str, str, str], Route] = {}  # of task-sent: no zero series
        self._by_labels: dict[Labels, Route] = {}  # capped (name, hostname, queue) -> its route
        self._zeroed: set[Labels] = set()  # capped label sets seen from a worker: their series exist
        self._producers: dict[str, tuple[float, float]] = {}  # hostname -> (tasks sent, since when)
        self._next_sweep = -math.inf
        self._follow(config.current)

    def _follow(self, config: Config) -> None:
        """Take the caps and controls of the config in force (called when it is not the one last seen)."""
        caps = config.cardinality
        self._name.cap = caps.max_task_names
        self._exception.cap = caps.max_exceptions
        self._host.cap = config.state.max_workers
        previous, self._controls = self._controls, self._controls_of(config)
        self._keep_exception = "exception" not in self._controls.dropped(COUNTERS["failed"])
        self._config = config
        self._routes.clear()  # a cap may have changed
        self._sent_routes.clear()
        if self._controls != previous:
            self._reshape(previous.generic_hostname)

    # -- the event path ---------------------------------------------------------------------

    def on_update(self, update: TaskUpdate) -> None:  # update_kinds: task updates only
        if self._live.current is not self._config:
            self._follow(self._live.current)
        kind = update.kind
        raw = (update.name, update.hostname, update.queue)
        route = (self._sent_routes if kind == "sent" else self._routes).get(raw)
        if route is None:
            route = self._route(raw, kind != "sent")
        key = route.counters[kind]
        if key is not None:
            if kind == "failed":
                key = (*key, self._exception(update.exception or "unknown") if self._keep_exception else None)
            bucket = self.counts[kind]
            count = bucket.get(key)
            if count is None:
                count = 0
                self._unserved[kind].add(key)
            bucket[key] = count + 1
            self._count_dirty[kind].add(key)
        if update.runtime is not None and route.runtime is not None:
            self.runtime.observe(route.runtime, update.runtime)
        if update.latency is not None:
            if route.queue_wait is not None:
                self.queue_wait.observe(route.queue_wait, update.latency)
            if route.queue is not None:
                self.latency.observe((route.queue, update.task_class), update.latency)

    def _route(self, raw: tuple[str, str, str], from_worker: bool) -> Route:
        routes = self._routes if from_worker else self._sent_routes
        if len(routes) >= MAX_RAW_ROUTES:
            routes.clear()
        name, host, queue = raw
        if not self._controls.exported(name):
            # Left out: no task series, not even under 'other'; its queue wait still counts
            # in the per-queue latency, which the latency threshold judges.
            queue = self._queue(queue) if self._controls.is_on(LATENCY) else None
            route = Route(NOT_COUNTED, None, None, queue)
        else:
            labels = (self._name(name), self._host(host), self._queue(queue))
            route = self._by_labels.get(labels)
            if route is None:
                route = self._by_labels[labels] = Route.build(labels, self._controls, GENERIC_HOST)
            # Not for queue "unknown": that is nearly always a task whose task-received came
            # before its task-sent (celery publishes task-sent after the task message), and
            # its zeros would sit beside the real queue's for ever.
            if from_worker and not route.zeroed and queue != UNKNOWN:
                self._zero(labels, route)
        routes[raw] = route
        return route

    def _zero(self, labels: Labels, route: Route) -> None:
        """Give a label set every state counter (failed with exception="") and both task
        histograms at 0, where it has none yet."""
        for kind, key in route.counters.items():
            if key is None:
                continue
            if kind == "failed":
                key = (*key, "" if self._keep_exception else None)
            bucket = self.counts[kind]
            if key not in bucket:
                bucket[key] = 0
                self._unserved[kind].add(key)
                self._count_dirty[kind].add(key)
        if route.runtime is not None:
            self.runtime.touch(route.runtime)
        if route.queue_wait is not None:
            self.queue_wait.touch(route.queue_wait)
        route.zeroed = True
        self._zeroed.add(labels)

    # -- time: forgetting, and reloads without task traffic ---------------------------------

    def on_tick(self, now: float, offline: list[WorkerUpdate], forgotten: list[str]) -> None:
        if self._live.current is not self._config:
            self._follow(self._live.current)  # a reload shows even while no task event comes
        for hostname in forgotten:
            self.forget_hostname(hostname)
        if now >= self._next_sweep:
            self._next_sweep = now + PRODUCER_SWEEP_SECONDS
            workers = {labels[1] for labels in self._zeroed}
            limit = self._live.current.state.worker_forget_seconds
            for hostname in idle_producers(self.counts["sent"], workers, self._producers, now, limit):
                self.forget_hostname(hostname)

    def forget_hostname(self, hostname: str) -> None:
        """Drop every task series of a worker (or producer) that is gone for good."""
        for kind, series in self.counts.items():
            for labels in [k for k in series if k[1] == hostname]:
                del series[labels]
                self._count_text[kind].pop(labels, None)
                self._unserved[kind].discard(labels)
                self._born[kind].discard(labels)
        for histogram in (self.runtime, self.queue_wait):
            for labels in [k for k in histogram.series if k[1] == hostname]:
                histogram.forget(labels)
        self._host.seen.discard(hostname)  # its slot under the cap is free again
        self._zeroed = {labels for labels in self._zeroed if labels[1] != hostname}
        for labels in [k for k in self._by_labels if k[1] == hostname]:
            del self._by_labels[labels]
        self._routes.clear()  # cached routes may lead to the forgotten ones
        self._sent_routes.clear()
        self._producers.pop(hostname, None)
        self._label_text.clear()

    def _reshape(self, was_generic: bool) -> None:
        """Bring the series held under the controls now in force.

        A series of a task now left out goes; one whose label is now dropped is summed into
        the series without it. A label dropped before cannot be split again, so such a series
        ends, as does every series of a histogram whose buckets changed. Then every label set
        seen from a worker gets its series at 0 again where it has none.
        """
        controls = self._controls
        with self._render_lock:
            self._by_labels.clear()
            for kind in TASK_KINDS:
                family = COUNTERS[kind]
                counts = regroup(self.counts[kind], family, controls, was_generic) if controls.is_on(family) else {}
                self.counts[kind], self._count_text[kind], self._count_dirty[kind] = counts, {}, set(counts)
                # Kept series go on with their counts: served at 0 again, they would count twice.
                self._unserved[kind], self._born[kind] = set(), set()
            for histogram, family, bounds in ((self.runtime, RUNTIME, controls.runtime_buckets),
                                              (self.queue_wait, QUEUE_WAIT, controls.queue_wait_buckets),
                                              (self.latency, LATENCY, controls.queue_wait_buckets)):
                keep = controls.is_on(family) and bounds == histogram.bounds
                series = (histogram.series if family == LATENCY
                          else regroup(histogram.series, family, controls, was_generic))
                histogram.replace(bounds, series if keep else {})
            for labels in list(self._zeroed):  # a task left out keeps its place: included again, it is back
                if controls.exported(labels[0]):
                    route = self._by_labels[labels] = Route.build(labels, controls, GENERIC_HOST)
                    self._zero(labels, route)
            self._label_text.clear()

    # -- reading ----------------------------------------------------------------------------

    def name_queue_pairs(self) -> set[tuple[str, str]]:
        """Every (task name, queue) the task series hold, whichever labels they drop."""
        pairs = {(key[0], key[2]) for series in list(self.counts.values()) for key in list(series)}
        pairs |= {(labels[0], labels[2]) for labels in list(self._zeroed)}
        return {(name, queue) for name, queue in pairs if name is not None and queue is not None}

    def collect(self) -> Iterator[Metric]:
        """The reference rendering, through prometheus_client (see ``exposition``)."""
        static = dict(self.static_labels)
        controls = self._controls
        for kind in TASK_KINDS:
            if not controls.is_on(COUNTERS[kind]):
                continue
            names = FAILED_LABELS if kind == "failed" else BASE_LABELS
            fam = Metric(f"celery_task_{kind}", COUNTER_DOCS[kind], "counter")
            for key, value in list(self.counts[kind].items()):
                fam.add_sample(COUNTERS[kind], {**present(names, key), **static}, value)
            yield fam
        for attr, name, doc, names in HISTOGRAMS:
            if controls.is_on(name):
                yield getattr(self, attr).family(name, doc, names, static)

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
            controls = self._controls
            out: list[bytes] = []
            for kind in TASK_KINDS:
                name = COUNTERS[kind]
                if controls.is_on(name):
                    out.append(f"# HELP {name} {COUNTER_DOCS[kind]}\n# TYPE {name} counter\n".encode())
                    append_text(out, self.counts[kind], self._count_text[kind])
            for attr, name, doc, _names in HISTOGRAMS:
                if controls.is_on(name):
                    getattr(self, attr).exposition(out, name, doc)
            self._served()
            return b"".join(out)

    def _served(self) -> None:
        """The body is out: series it served at 0 show their counts from the next render on."""
        for kind in TASK_KINDS:
            born = self._born[kind]
            if born:
                self._unserved[kind].difference_update(born)
                self._count_dirty[kind].update(born)
                born.clear()
        for attr, _name, _doc, _names in HISTOGRAMS:
            getattr(self, attr).served()

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
            unserved, born = self._unserved[kind], self._born[kind]
            name = COUNTERS[kind]
            names = FAILED_LABELS if kind == "failed" else BASE_LABELS
            while dirty:
                labels = dirty.pop()  # atomic: an update from now on marks the series again
                value = series.get(labels)
                if value is not None:
                    if labels in unserved:
                        value = 0
                        born.add(labels)
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
                f'{n}="{escape(v)}"' for n, v in zip(names, values, strict=True) if v is not None
            ) + self._static_text
        return text


BASE_LABELS = ("name", "hostname", "queue_name")
FAILED_LABELS = (*BASE_LABELS, "exception")
COUNTER_DOCS = {
    "sent": "Tasks sent by producers (task-sent events, which the app sends with task_send_sent_event).",
    "received": "Tasks a worker received (task-received events).",
    "started": "Tasks a worker started (task-started events).",
    "succeeded": "Tasks that succeeded (task-succeeded events).",
    "failed": "Tasks that failed (task-failed events), by exception class.",
    "retried": "Tasks a worker retried (task-retried events).",
    "rejected": "Tasks a worker rejected (task-rejected events).",
    "revoked": "Tasks revoked (task-revoked events).",
}
HISTOGRAMS = (
    ("runtime", RUNTIME, "Task runtime in seconds, as the worker reports it in task-succeeded.", BASE_LABELS),
    ("queue_wait", QUEUE_WAIT,
     "Seconds a task waited to start: from task-sent (or its eta, or task-received when the app sends no "
     "task-sent) to task-started.", BASE_LABELS),
    ("latency", LATENCY,
     "The same queue wait by queue and task class (normal/heavy): its p95 is judged against the latency "
     "thresholds.", ("queue_name", "task_class")),
)

"""The state is a bounded fold: memory and label series stop growing, whatever the traffic.

A sidecar runs for months. Here 300,000 task lifecycles (some that never finish, some
that fail with a unique message, some that retry) go through the real pipeline, state
and exporter, in-process, and every structure has to stay under its stated bound.
The retry-ratio and latency windows are checked against data whose answer is known.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator

import pytest

from celery_sidecar.exporters.event_metrics import OTHER, EventMetrics
from celery_sidecar.monitor.fold.pipeline import Pipeline
from celery_sidecar.monitor.fold.state import State
from celery_sidecar.monitor.fold.windows import RatioWindow, SampleWindow
from tests.support.inproc import DataPath

T0 = 1_700_000_000.0
MAX_TASKS = 1_000
MAX_NAMES = 50
MAX_EXCEPTIONS = 20
HOSTS = 4
QUEUES = ("celery", "heavy")
TASK_KINDS = ("sent", "received", "started", "succeeded", "failed", "retried", "rejected", "revoked")


def lifecycle(i: int) -> Iterator[dict]:
    """The events of task ``i``: 2,000 names, 300 exception classes with unique messages.

    ~10 % never finish (lost worker, still queued), ~5 % fail, ~5 % retry once then succeed.
    """
    uuid = f"task-{i:08d}"
    host = f"w{i % HOSTS}@host"
    t = T0 + i * 0.001
    yield {"type": "task-sent", "uuid": uuid, "name": f"app.task_{i % 2000}", "queue": QUEUES[i % 2],
           "hostname": "producer@app", "timestamp": t, "local_received": t, "args": f"({i},)", "kwargs": "{}"}
    yield {"type": "task-received", "uuid": uuid, "hostname": host, "timestamp": t + 0.01, "local_received": t}
    fate = i % 20
    if fate in (0, 1):  # never finishes
        return
    yield {"type": "task-started", "uuid": uuid, "hostname": host, "timestamp": t + 0.02, "local_received": t}
    if fate == 2:
        yield {"type": "task-failed", "uuid": uuid, "hostname": host, "timestamp": t + 0.05, "local_received": t,
               "exception": f"Error{(i // 20) % 300}('row {i} is broken')", "traceback": "Traceback ..."}
        return
    if fate == 3:
        yield {"type": "task-retried", "uuid": uuid, "hostname": host, "timestamp": t + 0.05, "local_received": t,
               "exception": "RetryError('again')"}
        yield {"type": "task-started", "uuid": uuid, "hostname": host, "timestamp": t + 0.3, "local_received": t}
    yield {"type": "task-succeeded", "uuid": uuid, "hostname": host, "timestamp": t + 0.4, "local_received": t,
           "runtime": 0.1}


def feed(pipeline: Pipeline, start: int, stop: int) -> None:
    handle = pipeline.handle
    for i in range(start, stop):
        for event in lifecycle(i):
            handle(event)


def series_count(metrics: EventMetrics) -> int:
    return (sum(len(c) for c in metrics.counts.values()) + len(metrics.runtime.series)
            + len(metrics.queue_wait.series) + len(metrics.latency.series))


def traced_bytes() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


# In-process, but the whole data path at full scale under tracemalloc: a minute and a half, more
# than the whole quick tier (`-m "not e2e"`) may take. It runs with the e2e tests.
@pytest.mark.e2e
def test_300k_task_lifecycles_keep_state_memory_and_series_bounded():
    path = DataPath.build({
        "state": {"max_tasks": MAX_TASKS},
        "cardinality": {"max_task_names": MAX_NAMES, "max_exceptions": MAX_EXCEPTIONS},
    }, now=T0 + 300)
    state, metrics, pipeline = path.state, path.metrics, path.pipeline

    tracemalloc.start()
    try:
        feed(pipeline, 0, 100_000)
        at_100k = traced_bytes()
        series_at_100k = series_count(metrics)
        feed(pipeline, 100_000, 300_000)
        at_300k = traced_bytes()
    finally:
        tracemalloc.stop()

    assert not state.counters.skipped_by_reason, state.counters.skipped_by_reason
    assert len(state.tasks) <= MAX_TASKS
    # 10 % of 300k never finished: the LRU is full of them, not growing with them.
    assert len(state.tasks) >= MAX_TASKS - 20

    names = {labels[0] for kind in metrics.counts.values() for labels in kind}
    assert len(names) <= MAX_NAMES + 1 and OTHER in names
    exceptions = {labels[3] for labels in metrics.counts["failed"]} - {""}  # "": every label set's zero series
    assert len(exceptions) <= MAX_EXCEPTIONS + 1 and OTHER in exceptions
    assert all("(" not in e and "broken" not in e for e in exceptions), exceptions

    # Every counter/histogram series is (name, host, queue) under the caps, or (queue, class).
    per_kind_bound = (MAX_NAMES + 1) * (HOSTS + 1) * len(QUEUES)
    assert series_count(metrics) <= len(TASK_KINDS) * per_kind_bound * (MAX_EXCEPTIONS + 1)
    assert series_count(metrics) == series_at_100k, "new label series appeared after 100k tasks"
    assert len(state.task_fold.retry_windows) <= MAX_NAMES + 1

    # No loss: every event was counted even though names overflowed to 'other'.
    assert sum(metrics.counts["sent"].values()) == 300_000
    assert sum(metrics.counts["failed"].values()) == 300_000 // 20
    assert sum(metrics.counts["succeeded"].values()) == 300_000 * 17 // 20

    # Everything the fold keeps was allocated after tracing began, so at 100k the traced
    # memory is the steady-state footprint (full LRU, every label). 200k more lifecycles
    # must not add to it in proportion: a per-task leak of even 50 bytes would add 10 MB.
    assert at_300k < 1.5 * at_100k, f"traced memory {at_100k} B at 100k -> {at_300k} B at 300k lifecycles"


def _known_latency_pipeline(waits: list[tuple[str, float]]) -> tuple[State, EventMetrics, float]:
    now = T0 + 100
    path = DataPath.build({"heavy_tasks": ["report.*"]}, now=now)
    state, metrics, pipeline = path.state, path.metrics, path.pipeline
    for i, (name, wait) in enumerate(waits):
        t = T0 + i * 0.01
        pipeline.handle({"type": "task-sent", "uuid": f"u{i}", "name": name, "queue": "celery",
                         "hostname": "p@x", "timestamp": t, "local_received": t})
        pipeline.handle({"type": "task-started", "uuid": f"u{i}", "hostname": "w@x",
                         "timestamp": t + wait, "local_received": t + wait})
    return state, metrics, now


def test_latency_p95_is_the_95th_percentile_of_queue_wait_per_task_class():
    # 97 normal tasks: 94 wait 1 s, 3 wait 60 s (3 % outliers) -> p95 is 1 s.
    # 40 heavy tasks: 36 wait 2 s, 4 wait 90 s (10 % outliers) -> p95 is 90 s.
    waits = [("app.ok", 1.0)] * 94 + [("app.ok", 60.0)] * 3 + [("report.daily", 2.0)] * 36
    waits += [("report.daily", 90.0)] * 4
    state, metrics, now = _known_latency_pipeline(waits)
    assert state.task_fold.latency_windows["normal"].quantile(0.95, now) == pytest.approx(1.0)
    assert state.task_fold.latency_windows["heavy"].quantile(0.95, now) == pytest.approx(90.0)
    assert state.task_fold.latency_windows["normal"].quantile(0.5, now) == pytest.approx(1.0)
    # The exported histogram sees the same split by task class.
    rows = metrics.latency.series
    assert rows[("celery", "normal")][-1] == pytest.approx(94 * 1.0 + 3 * 60.0)
    assert rows[("celery", "heavy")][-1] == pytest.approx(36 * 2.0 + 4 * 90.0)
    assert sum(rows[("celery", "heavy")][:-1]) == 40


def test_sample_window_percentiles_forget_old_samples_and_keep_a_fixed_size():
    window = SampleWindow(seconds=60, maxlen=1000)
    for v in range(1, 1001):  # values 1..1000
        window.push((T0, float(v)))
    p95 = window.quantile(0.95, T0 + 1)
    assert 950 <= p95 <= 951
    assert window.quantile(0.5, T0 + 1) in (500.0, 501.0)
    # 1,000 newer, small samples push every old one out of the fixed-size ring.
    for _ in range(1000):
        window.push((T0 + 30, 0.5))
    assert window.quantile(0.99, T0 + 31) == 0.5
    # And nothing is reported once all samples are older than the window.
    assert window.quantile(0.95, T0 + 30 + 61) is None


def test_retry_ratio_window_slides_over_the_configured_time():
    window = RatioWindow(seconds=300)  # 30 buckets of 10 s
    t0 = T0  # a bucket boundary
    for i in range(10):
        window.add(t0 + i * 0.1, hit=(i == 0))  # 1 retry in 10
    assert window.ratio(t0 + 5) == pytest.approx(0.1)
    for i in range(10):
        window.add(t0 + 150 + i * 0.1, hit=(i < 9))  # 9 retries in 10
    assert window.counts(t0 + 155) == (10, 20)
    assert window.ratio(t0 + 299) == pytest.approx(0.5)  # both halves still inside
    assert window.ratio(t0 + 300) == pytest.approx(0.9)  # the first bucket slid out
    assert window.ratio(t0 + 451) is None  # all of it slid out
    # A bucket reused after a full turn of the ring starts from zero.
    window.add(t0 + 600, hit=True)
    assert window.counts(t0 + 600) == (1, 1)


def test_retry_ratio_per_task_name_is_exported_and_capped():
    now = T0 + 10
    path = DataPath.build({"cardinality": {"max_task_names": 3}}, now=now)
    state, pipeline = path.state, path.pipeline

    def run(name: str, uid: str, retried: bool, t: float) -> None:
        pipeline.handle({"type": "task-sent", "uuid": uid, "name": name, "queue": "celery",
                         "hostname": "p@x", "timestamp": t, "local_received": t})
        if retried:
            pipeline.handle({"type": "task-retried", "uuid": uid, "hostname": "w@x", "timestamp": t + 0.001,
                             "exception": "RetryError('again')", "local_received": t})
        pipeline.handle({"type": "task-succeeded", "uuid": uid, "hostname": "w@x", "timestamp": t + 0.002,
                         "runtime": 0.1, "local_received": t})

    # app.flaky: 80 runs, 20 of them retried once -> 20 retries / (20 + 80 finished) = 20 %.
    for i in range(80):
        run("app.flaky", f"flaky-{i}", retried=i < 20, t=T0 + i * 0.01)
    # 8 more names, each retried once: beyond the cap of 3 they share one 'other' window.
    for k in range(8):
        run(f"app.n{k}", f"n{k}", retried=True, t=T0 + 1 + k * 0.01)

    assert not state.counters.skipped_by_reason
    assert set(state.task_fold.retry_windows) == {"app.flaky", "app.n0", "app.n1", OTHER}
    assert state.task_fold.retry_windows["app.flaky"].ratio(now) == pytest.approx(0.2)
    assert state.task_fold.retry_windows[OTHER].counts(now) == (6, 12)

    exported = {s.labels["name"]: s.value for s in path.families()["celery_task_retry_ratio"].samples}
    assert exported == pytest.approx({"app.flaky": 0.2, "app.n0": 0.5, "app.n1": 0.5, OTHER: 0.5})
    # Far outside the window, nothing is exported (no stale ratio keeps an alert firing).
    later = path.at(now + 3600).families()["celery_task_retry_ratio"].samples
    assert later == []


def test_late_events_do_not_erase_the_current_retry_ratio():
    """Workers buffer events while the broker is away and flush them on reconnect.

    One such event, stamped more than the retry window ago, lands in the ring slot of a
    live bucket. It must not wipe that bucket: the ratio of the last minutes stays.
    """
    now = T0 + 1005
    path = DataPath.build({}, now=now)  # retry window 300 s
    state, pipeline = path.state, path.pipeline
    for i in range(10):
        uid = f"r{i}"
        pipeline.handle({"type": "task-sent", "uuid": uid, "name": "app.flaky", "queue": "celery",
                         "hostname": "p@x", "timestamp": now - 1, "local_received": now - 1})
        if i < 2:
            pipeline.handle({"type": "task-retried", "uuid": uid, "hostname": "w@x", "timestamp": now - 0.5,
                             "exception": "RetryError('again')", "local_received": now - 0.5})
        pipeline.handle({"type": "task-succeeded", "uuid": uid, "hostname": "w@x", "timestamp": now,
                         "runtime": 0.1, "local_received": now})
    assert state.task_fold.retry_windows["app.flaky"].ratio(now) == pytest.approx(2 / 12)

    # A task from before the outage: its success, stamped 300 s ago, is delivered now.
    pipeline.handle({"type": "task-sent", "uuid": "late", "name": "app.flaky", "queue": "celery",
                     "hostname": "p@x", "timestamp": now - 301, "local_received": now - 301})
    pipeline.handle({"type": "task-succeeded", "uuid": "late", "hostname": "w@x", "timestamp": now - 300,
                     "runtime": 0.1, "local_received": now})
    assert not state.counters.skipped_by_reason
    ratio = state.task_fold.retry_windows["app.flaky"].ratio(now)
    assert ratio is not None and 2 / 13 <= ratio <= 2 / 12, f"retry ratio after one late event: {ratio}"

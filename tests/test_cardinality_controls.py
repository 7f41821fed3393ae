"""Task series exist before their first event, and sidecar.yml's cardinality controls shape
/metrics, in-process: the data path (tests/support/inproc.py) scraped through the exposition
every family passes through. The same through a real sidecar: tests/test_cardinality_e2e.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_sidecar.exporters import event_metrics as event_metrics_module
from celery_sidecar.exporters.collectors import StateCollector
from celery_sidecar.exporters.controls import FAMILIES, LABELS_IN_USE, check_controls, check_static_labels
from celery_sidecar.exporters.exposition import Exposition
from celery_sidecar.exporters.task_classes import TaskClassCollector
from celery_sidecar.monitor.config.reload import ConfigReloader
from celery_sidecar.monitor.config.settings import ConfigError, parse_config
from celery_sidecar.monitor.fold.records import TASK_KINDS, TaskUpdate, WorkerInfo
from tests.support import doc_tables
from tests.support.configs import write_config
from tests.support.inproc import DataPath
from tests.support.paths import SOURCE
from tests.support.procs import Metrics

T0 = 1_700_000_000.0
W1, W2, PRODUCER = "w1@host", "w2@host", "web@app"
COUNTERS = [f"celery_task_{kind}_total" for kind in TASK_KINDS]


def event(etype: str, at: float = T0, **fields: Any) -> dict[str, Any]:
    return {"type": etype, "timestamp": at, "local_received": at, **fields}


def run(path: DataPath, uuid: str, name: str, host: str = W1, queue: str = "celery", outcome: str = "succeeded",
        at: float = T0) -> None:
    """One task: sent by the producer, received and started on ``host``, then ``outcome``."""
    path.handle(event("task-sent", at, uuid=uuid, name=name, queue=queue, hostname=PRODUCER, args="()", kwargs="{}"),
                event("task-received", at + 0.5, uuid=uuid, name=name, hostname=host),
                event("task-started", at + 1, uuid=uuid, hostname=host))
    if outcome == "succeeded":
        path.handle(event("task-succeeded", at + 1.2, uuid=uuid, hostname=host, runtime=0.2))
    elif outcome == "failed":
        path.handle(event("task-failed", at + 1.2, uuid=uuid, hostname=host, exception="ValueError('no')",
                          traceback="Traceback ..."))


class Scraper:
    """/metrics of a data path, as the wiring builds it: the task metrics, then the collectors."""

    def __init__(self, path: DataPath, static: tuple[tuple[str, str], ...] = ()) -> None:
        self.exposition = Exposition(path.metrics.exposition, lambda: path.metrics.render_errors, path.config, static)
        self.exposition.register(StateCollector(path.view, path.config))
        self.exposition.register(TaskClassCollector(path.metrics, path.config))

    def once(self) -> Metrics:
        return Metrics(b"".join(self.exposition.render()).decode())

    def settled(self) -> Metrics:
        """A scrape after one that served every new series (at 0, once)."""
        self.once()
        return self.once()


def scrape(path: DataPath) -> Metrics:
    return Scraper(path).settled()


def hostnames(metrics: Metrics) -> set[str]:
    return {dict(labels)["hostname"] for (_name, labels) in metrics.samples if "hostname" in dict(labels)}


def names(metrics: Metrics) -> set[str]:
    return {dict(labels)["name"] for (_name, labels) in metrics.samples if "name" in dict(labels)}


def reload(path: DataPath, **cardinality: Any) -> None:
    """Swap the config in force, as the reloader does, and let a tick (no task event) apply it."""
    path.config.current = parse_config({"cardinality": cardinality})
    path.pipeline.tick()


# -- series before their first event --------------------------------------------------------


def test_a_label_set_from_a_worker_has_every_state_counter_and_both_histograms_at_zero():
    path = DataPath.build({}, now=T0)
    run(path, "a", "app.ok")
    m = scrape(path)
    ok = {"name": "app.ok", "hostname": W1, "queue_name": "celery"}
    assert {kind: m.get(f"celery_task_{kind}_total", **ok) for kind in TASK_KINDS} == {
        "sent": 0, "received": 1, "started": 1, "succeeded": 1, "failed": 0, "retried": 0, "rejected": 0,
        "revoked": 0}
    assert m.get("celery_task_failed_total", **ok, exception="") == 0
    assert m.get("celery_task_runtime_count", **ok) == 1 and m.get("celery_task_queue_wait_time_count", **ok) == 1

    # Received, not run yet: its histograms exist with every bucket at 0.
    path.handle(event("task-sent", uuid="b", name="app.later", queue="celery", hostname=PRODUCER, args="()",
                      kwargs="{}"),
                event("task-received", uuid="b", name="app.later", hostname=W1))
    m = scrape(path)
    later = {"name": "app.later", "hostname": W1, "queue_name": "celery"}
    for histogram in ("celery_task_runtime", "celery_task_queue_wait_time"):
        buckets = m.all(f"{histogram}_bucket", **later)
        assert len(buckets) > 10 and set(buckets.values()) == {0}, histogram
        assert m.get(f"{histogram}_count", **later) == 0
    assert m.get("celery_task_failed_total", **later, exception="") == 0


def test_a_task_received_before_its_task_sent_leaves_no_zero_series_on_queue_unknown():
    """Celery publishes task-sent after the task message, so a worker can report the task
    first: that event counts on queue "unknown", and creates no zeros there to linger."""
    path = DataPath.build({}, now=T0)
    path.handle(event("task-received", T0, uuid="a", name="app.raced", hostname=W1),
                event("task-sent", T0 + 0.1, uuid="a", name="app.raced", queue="celery", hostname=PRODUCER,
                      args="()", kwargs="{}"),
                event("task-started", T0 + 1, uuid="a", hostname=W1),
                event("task-succeeded", T0 + 1.2, uuid="a", hostname=W1, runtime=0.2))
    m = scrape(path)
    unknown = {(name, value) for (name, labels), value in m.samples.items()
               if dict(labels).get("queue_name") == "unknown" and dict(labels).get("name") == "app.raced"}
    # celery_task_class describes the series there are: the one count there is, too.
    assert unknown == {("celery_task_received_total", 1), ("celery_task_class", 1)}
    raced = {"name": "app.raced", "hostname": W1, "queue_name": "celery"}
    assert m.get("celery_task_succeeded_total", **raced) == 1
    assert m.get("celery_task_failed_total", **raced, exception="") == 0
    assert m.get("celery_task_runtime_count", **raced) == 1


def test_a_producer_gets_its_sent_series_only():
    """Task-sent's hostname is the producer's: a web pod is not given a worker's series."""
    path = DataPath.build({}, now=T0)
    run(path, "a", "app.ok")
    m = scrape(path)
    assert m.get("celery_task_sent_total", hostname=PRODUCER) == 1
    produced = {name for (name, labels) in m.samples if dict(labels).get("hostname") == PRODUCER}
    assert produced == {"celery_task_sent_total"}


def test_the_success_ratio_has_a_value_for_a_task_that_never_failed_and_one_that_never_succeeded():
    path = DataPath.build({}, now=T0)
    run(path, "a", "app.ok")
    run(path, "b", "app.broken", outcome="failed")
    m = scrape(path)
    for name, ratio in (("app.ok", 1.0), ("app.broken", 0.0)):
        succeeded = m.all("celery_task_succeeded_total", name=name)
        failed = m.all("celery_task_failed_total", name=name)
        assert succeeded and failed, f"{name}: a side of the ratio is missing"
        assert sum(succeeded.values()) / (sum(succeeded.values()) + sum(failed.values())) == ratio


def test_a_new_series_is_served_at_zero_once_so_increase_sees_its_first_event():
    """A series that appears at 1 shows no increase() in Prometheus: the first failure of a
    task (with its exception class, a series of its own) is served at 0 by one scrape first."""
    path = DataPath.build({}, now=T0)
    scraper = Scraper(path)
    run(path, "a", "app.flaky")
    first = scraper.once()
    assert first.sum("celery_task_succeeded_total", name="app.flaky") == 0
    assert first.sum("celery_task_received_total", name="app.flaky") == 0
    assert first.sum("celery_task_runtime_count", name="app.flaky") == 0
    assert scraper.once().sum("celery_task_succeeded_total", name="app.flaky") == 1

    run(path, "b", "app.flaky", outcome="failed")
    served = [scraper.once().get("celery_task_failed_total", name="app.flaky", exception="ValueError")
              for _ in range(3)]
    assert served == [0, 1, 1]
    assert scraper.once().get("celery_task_failed_total", name="app.flaky", exception="") == 0


def test_zero_series_respect_the_name_cap():
    path = DataPath.build({"cardinality": {"max_task_names": 2}}, now=T0)
    for i in range(5):
        run(path, f"t{i}", f"app.t{i}")
    m = scrape(path)
    assert names(m) == {"app.t0", "app.t1", "other"}
    assert m.get("celery_task_succeeded_total", name="other") == 3
    assert m.get("celery_task_failed_total", name="other", exception="") == 0


def test_a_producer_inventing_names_cannot_grow_the_route_cache(monkeypatch):
    monkeypatch.setattr(event_metrics_module, "MAX_RAW_ROUTES", 50)
    path = DataPath.build({"cardinality": {"max_task_names": 5}}, now=T0)
    for i in range(500):
        path.metrics.on_update(TaskUpdate("received", f"u{i}", f"app.made_up_{i}", W1, "celery", T0))
    assert len(path.metrics._routes) <= 50
    assert sum(path.metrics.counts["received"].values()) == 500


# -- forgetting ------------------------------------------------------------------------------


def test_a_forgotten_worker_leaves_no_series_in_any_family_and_comes_back_with_zero_series():
    path = DataPath.build({"state": {"worker_forget_seconds": 60}}, now=T0)
    path.pipeline.set_connected(True)
    for host in (W1, W2):
        path.handle(event("worker-online", hostname=host, freq=2.0, pid=1),
                    event("worker-heartbeat", hostname=host, freq=2.0, active=0, processed=0, pid=1),
                    event("worker-resources", hostname=host, freq=2.0, cpu_percent=5.0, memory_percent=5.0,
                          rss_bytes=1000, pool_max=2))
    path.pipeline.record_inspection({W1: WorkerInfo(queues=("celery",), pool_max=2),
                                     W2: WorkerInfo(queues=("celery",), pool_max=2)})
    run(path, "a", "app.ok", host=W1, at=T0 + 1)
    run(path, "b", "app.ok", host=W2, at=T0 + 1)
    path.at(T0 + 5).handle(event("worker-heartbeat", T0 + 5, hostname=W1, freq=2.0, active=0, processed=1, pid=1))
    path.pipeline.tick(T0 + 5)
    assert W1 in hostnames(scrape(path))

    path.at(T0 + 10).handle(event("worker-offline", T0 + 10, hostname=W1, freq=2.0, pid=1))
    for t in (T0 + 10, T0 + 40):  # W2 keeps beating; W1 is down, not yet forgotten
        path.at(t).handle(event("worker-heartbeat", t, hostname=W2, freq=2.0, active=0, processed=1, pid=1))
        path.pipeline.tick(t)
    assert W1 in hostnames(scrape(path))
    path.at(T0 + 75).handle(event("worker-heartbeat", T0 + 75, hostname=W2, freq=2.0, active=0, processed=1, pid=1))
    path.pipeline.tick(T0 + 75)
    m = scrape(path)
    assert W1 not in hostnames(m), sorted({n for (n, labels) in m.samples if dict(labels).get("hostname") == W1})
    assert m.get("celery_task_succeeded_total", name="app.ok", hostname=W2) == 1

    path.at(T0 + 80).handle(event("worker-online", T0 + 80, hostname=W1, freq=2.0, pid=2))
    run(path, "c", "app.ok", host=W1, at=T0 + 80)
    m = scrape(path)
    assert m.get("celery_task_succeeded_total", name="app.ok", hostname=W1) == 1, "counted afresh"
    assert m.get("celery_task_failed_total", name="app.ok", hostname=W1, exception="") == 0, "zero series again"


def test_a_producer_quiet_for_worker_forget_seconds_is_forgotten():
    path = DataPath.build({"state": {"worker_forget_seconds": 100}}, now=T0)
    path.pipeline.set_connected(True)

    def beat_and_tick(t: float) -> None:
        path.at(t).handle(event("worker-heartbeat", t, hostname=W1, freq=2.0, active=0, processed=1, pid=1))
        path.pipeline.tick(t)

    path.handle(event("worker-online", hostname=W1, freq=2.0, pid=1))
    run(path, "a", "app.ok")
    beat_and_tick(T0 + 1)  # its count is noted
    beat_and_tick(T0 + 70)  # unchanged for 69 s
    assert scrape(path).get("celery_task_sent_total", hostname=PRODUCER) == 1
    beat_and_tick(T0 + 140)  # unchanged for 139 s
    m = scrape(path)
    assert m.all("celery_task_sent_total", hostname=PRODUCER) == {}
    assert m.get("celery_task_succeeded_total", name="app.ok", hostname=W1) == 1, "the worker's series stay"


def test_a_producer_that_keeps_sending_is_kept():
    path = DataPath.build({"state": {"worker_forget_seconds": 100}}, now=T0)
    path.pipeline.set_connected(True)
    for i, t in enumerate(range(0, 400, 70)):
        path.at(T0 + t).handle(event("task-sent", T0 + t, uuid=f"s{i}", name="app.ok", queue="celery",
                                     hostname=PRODUCER, args="()", kwargs="{}"))
        path.pipeline.tick(T0 + t)
    assert scrape(path).get("celery_task_sent_total", hostname=PRODUCER) == 6


# -- the controls ------------------------------------------------------------------------------


def test_excluded_tasks_have_no_series_in_any_family():
    path = DataPath.build({"cardinality": {"include_tasks": ["app.*"], "exclude_tasks": ["app.secret*"]}}, now=T0)
    run(path, "a", "app.a")
    run(path, "s", "app.secret_sync")
    run(path, "z", "other_app.z")
    path.handle(event("task-sent", uuid="r", name="app.secret_sync", queue="celery", hostname=PRODUCER, args="()",
                      kwargs="{}"),
                event("task-received", uuid="r", name="app.secret_sync", hostname=W1),
                event("task-started", uuid="r", hostname=W1))  # running: celery_task_running would have it
    assert "app.secret_sync" in path.view.snapshot().running, "the fold still sees it"
    m = scrape(path)
    assert names(m) == {"app.a"}
    # Its queue wait still counts per queue: the latency threshold judges every task.
    assert m.sum("celery_task_latency_seconds_count", queue_name="celery") == 4


def test_excluded_tasks_take_no_slot_under_the_name_cap():
    path = DataPath.build({"cardinality": {"max_task_names": 2, "exclude_tasks": ["app.secret*"]}}, now=T0)
    for uuid, name in (("a", "app.a"), ("s", "app.secret_sync"), ("t", "app.secret_report"), ("b", "app.b")):
        run(path, uuid, name)
    task_series = {dict(labels)["name"] for series in path.metrics.counts.values() for labels in
                   [dict(zip(("name", "hostname", "queue_name"), key, strict=False)) for key in series]}
    assert task_series == {"app.a", "app.b"}, "dropped, not counted under 'other'"


def test_dropped_labels_are_summed_over():
    path = DataPath.build({"cardinality": {"drop_labels": {
        "celery_task_runtime": ["hostname"], "celery_task_queue_wait_time": ["hostname", "queue_name"],
        "celery_task_failed": ["exception"]}}}, now=T0)
    run(path, "a", "app.ok", host=W1)
    run(path, "b", "app.ok", host=W2)
    run(path, "c", "app.ok", host=W2, outcome="failed")
    m = scrape(path)
    assert m.all("celery_task_runtime_count") == {frozenset({("name", "app.ok"), ("queue_name", "celery")}): 2}
    assert m.all("celery_task_queue_wait_time_count") == {frozenset({("name", "app.ok")}): 3}
    assert {dict(labels)["hostname"] for labels in m.all("celery_task_succeeded_total")} == {W1, W2}
    failed = m.all("celery_task_failed_total")
    assert all("exception" not in dict(labels) for labels in failed)
    assert m.get("celery_task_failed_total", hostname=W2) == 1 and m.get("celery_task_failed_total", hostname=W1) == 0


def test_a_disabled_family_is_left_out_entirely():
    off = ["celery_task_queue_wait_time", "celery_task_sent", "celery_worker_up", "celery_task_class",
           "celery_sidecar_render_errors_total"]
    path = DataPath.build({"cardinality": {"disable_families": off}}, now=T0)
    path.pipeline.set_connected(True)
    path.handle(event("worker-online", hostname=W1, freq=2.0, pid=1))
    run(path, "a", "app.ok")
    text = scrape(path).text
    for family in ("celery_task_queue_wait_time", "celery_task_sent_total", "celery_worker_up", "celery_task_class",
                   "celery_sidecar_render_errors_total"):
        assert f" {family} " not in text and f"\n{family}" not in text, family
    assert "celery_task_received_total{" in text and "celery_worker_tasks_active{" in text


def test_histogram_buckets_are_the_configured_ones():
    path = DataPath.build({"cardinality": {"buckets": {"runtime_seconds": [1, 10],
                                                       "queue_wait_seconds": [5, 30, 3600, 86400]}}}, now=T0)
    run(path, "a", "app.ok")
    m = scrape(path)
    assert {dict(labels)["le"] for labels in m.all("celery_task_runtime_bucket")} == {"1.0", "10.0", "+Inf"}
    for family in ("celery_task_queue_wait_time_bucket", "celery_task_latency_seconds_bucket"):
        assert {dict(labels)["le"] for labels in m.all(family)} == {"5.0", "30.0", "3600.0", "86400.0", "+Inf"}


def test_the_default_buckets_reach_hours_and_stay_few():
    config = parse_config({})
    runtime, wait = config.cardinality.buckets.runtime_seconds, config.cardinality.buckets.queue_wait_seconds
    assert runtime[-1] >= 6 * 3600 and wait[-1] >= 24 * 3600
    assert len(runtime) <= 20 and len(wait) <= 20
    latency = config.thresholds.latency_seconds
    assert {latency.normal, latency.heavy} <= set(wait), "the latency thresholds are bucket bounds"


def test_a_reload_reshapes_the_series_held_without_waiting_for_a_task_event():
    path = DataPath.build({}, now=T0)
    run(path, "a", "app.ok", host=W1)
    run(path, "b", "app.ok", host=W2)
    run(path, "c", "app.other", host=W2)

    drop = {"celery_task_runtime": ["hostname"], "celery_task_succeeded_total": ["hostname"]}
    reload(path, drop_labels=drop)
    m = scrape(path)
    assert m.get("celery_task_runtime_count", name="app.ok") == 2, "summed, kept"
    assert m.all("celery_task_succeeded_total", name="app.ok") == {
        frozenset({("name", "app.ok"), ("queue_name", "celery")}): 2}
    assert m.get("celery_task_started_total", name="app.ok", hostname=W1) == 1, "other families keep hostname"

    reload(path, drop_labels=drop, exclude_tasks=["app.other"], buckets={"runtime_seconds": [1, 60]})
    m = scrape(path)
    assert "app.other" not in names(m)
    assert {dict(labels)["le"] for labels in m.all("celery_task_runtime_bucket")} == {"1.0", "60.0", "+Inf"}
    assert m.get("celery_task_runtime_count", name="app.ok") == 0, "new buckets: restarted, at 0"
    assert m.get("celery_task_succeeded_total", name="app.ok") == 2

    reload(path, drop_labels=drop, generic_hostname=True)
    m = scrape(path)
    assert m.get("celery_task_started_total", name="app.ok", hostname="generic") == 2
    assert m.get("celery_task_succeeded_total", name="app.ok") == 2, "a dropped label stays dropped"
    assert m.get("celery_task_started_total", name="app.other", hostname="generic") == 0, "included again, at 0"
    assert hostnames(m) == {"generic"}

    reload(path)  # the defaults: a label cannot be split again, so its series start over at 0
    m = scrape(path)
    assert "generic" not in hostnames(m)
    assert m.get("celery_task_succeeded_total", name="app.ok", hostname=W1) == 0
    run(path, "d", "app.ok", host=W1, at=T0 + 10)
    assert scrape(path).get("celery_task_succeeded_total", name="app.ok", hostname=W1) == 1


def test_controls_naming_what_is_not_there_are_refused_with_every_problem_named():
    config = parse_config({"cardinality": {
        "disable_families": ["celery_task_sent_total", "celery_task_sent", "celery_tasks_sent_total"],
        "drop_labels": {"celery_worker_up": ["hostname"], "celery_task_runtime": ["name", "hostname"]}}})
    with pytest.raises(ValueError) as refused:
        check_controls(config)
    message = str(refused.value)
    assert "'celery_tasks_sent_total' is not a family of /metrics" in message
    assert "celery_task_sent'" not in message, "a counter without _total is taken"
    assert "cardinality.drop_labels: 'celery_worker_up'" in message
    assert "cardinality.drop_labels.celery_task_runtime: 'name' cannot be dropped" in message
    assert message.count("\n") == 3

    for buckets, says in (([1, 1], "strictly increasing"), ([0, 1], "greater than 0"),
                          ([1, float("inf")], "finite"), (list(range(1, 50)), "1 to 40")):
        with pytest.raises(ConfigError, match=f"cardinality.buckets.runtime_seconds: .*{says}"):
            parse_config({"cardinality": {"buckets": {"runtime_seconds": buckets}}})


def test_a_reload_naming_a_family_that_is_not_there_is_refused_and_the_old_config_stays(tmp_path: Path):
    file = write_config(tmp_path / "sidecar.yml", cardinality={"disable_families": ["celery_worker_up"]})
    path = DataPath.build(parse_config({"cardinality": {"disable_families": ["celery_worker_up"]}}), now=T0)
    results: list[tuple[bool, str | None]] = []
    reloader = ConfigReloader(file, path.config, lambda ok, error: results.append((ok, error)), [check_controls])
    before = path.config.current
    write_config(file, cardinality={"disable_families": ["celery_worker_upp"]})
    assert not reloader.check()
    assert path.config.current is before
    ok, error = results[-1]
    assert not ok and "'celery_worker_upp' is not a family of /metrics" in str(error) and str(file) in str(error)


# -- static labels -------------------------------------------------------------------------------


def test_static_labels_are_on_every_series_of_every_family():
    static = (("cluster", "eu-1"), ("team", 'o"ps'))
    with doc_tables.example_sidecar(doc_tables.COMPAT, static_labels=static) as sidecar:
        text = b"".join(sidecar.registry.render()).decode()
    families = list(text_string_to_metric_families(text))
    served = {f.name for f in doc_tables.served_families(doc_tables.COMPAT)}
    assert {f"{f.name}_total" if f.type == "counter" else f.name for f in families} >= served
    bare = [s.name for f in families for s in f.samples if (s.labels.get("cluster"), s.labels.get("team")) !=
            ("eu-1", 'o"ps')]
    assert bare == [], bare[:10]


@pytest.mark.parametrize(("pairs", "says"), [
    ([("9lives", "x")], "not a label name"),
    ([("__meta", "x")], "not a label name"),
    ([("clu-ster", "x")], "not a label name"),
    ([("hostname", "x")], "a label of the sidecar's own families"),
    ([("le", "x")], "a label of the sidecar's own families"),
    ([("cluster", "a"), ("cluster", "b")], "given twice"),
])
def test_static_label_names_are_checked(pairs, says):
    with pytest.raises(ValueError, match=says):
        check_static_labels(pairs)


def test_static_label_values_are_any_text():
    assert check_static_labels([("cluster", "eu 1, \"a\"\\b\n"), ("empty", "")]) == (
        ("cluster", "eu 1, \"a\"\\b\n"), ("empty", ""))


# -- the catalogue the controls check against, and the docs ------------------------------------


def test_the_catalogue_of_families_and_labels_is_what_metrics_serves():
    served = doc_tables.served_families(doc_tables.COMPAT)
    process = {name for name in FAMILIES if name.startswith("process_")}
    assert FAMILIES - process == {f.name for f in served}
    labels = {label for f in served for label in f.labels}
    assert labels | {"le", "quantile"} == LABELS_IN_USE


def test_the_series_table_is_counted_from_a_real_exposition():
    doc = (SOURCE / "docs" / "metrics.md").read_text()
    block = doc_tables.between(doc, doc_tables.SERIES_START, doc_tables.SERIES_END)
    assert block == doc_tables.series_markdown(), "docs/metrics.md is stale: run scripts/generate"


def test_the_series_count_per_label_set_is_what_the_exposition_holds():
    """The table's unit, checked against a scrape: one label set from a worker is 8 counter
    series and both histograms with their buckets, +Inf, _count and _sum."""
    config = parse_config({})
    buckets = config.cardinality.buckets
    per_label_set = doc_tables.task_series_per_label_set({})
    assert per_label_set[("name", "hostname", "queue_name")] == (
        8 + len(buckets.runtime_seconds) + 3 + len(buckets.queue_wait_seconds) + 3)

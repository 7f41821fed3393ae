"""What `celery-sidecar demo` draws, on state folded from real event dicts: its columns, its Beat due
times, and its retry-rate marks against what the alert engine decides."""

from __future__ import annotations

from celery_sidecar.alerts.engine import AlertEngine
from celery_sidecar.demo import DEMO_CONFIG
from celery_sidecar.demo_summary import HOST_WIDTH_CAP, raised_thresholds, summary
from tests.support.inproc import DataPath, Recorder

T0 = 1_700_000_000.0


def section(text: str, title: str) -> list[str]:
    """The lines of one block of the summary: its header, then its rows up to the blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def draw(path: DataPath, now: float, firing: set[tuple[str, str]] | None = None) -> str:
    return summary(path.config.current, path.view.snapshot(now), 10.0, 50, [], firing or set())


def test_worker_columns_line_up_whatever_the_hostname_lengths():
    hostnames = ["w@a", "celery@build-host-07", "demo-worker@" + "very-long-host-name." * 6]
    path = DataPath.build(DEMO_CONFIG, now=T0)
    for i, hostname in enumerate(hostnames):
        path.handle(
            {"type": "worker-heartbeat", "hostname": hostname, "timestamp": T0, "local_received": T0, "freq": 2.0,
             "active": i},
            {"type": "worker-resources", "hostname": hostname, "timestamp": T0, "local_received": T0,
             "cpu_percent": [3.5, 42.0, 99.9][i], "memory_percent": [1.0, 12.25, 71.0][i], "rss_bytes": 1e8,
             "pool_max": 4},
        )
    header, *rows = section(draw(path, T0), "WORKERS")
    assert len(rows) == len(hostnames), rows
    # Every column starts where its header does, on every row.
    state, pool = header.index("state"), header.index("active/pool") + len("active/pool")
    cpu = header.index("cpu%")
    for row in rows:
        assert len(row) == len(header), (row, header)
        assert row[state:state + 2] == "up", (row, header)
        assert row[pool - 1].isdigit() and row[pool] == " ", (row, header)
        assert row[cpu - 1] == " " and row.rstrip().endswith(("ok", "!!")), (row, header)
    long_row = rows[[len(h) for h in hostnames].index(max(map(len, hostnames)))]
    assert "…" in long_row and "very-long-host-name." * 6 not in long_row
    assert header.index("state") - 2 <= 2 + HOST_WIDTH_CAP + 1, "the hostname column is capped"
    assert "99.9 !!" in "\n".join(rows) and "3.5 ok" in "\n".join(rows)


def test_a_beat_entry_due_now_or_in_the_past_never_reads_as_due_in_minus_zero():
    path = DataPath.build({"beat": [{"entry": "tick", "task": "app.tick", "every": 30}]}, now=T0)
    path.pipeline.set_connected(True)
    path.pipeline.tick(T0)
    (entry,) = path.view.snapshot(T0).beat
    due = entry.next_due

    def due_column(now: float) -> str:
        header, row = section(draw(path, now), "PERIODIC")
        start = header.index("next due")
        return row[start:start + 14].strip()

    assert due_column(due - 7.2) == "in 7s"
    # A hair before, at and just after the due time: all of them are "now" ("-0s" before).
    assert due_column(due - 0.3) == "due now"
    assert due_column(due) == "due now"
    assert due_column(due + 0.3) == "due now"
    # Past it, within its grace (nothing has judged it missed yet): how long ago, in plain words.
    assert due_column(due + 2.4) == "overdue by 2s"
    assert "-0s" not in draw(path, due + 0.3)


def retry_lines(path: DataPath, engine: AlertEngine, now: float) -> dict[str, str]:
    rows = section(draw(path, now, raised_thresholds(engine)), "RETRY RATE")[1:]
    return {row.split()[0]: row for row in rows}


def test_the_retry_rate_is_marked_only_when_the_alert_engine_judges_it_and_says_when_it_alerts():
    path = DataPath.build({}, now=T0)
    recorder = Recorder()
    engine = AlertEngine(path.config, path.view, recorder)
    path.pipeline.add_sink(engine)
    path.pipeline.set_connected(True)

    def runs(name: str, first: int, count: int, retried: bool, at: float) -> None:
        for i in range(first, first + count):
            uid = f"r-{i}"
            path.handle({"type": "task-sent", "uuid": uid, "name": name, "queue": "celery",
                         "hostname": "p@x", "timestamp": at, "local_received": at})
            if retried:
                path.handle({"type": "task-retried", "uuid": uid, "hostname": "w@x", "timestamp": at + 0.1,
                             "exception": "RetryError('again')", "local_received": at + 0.1})
            path.handle({"type": "task-succeeded", "uuid": uid, "hostname": "w@x", "timestamp": at + 0.2,
                         "runtime": 0.1, "local_received": at + 0.2})

    # 2 runs, both retried: 2 retries of 4 outcomes, 50 % but under the 10 outcomes the rule needs.
    runs("app.flaky", 0, 2, retried=True, at=T0)
    path.at(T0 + 1).pipeline.tick(T0 + 1)
    line = retry_lines(path, engine, T0 + 1)["app.flaky"]
    assert ("retry_rate", "app.flaky") not in engine.breaches
    assert "!!" not in line and "too few outcomes" in line, line

    # 10 outcomes: the rule judges it, over the threshold; the alert waits for its for_seconds.
    runs("app.flaky", 2, 3, retried=True, at=T0 + 2)
    path.at(T0 + 3).pipeline.tick(T0 + 3)
    assert ("retry_rate", "app.flaky") in engine.breaches
    line = retry_lines(path, engine, T0 + 3)["app.flaky"]
    for_seconds = path.config.current.alerts.rules.retry_rate.for_seconds
    assert "!!" in line and f"!! over (alert after {for_seconds:g}s)" in line, line
    assert not [a for a in recorder.alerts if a.kind == "threshold"]

    # Past for_seconds the engine raises the alert, and the summary says so.
    path.at(T0 + 3 + for_seconds).pipeline.tick(T0 + 3 + for_seconds)
    assert [a.title for a in recorder.alerts if a.kind == "threshold"] == ["Retry rate above threshold: app.flaky"]
    line = retry_lines(path, engine, T0 + 3 + for_seconds)["app.flaky"]
    assert "!! alert raised" in line, line

    # A task that never retries is fine once judged.
    runs("app.ok", 100, 12, retried=False, at=T0 + 70)
    path.at(T0 + 71).pipeline.tick(T0 + 71)
    line = retry_lines(path, engine, T0 + 71)["app.ok"]
    assert line.rstrip().endswith("ok") and "!!" not in line, line


def test_the_pressure_table_shows_what_workers_prefetched_beside_the_brokers_list():
    from celery_sidecar.monitor.fold.records import QueueReading, WorkerInfo

    path = DataPath.build({}, now=T0)
    host = "w@x"
    path.handle({"type": "worker-heartbeat", "hostname": host, "timestamp": T0, "local_received": T0,
                 "freq": 2.0, "active": 1, "processed": 0})
    path.pipeline.record_inspection({host: WorkerInfo(queues=("celery",), pool_max=2)})
    path.pipeline.record_queues({"celery": QueueReading(length=0, consumers=None)})
    for i in range(5):  # prefetched: five received, one of them running
        path.handle({"type": "task-sent", "uuid": f"p{i}", "name": "app.job", "queue": "celery",
                     "hostname": "p@x", "timestamp": T0, "local_received": T0},
                    {"type": "task-received", "uuid": f"p{i}", "name": "app.job", "hostname": host,
                     "timestamp": T0, "local_received": T0})
    path.handle({"type": "task-started", "uuid": "p0", "hostname": host, "timestamp": T0, "local_received": T0})
    header, row = section(draw(path, T0), "PRESSURE")
    values = dict(zip(header.split()[1:], row.split()[1:], strict=True))
    assert row.split()[0] == "celery"
    assert (values["waiting"], values["reserved"], values["running"], values["capacity"]) == ("0", "4", "1", "2")
    assert values["pressure"] == "2.50" and int(values["desired"]) >= 1

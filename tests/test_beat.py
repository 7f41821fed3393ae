"""Periodic tasks, in-process: due times by celery's own schedules, runs matched to their
entries, misses, "Beat is not scheduling", and the entries of sidecar.yml and of the app.

tests/test_beat_e2e.py runs the same story with a real `celery beat`, worker and sidecar.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from celery_sidecar.alerts.beat_alerts import BeatAlerts
from celery_sidecar.alerts.engine import AlertEngine
from celery_sidecar.app import read
from celery_sidecar.monitor.config.reload import ConfigReloader
from celery_sidecar.monitor.config.settings import ConfigError, parse_config
from celery_sidecar.monitor.fold.status import Status
from tests.support.inproc import DataPath, Recorder

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
_ids = itertools.count()


def run(path: DataPath, task: str, at: float, args: str = "()", kwargs: str = "{}") -> str:
    """A run as Beat sends it: task-sent, then the worker's received/started/succeeded."""
    uid = f"run-{next(_ids)}"
    path.at(at).handle(
        {"type": "task-sent", "uuid": uid, "name": task, "queue": "celery", "hostname": "beat@x",
         "args": args, "kwargs": kwargs, "timestamp": at, "local_received": at},
        {"type": "task-received", "uuid": uid, "name": task, "hostname": "w@x", "args": args, "kwargs": kwargs,
         "timestamp": at + 0.01, "local_received": at + 0.01},
        {"type": "task-succeeded", "uuid": uid, "hostname": "w@x", "runtime": 0.01, "timestamp": at + 0.02,
         "local_received": at + 0.02},
    )
    return uid


def tick(path: DataPath, at: float) -> None:
    path.at(at).pipeline.tick(at)


def watching(config: dict, now: float = T0) -> tuple[DataPath, Recorder]:
    recorder = Recorder()
    path = DataPath.build(config, now=now)
    path.pipeline.set_connected(True)  # a disconnected intake freezes time-driven state
    path.pipeline.add_sink(BeatAlerts(path.config, path.view, recorder))
    return path, recorder


def entry(path: DataPath, name: str):
    return next(e for e in path.view.snapshot().beat if e.entry == name)


def firing(recorder: Recorder, kind: str) -> list:
    return [a for a in recorder.alerts if a.kind == kind and a.status == "firing"]


def resolved(recorder: Recorder, kind: str) -> list:
    return [a for a in recorder.alerts if a.kind == kind and a.status == "resolved"]


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- one entry: on time, late, missed, back ------------------------------------------------------


def test_an_interval_entry_is_on_time_within_its_grace_missed_after_it_and_resolved_by_the_next_run():
    path, recorder = watching({"beat": [{"entry": "crawl", "task": "app.crawl", "every": 60}]})
    crawl = entry(path, "crawl")
    assert (crawl.next_due, crawl.period, crawl.grace) == (T0 + 60, 60, 6)  # 10 % of the period

    run(path, "app.crawl", T0 + 60)
    tick(path, T0 + 61)
    run(path, "app.crawl", T0 + 125)  # 5 s late: within the grace
    tick(path, T0 + 126)
    crawl = entry(path, "crawl")
    assert crawl.late == pytest.approx(5) and crawl.missed_total == 0 and crawl.next_due == T0 + 185
    assert recorder.alerts == []

    tick(path, T0 + 191)  # due + grace: not yet a miss
    assert entry(path, "crawl").missed_total == 0
    tick(path, T0 + 191.5)
    crawl = entry(path, "crawl")
    assert crawl.missed_total == 1 and crawl.missing_since == T0 + 185
    [missed] = firing(recorder, "beat_missed")
    assert missed.text == f"periodic task missed: crawl (app.crawl), due at {utc(T0 + 185)}, last run {utc(T0 + 125)}"

    tick(path, T0 + 200)
    assert entry(path, "crawl").missed_total == 1 and len(recorder.alerts) == 1, "one alert per miss, once"

    run(path, "app.crawl", T0 + 210)
    tick(path, T0 + 211)
    [back] = resolved(recorder, "beat_missed")
    assert back.group == missed.group and "crawl (app.crawl) ran at" in back.text
    assert entry(path, "crawl").missing_since is None


def test_entries_sharing_a_task_are_told_apart_by_their_args_and_kwargs():
    path, _ = watching({"beat": [
        {"entry": "sync-eu", "task": "app.sync", "every": 60, "args": ["eu"], "kwargs": {"full": False}},
        {"entry": "sync-us", "task": "app.sync", "every": 60, "args": ["us"], "kwargs": {"full": False}},
    ]})
    run(path, "app.sync", T0 + 60, args="['us']", kwargs="{'full': False}")  # a list matches the tuple
    run(path, "app.sync", T0 + 61, args="('xx',)", kwargs="{'full': False}")  # no entry's: not a run
    assert entry(path, "sync-us").last_run == T0 + 60
    assert entry(path, "sync-eu").last_run is None


def test_the_failure_alert_of_a_periodic_run_names_its_entry(tmp_path):
    path, _ = watching({"beat": [{"entry": "nightly-cleanup", "task": "app.cleanup", "every": 60}]})
    recorder = Recorder()
    path.pipeline.add_sink(AlertEngine(path.config, path.view, recorder))
    path.at(T0 + 60).handle(
        {"type": "task-sent", "uuid": "n1", "name": "app.cleanup", "queue": "celery", "hostname": "beat@x",
         "timestamp": T0 + 60, "local_received": T0 + 60},
        {"type": "task-failed", "uuid": "n1", "hostname": "w@x", "exception": "OSError('disk full')",
         "traceback": "Traceback ...", "timestamp": T0 + 61, "local_received": T0 + 61},
    )
    [failed] = [a for a in recorder.alerts if a.kind == "task_failed"]
    assert failed.fields["Periodic entry"] == "nightly-cleanup"
    assert failed.fields["Task"] == "app.cleanup"


# -- Beat down -----------------------------------------------------------------------------------


def test_beat_down_is_one_alert_instead_of_one_per_entry_and_the_next_run_resolves_it():
    path, recorder = watching({"beat": [
        {"entry": "tick", "task": "app.tick", "every": 10},
        {"entry": "sweep", "task": "app.sweep", "every": 30},
    ]})
    run(path, "app.tick", T0 + 10)
    run(path, "app.sweep", T0 + 30)
    tick(path, T0 + 30.5)
    tick(path, T0 + 33.5)  # tick's due T0+20 passed (+3 s grace): one entry missing, Beat may be fine
    assert [a.title for a in firing(recorder, "beat_missed")] == ["Periodic task missed: tick (app.tick)"]
    assert path.view.snapshot().beat_down_since is None
    tick(path, T0 + 63.5)  # sweep's due T0+60 passed too: two entries missing since the last run
    snap = path.view.snapshot()
    assert snap.beat_down_since == T0 + 63.5
    [down] = firing(recorder, "beat_down")
    assert down.title == "Beat is not scheduling" and "sweep (app.sweep)" in down.text
    assert len(firing(recorder, "beat_missed")) == 1, "no per-entry alert while Beat is down"

    run(path, "app.sweep", T0 + 70)
    tick(path, T0 + 70.5)
    assert [a.title for a in resolved(recorder, "beat_down")] == ["Beat is scheduling again"]
    assert path.view.snapshot().beat_down_since is None


def test_entries_that_never_ran_say_since_when_the_sidecar_watched_not_never_seen():
    path, recorder = watching({"beat": [
        {"entry": "tick", "task": "app.tick", "every": 10},
        {"entry": "sweep", "task": "app.sweep", "every": 30},
    ]})
    started = utc(path.view.snapshot().started_at)
    tick(path, T0 + 13.5)  # tick's first due (T0+10) passed with no run
    [missed] = firing(recorder, "beat_missed")
    assert missed.text == (f"periodic task missed: tick (app.tick), due at {utc(T0 + 10)}, "
                           f"no run since the sidecar started at {started}")
    assert missed.fields["Last run"] == f"none since the sidecar started at {started}"
    tick(path, T0 + 33.5)  # sweep's too: Beat looks down, and no periodic task ever ran
    [down] = firing(recorder, "beat_down")
    assert down.text.startswith(f"No periodic task has run since the sidecar started at {started}; "
                                "entries missed since then: "), down.text
    for alert in recorder.alerts:
        assert "never" not in alert.text and "never" not in " ".join(alert.fields.values())


def test_one_entry_missing_again_and_again_while_others_run_is_not_beat_down():
    path, recorder = watching({"beat": [
        {"entry": "often", "task": "app.often", "every": 5},  # misconfigured: Beat never sends it
        {"entry": "fine", "task": "app.fine", "every": 10},
    ]})
    for t in range(10, 120, 10):
        run(path, "app.fine", T0 + t)
        tick(path, T0 + t + 0.5)
    assert entry(path, "often").missed_total >= 20
    assert path.view.snapshot().beat_down_since is None
    assert firing(recorder, "beat_down") == []
    assert len(firing(recorder, "beat_missed")) == 1


def test_a_lone_entry_that_missed_twice_means_beat_is_down():
    path, recorder = watching({"beat": [{"entry": "only", "task": "app.only", "every": 10}]})
    run(path, "app.only", T0 + 10)
    tick(path, T0 + 23.5)
    assert firing(recorder, "beat_missed") and not firing(recorder, "beat_down")
    tick(path, T0 + 33.5)
    assert firing(recorder, "beat_down")


def test_dues_that_passed_while_the_broker_was_unreachable_are_not_misses():
    path, recorder = watching({"beat": [{"entry": "only", "task": "app.only", "every": 10}]})
    run(path, "app.only", T0 + 10)
    path.state.beat.resume(T0 + 100)  # the intake reconnected: runs in between were invisible
    tick(path, T0 + 100.5)
    assert entry(path, "only").missed_total == 0 and recorder.alerts == []
    assert entry(path, "only").next_due == pytest.approx(T0 + 110)


# -- due times: celery's own schedules, in their timezone -----------------------------------------


def next_3am_tokyo(now: datetime) -> datetime:
    tokyo = now.astimezone(ZoneInfo("Asia/Tokyo"))
    due = tokyo.replace(hour=3, minute=0, second=0, microsecond=0)
    return due if due > tokyo else due + timedelta(days=1)


def test_a_crontab_in_asia_tokyo_is_due_at_3am_tokyo_time_as_celery_says():
    now = datetime.now(UTC)
    path, _ = watching({"beat": [{"entry": "nightly-cleanup", "task": "app.cleanup", "cron": "0 3 * * *",
                                  "timezone": "Asia/Tokyo"}]}, now=now.timestamp())
    nightly = entry(path, "nightly-cleanup")
    expected = next_3am_tokyo(now)
    assert nightly.next_due == pytest.approx(expected.timestamp(), abs=1)
    assert datetime.fromtimestamp(nightly.next_due, UTC).hour == 18  # 03:00 JST is 18:00 UTC
    assert nightly.period == pytest.approx(86400, abs=1)
    # The same due time as celery's own schedule object gives Beat.
    sched = path.state.beat.entries["nightly-cleanup"].entry.schedule
    remaining = sched.remaining_estimate(sched.now()).total_seconds()
    assert nightly.next_due == pytest.approx(sched.now().timestamp() + remaining, abs=1)


def test_after_a_run_the_period_is_the_gap_to_the_next_due_so_a_weekday_crontab_spans_the_weekend():
    friday_3am_tokyo = datetime(2026, 11, 27, 3, 0, tzinfo=ZoneInfo("Asia/Tokyo")).timestamp()
    path, _ = watching({"beat": [{"entry": "weekdays", "task": "app.report", "cron": "0 3 * * 1-5",
                                  "timezone": "Asia/Tokyo"}]}, now=friday_3am_tokyo - 60)
    run(path, "app.report", friday_3am_tokyo + 2)
    weekdays = entry(path, "weekdays")
    monday_3am_tokyo = friday_3am_tokyo + 3 * 86400
    assert weekdays.next_due == pytest.approx(monday_3am_tokyo)
    assert weekdays.period == pytest.approx(monday_3am_tokyo - (friday_3am_tokyo + 2))


def test_the_apps_beat_schedule_and_timezone_are_read_and_sidecar_yml_wins_by_entry_name(monkeypatch):
    from tests.support.settings_app import app

    defaults = read(app).defaults
    assert [e.name for e in defaults.beat] == ["nightly-cleanup"]
    now = datetime.now(UTC)
    path = DataPath.build({}, now=now.timestamp(), app=defaults)
    assert entry(path, "nightly-cleanup").next_due == pytest.approx(next_3am_tokyo(now).timestamp(), abs=1)
    assert entry(path, "nightly-cleanup").source == "app"

    mine = DataPath.build({"beat": [{"entry": "nightly-cleanup", "task": "settings.cleanup", "every": 600}]},
                          now=now.timestamp(), app=defaults)
    assert entry(mine, "nightly-cleanup").period == 600 and entry(mine, "nightly-cleanup").source == "sidecar.yml"


# -- sidecar.yml: validated, hot-reloaded ---------------------------------------------------------


@pytest.mark.parametrize(("bad", "says"), [
    ({"entry": "nightly-cleanup", "task": "app.cleanup", "cron": "0 27 * * *"}, "nightly-cleanup"),
    ({"entry": "nightly-cleanup", "task": "app.cleanup", "cron": "0 3 * *"}, "must have 5 fields"),
    ({"entry": "nightly-cleanup", "task": "app.cleanup", "cron": "0 3 * * *", "timezone": "Mars/Olympus"},
     "Mars/Olympus"),
    ({"entry": "crawl", "task": "app.crawl"}, "exactly one of cron and every"),
    ({"entry": "crawl", "task": "app.crawl", "every": -5}, "every"),
])
def test_a_bad_entry_is_refused_with_a_message_naming_it(bad, says):
    with pytest.raises(ConfigError) as err:
        parse_config({"beat": [bad]}, "sidecar.yml")
    assert says in str(err.value) and bad["entry"] in str(err.value)


def test_two_entries_of_the_same_name_are_refused():
    entries = [{"entry": "crawl", "task": "app.crawl", "every": 60}] * 2
    with pytest.raises(ConfigError, match="crawl"):
        parse_config({"beat": entries}, "sidecar.yml")


def test_entries_hot_reload_and_a_bad_edit_keeps_the_watched_ones(tmp_path: Path):
    file = tmp_path / "sidecar.yml"
    file.write_text(yaml.safe_dump({"beat": [{"entry": "crawl", "task": "app.crawl", "every": 1800}]}))
    path = DataPath.build(parse_config(yaml.safe_load(file.read_text())), now=T0)
    path.pipeline.set_connected(True)
    status = Status(config_path=str(file))
    reloader = ConfigReloader(file, path.config, status.reload_result)
    run(path, "app.crawl", T0 + 1800)

    file.write_text(yaml.safe_dump({"beat": [
        {"entry": "crawl", "task": "app.crawl", "every": 1800},
        {"entry": "nightly-cleanup", "task": "app.cleanup", "cron": "0 3 * * *", "timezone": "Asia/Tokyo"},
    ]}))
    assert reloader.check()
    tick(path, T0 + 1801)
    assert [e.entry for e in path.view.snapshot().beat] == ["crawl", "nightly-cleanup"]
    assert entry(path, "crawl").last_run == T0 + 1800, "an unchanged entry keeps what it knows"

    file.write_text(yaml.safe_dump({"beat": [{"entry": "crawl", "task": "app.crawl", "cron": "61 * * * *"}]}))
    assert not reloader.check()
    assert "crawl" in (status.config_error or "")
    tick(path, T0 + 1802)
    assert [e.entry for e in path.view.snapshot().beat] == ["crawl", "nightly-cleanup"]

"""The Grafana dashboards are code (grafana/dashboards.py, grafana-foundation-sdk), and the JSON
shipped is what that code generates.

Grafana cannot run where this is built, so what stands in for loading the dashboards is: the
SDK's own model round trip (Grafana's schema, as the SDK release pinned to the compose stack's
Grafana version types it), the provisioning checks in tests/test_stack_render.py, and every query
run against a live Prometheus in tests/test_stack_live.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from celery_sidecar.exporters.task_classes import TaskClassCollector
from celery_sidecar.grafana.dashboards import dashboards
from celery_sidecar.grafana.panels import OWN_LABELS, own_labels
from celery_sidecar.grafana.sidecar_row import EVENTS_MISSED_SHARE, STREAM_WINDOW
from celery_sidecar.monitor.config.dashboard_links import OVERVIEW_UID, TASK_UID
from celery_sidecar.monitor.config.settings import Config
from celery_sidecar.monitor.signals import thresholds
from tests.support import doc_tables
from tests.support.inproc import DataPath
from tests.support.paths import package_file
from tests.support.promql import undeduplicated
from tests.support.stack import DASHBOARD, DASHBOARDS, TASK_DASHBOARD, dashboard_expressions, load_dashboard

IDS = [p.name for p in DASHBOARDS]
# celery_threshold{...} selectors in a query, and the label matchers inside one.
SELECTOR = re.compile(r"celery_threshold\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"')


def panels(dashboard: dict) -> list[dict]:
    return [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]


def test_the_committed_dashboards_are_what_the_code_generates():
    generated = dashboards()
    assert sorted(generated) == sorted(p.name for p in DASHBOARDS), "a shipped dashboard is not generated"
    stale = [name for name, text in generated.items() if (DASHBOARD.parent / name).read_text() != text]
    assert stale == [], f"{stale} differ from grafana/dashboards.py: run scripts/generate"


@pytest.mark.parametrize("path", DASHBOARDS, ids=IDS)
def test_the_sdk_model_round_trip_gives_back_the_same_json(path: Path):
    """Load into the SDK's Dashboard model (typed from Grafana's schema), serialise again: no change."""
    register_default_plugins()  # panel options and queries decode into their typed models
    text = path.read_text()
    model = Dashboard.from_json(json.loads(text))
    assert json.loads(json.dumps(model, cls=JSONEncoder)) == json.loads(text)
    assert json.dumps(model, cls=JSONEncoder, indent=2, sort_keys=True) + "\n" == text


@pytest.mark.parametrize("path", DASHBOARDS, ids=IDS)
def test_every_threshold_line_is_a_threshold_the_signal_table_exports(path: Path):
    exported = {(row.signal, row.level) for row in thresholds(Config(), ["celery"])}
    found = []
    for where, expr in dashboard_expressions(load_dashboard(path)):
        for selector in SELECTOR.findall(expr):
            labels = {name: value for name, op, value in MATCHER.findall(selector) if op == "="}
            assert set(labels) >= {"signal", "level"}, f"{where}: {expr} does not name signal and level"
            assert (labels["signal"], labels["level"]) in exported, f"{where}: {expr} is not an exported threshold"
            found.append((labels["signal"], labels["level"]))
    assert found, "no threshold lines?"


def test_the_per_task_threshold_line_follows_the_task_class():
    """Queue wait is compared with the latency threshold of the task's class, read from celery_task_class."""
    latency_levels = {row.level for row in thresholds(Config()) if row.signal == "latency_seconds"}
    [panel] = [p for p in panels(load_dashboard(TASK_DASHBOARD)) if p["title"] == "Queue wait vs latency threshold"]
    lines = [t["expr"] for t in panel["targets"] if "celery_threshold" in t["expr"]]
    classes = {re.search(r'task_class="(\w+)"', e).group(1) for e in lines}
    assert classes == latency_levels == {"normal", "heavy"}
    for expr in lines:
        level = re.search(r'level="(\w+)"', expr).group(1)
        assert f'celery_task_class{{name=~"$task", queue_name=~"$queue", task_class="{level}"}}' in expr


def test_the_per_task_dashboard_has_task_and_queue_and_the_overview_links_to_it():
    overview, task = load_dashboard(DASHBOARD), load_dashboard(TASK_DASHBOARD)
    assert (overview["uid"], task["uid"]) == (OVERVIEW_UID, TASK_UID)
    variables = {v["name"]: v for v in task["templating"]["list"]}
    assert set(variables) == {"datasource", "task", "queue"}
    assert not variables["task"]["multi"] and not variables["task"]["includeAll"], "one task at a time"
    assert "$task" in variables["queue"]["query"], "the queues this task runs on"
    # The overview's task tables open the per-task dashboard on the clicked task.
    for title in ("Top tasks", "Top exceptions"):
        [table] = [p for p in panels(overview) if p["title"] == title and p["type"] == "table"]
        links = [link["url"] for o in table["fieldConfig"]["overrides"] for prop in o["properties"]
                 if prop["id"] == "links" for link in prop["value"]]
        assert links and all(url.startswith(f"/d/{TASK_UID}?var-task=${{__value.raw}}") for url in links), title
    # And the two link to each other in their headers, keeping the time range.
    assert any(link["url"] == f"/d/{TASK_UID}" and link["keepTime"] for link in overview["links"])
    assert any(link["url"] == f"/d/{OVERVIEW_UID}" and link["keepTime"] for link in task["links"])


# -- two sidecars scraped by one Prometheus ----------------------------------------------------


@pytest.mark.parametrize("path", DASHBOARDS, ids=IDS)
def test_every_series_a_dashboard_queries_is_taken_once_across_sidecars(path: Path):
    """Two sidecars export the same series (instance tells them apart): each must be taken once,
    by max or min over its own labels, before anything adds series up (docs/deploy.md, HA)."""
    problems = [f"{where}: {problem}\n    {expr}" for where, expr in dashboard_expressions(load_dashboard(path))
                for problem in undeduplicated(expr, own_labels)]
    assert not problems, "\n".join(problems)


def test_the_dedup_check_finds_a_series_counted_per_sidecar():
    """The check above can fail: sums over the copies, a kept target label, a bare series."""
    assert undeduplicated('sum(celery_worker_up{hostname=~"$hostname"})', own_labels)
    assert undeduplicated("sum by (name) (rate(celery_task_succeeded_total[1m]))", own_labels)
    assert undeduplicated("max by (instance, hostname) (celery_worker_up)", own_labels)
    assert undeduplicated("max without (instance) (celery_worker_up)", own_labels)
    assert undeduplicated("celery_queue_length > 100", own_labels)
    assert undeduplicated('count(celery_task_class{task_class="heavy"})', own_labels)
    assert not undeduplicated("sum(max by (hostname) (celery_worker_up))", own_labels)
    assert not undeduplicated(
        "histogram_quantile(0.95, sum by (le) (max by (name, hostname, queue_name, le) "
        "(rate(celery_task_runtime_bucket[1m]))))", own_labels)


def test_own_labels_are_the_labels_the_sidecar_exports():
    """The dedup groups by these: a label missing here would merge series, one too many would
    group by a label no series has (harmless, but then the table is wrong)."""
    served = {family.name: set(family.labels) for family in doc_tables.served_families()}
    wrong = {name: (labels, served.get(name)) for name, labels in OWN_LABELS.items()
             if set(labels) != served.get(name)}
    assert not wrong, f"OWN_LABELS (grafana/panels.py) differs from /metrics: {wrong}"


def test_the_event_stream_panel_shows_what_its_alert_judges():
    """Missed / expected over the rule's window, the lowest share across sidecars, against the
    events_missed_ratio threshold line; and the end events never seen beside it."""
    top = load_dashboard(DASHBOARD)["panels"]
    start = next(i for i, p in enumerate(top) if p["type"] == "row" and p["title"] == "Sidecar")
    sidecar_row = top[start + 1:]
    assert all(p["type"] != "row" for p in sidecar_row), "the Sidecar row is the last"
    [missed] = [p for p in sidecar_row if p["title"] == "Task events missed vs threshold"]
    exprs = [t["expr"] for t in missed["targets"]]
    assert exprs[0] == EVENTS_MISSED_SHARE
    assert any('signal="events_missed_ratio", level="limit"' in e for e in exprs[1:])
    rules = yaml.safe_load(package_file("alerts/prometheus/rules.yml").read_text())
    [rule] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "CeleryEventStreamIncomplete"]
    for counter in ("missed", "expected"):
        window = f"increase(celery_sidecar_task_events_{counter}_fleet_total[{STREAM_WINDOW}])"
        assert window in EVENTS_MISSED_SHARE and window in rule["expr"], counter
    assert EVENTS_MISSED_SHARE.startswith("min(") and "min(" in rule["expr"]
    [unseen] = [p for p in sidecar_row if p["title"] == "End events unseen by task"]
    assert "celery_task_end_unseen_total" in unseen["targets"][0]["expr"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=IDS)
def test_descriptions_say_what_the_dashboard_shows(path: Path):
    text = path.read_text()
    assert "11497" not in text, "an unverifiable claim: say what the dashboard shows"
    assert len(load_dashboard(path)["description"]) > 100


# -- celery_task_class: the family the per-task threshold line reads --------------------------


def test_task_class_exports_the_class_of_every_task_and_queue_the_task_metrics_hold():
    path = DataPath.build({"heavy_tasks": ["report.*"], "heavy_queues": ["bulk"]})
    for i, (name, queue) in enumerate([("app.add", "celery"), ("report.daily", "celery"), ("app.add", "bulk"),
                                       ("app.add", "celery")]):
        path.handle({"type": "task-sent", "uuid": f"u{i}", "name": name, "queue": queue, "hostname": "p@x",
                     "timestamp": 1.0, "local_received": 1.0})
    collector = TaskClassCollector(path.metrics, path.config)
    [family] = collector.collect()
    assert family.name == "celery_task_class"
    series = {(s.labels["name"], s.labels["queue_name"]): (s.labels["task_class"], s.value) for s in family.samples}
    assert series == {("app.add", "celery"): ("normal", 1.0), ("report.daily", "celery"): ("heavy", 1.0),
                      ("app.add", "bulk"): ("heavy", 1.0)}

    # A reload that changes the patterns shows at the next scrape.
    path.config.current = Config.model_validate({"heavy_tasks": ["app.*"]})
    [family] = collector.collect()
    assert {s.labels["task_class"] for s in family.samples if s.labels["name"] == "app.add"} == {"heavy"}
    assert {s.labels["task_class"] for s in family.samples if s.labels["name"] == "report.daily"} == {"normal"}

"""Two sidecars on one broker, both scraped by one Prometheus (tests/support/ha_stack.py): the
shipped dashboards and alert rules mean what they mean with one sidecar.

What the test knows: one worker, and every task it sent (a warm-up that creates the series, then
a counted burst). What it compares:

- every panel query of both dashboards against the same query pointed at each sidecar alone
  (each series selector restricted to its `instance`), evaluated at one moment: the same series,
  and a value within the two sidecars' own values (they scrape at different moments, so theirs
  differ slightly; a doubled count is twice either);
- workers online and the task counts against the truth: one worker, the tasks sent;
- alerts: CeleryTaskFailures states each task's failures (not twice them), a stopped worker is one
  CeleryWorkerDown (not one per sidecar), and no alert but the per-sidecar ones names a sidecar.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator

import pytest

from celery_sidecar.grafana.panels import own_labels
from tests.support.ha_stack import EVALUATION_INTERVAL, TwoSidecars, two_sidecars
from tests.support.promql import restricted, undeduplicated
from tests.support.servers import wait_for
from tests.support.stack import DASHBOARDS, WORKER_NAME, dashboard_expressions, load_dashboard, substitute

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not shutil.which("prometheus"), reason="needs prometheus from Debian's packages"),
    pytest.mark.timeout(240),
]

# What the worker does with each task sent (demo.flaky with p_fail=1 retries 3 times, then fails).
RECEIVED = {"demo.ok": 1, "demo.fail": 1, "demo.flaky": 4}
SUCCEEDED = {"demo.ok": 1}
FAILED = {"demo.fail": 1, "demo.flaky": 1}
RETRIED = {"demo.flaky": 3}
WARM_UP = {"demo.ok": 1, "demo.fail": 1, "demo.flaky": 1}
BURST = {"demo.ok": 20, "demo.fail": 6, "demo.flaky": 3}
KWARGS = {"demo.flaky": {"p_fail": 1.0}, "demo.fail": {"reason": "counted"}}
# Alerts about one sidecar each: they name it (rules.yml's header says why).
PER_SIDECAR = {"CelerySidecarBrokerDisconnected", "CelerySidecarDown"}
SPREAD = 0.1  # of the larger sidecar's value: what scraping at different moments can add (a double: 100 %)
HISTORY = 30  # seconds of samples a task series has when the test evaluates


def outcomes(per_task: dict[str, int], sent: dict[str, int]) -> dict[str, int]:
    return {name: n * sent.get(name, 0) for name, n in per_task.items()}


@pytest.fixture(scope="module")
def ha() -> Iterator[TwoSidecars]:
    with two_sidecars() as stack:
        yield stack


@pytest.fixture(scope="module")
def settled(ha: TwoSidecars) -> dict[str, float]:
    """Warm-up, then the counted burst, both seen whole by both sidecars in Prometheus; returns
    the moments the test evaluates at."""
    def both_sidecars(expr: str, expected: float) -> bool:
        ha.check_alive()
        return ha.per_sidecar(expr) == {instance: expected for instance in ha.instances}

    wait_for(lambda: both_sidecars(f'celery_worker_up{{hostname="{WORKER_NAME}"}}', 1), timeout=60, interval=0.5,
             what="both sidecars to report the worker up in Prometheus")
    moments = {}
    for phase, sent in (("warm-up", WARM_UP), ("burst", BURST)):
        moments[phase] = time.time()
        for name, count in sent.items():
            ha.send(name, count, **KWARGS.get(name, {}))
        for family, per_task in (("received", RECEIVED), ("succeeded", SUCCEEDED), ("failed", FAILED),
                                 ("retried", RETRIED)):
            total = sum(outcomes(per_task, WARM_UP).values()) + (
                sum(outcomes(per_task, BURST).values()) if phase == "burst" else 0)
            wait_for(lambda family=family, total=total: both_sidecars(f"celery_task_{family}_total", total),
                     timeout=60, interval=0.5, what=f"both sidecars' {family} count at {total} after the {phase}")
    # increase() extrapolates a series' change over its samples to the window's edges: by up to
    # a scrape interval at each end, a few percent once the series has HISTORY seconds of samples.
    def history() -> bool:
        ha.check_alive()
        samples = ha.query("min by (instance) (count_over_time(celery_task_received_total[5m]))").values()
        return len(samples) == len(ha.instances) and min(samples) >= HISTORY / EVALUATION_INTERVAL

    wait_for(history, timeout=HISTORY + 30, interval=0.5, what=f"{HISTORY} s of samples of every task series")
    moments["settled"] = time.time()
    # The rate panels' window ($__rate_interval, 1m) must hold samples from before the burst.
    assert moments["settled"] - moments["burst"] < 50, f"the burst took too long to settle: {moments}"
    return moments


def panel_queries() -> list[tuple[str, str]]:
    return [(f"{path.name}: {where}", substitute(expr, dashboard))
            for path in DASHBOARDS for dashboard in [load_dashboard(path)]
            for where, expr in dashboard_expressions(dashboard)]


def within_the_sidecars(both: float, one: float, other: float) -> bool:
    if math.isnan(both) or math.isnan(one) or math.isnan(other):
        # histogram_quantile of a histogram with no observations in the window: NaN, alone or not.
        return math.isnan(both) and math.isnan(one) and math.isnan(other)
    slack = SPREAD * max(abs(one), abs(other)) + 1e-9
    return min(one, other) - slack <= both <= max(one, other) + slack


def test_every_dashboard_query_gives_what_one_sidecar_gives(ha: TwoSidecars, settled: dict[str, float]):
    queries = panel_queries()
    assert len(queries) >= 100
    at = settled["settled"]
    mismatches, compared = [], 0
    for where, expr in queries:
        both = ha.query(expr, at)
        alone = [ha.query(restricted(expr, instance=instance), at) for instance in ha.instances]
        if not both and not any(alone):
            continue
        compared += 1
        if not set(both) == set(alone[0]) == set(alone[1]):
            mismatches.append(f"{where}: series {sorted(both)} vs one sidecar's {sorted(alone[0])} / "
                              f"{sorted(alone[1])}\n    {expr}")
            continue
        for labels, value in both.items():
            if not within_the_sidecars(value, alone[0][labels], alone[1][labels]):
                mismatches.append(f"{where} {dict(labels)}: {value} with both, {alone[0][labels]} and "
                                  f"{alone[1][labels]} with one\n    {expr}")
    assert not mismatches, "two sidecars differ from one:\n" + "\n".join(mismatches)
    # Most panels have data here (not Redis's unacked age or Beat's lateness, say): the
    # comparison above is not over empty results.
    assert compared >= 0.8 * len(queries), f"only {compared} of {len(queries)} queries had data"


def test_workers_online_and_the_task_counts_are_the_truth(ha: TwoSidecars, settled: dict[str, float]):
    values = {where: ha.query(expr, settled["settled"]) for where, expr in panel_queries()}
    assert values["celery-sidecar.json: Workers online [A]"] == {(): 1}
    assert values["celery-sidecar.json: Workers offline [A]"] == {(): 0}
    counts = [("Tasks received", "Received", RECEIVED), ("Tasks succeeded", "Succeeded", SUCCEEDED),
              ("Tasks failed", "Failed", FAILED), ("Tasks retried", "Retried", RETRIED)]
    for overview_title, task_title, per_task in counts:
        # increase() over the range misses what came before a series' first sample (the warm-up
        # created them) and extrapolates a little: from the burst up to everything sent.
        burst = sum(outcomes(per_task, BURST).values())
        everything = burst + sum(outcomes(per_task, WARM_UP).values())
        for where in (f"celery-sidecar.json: {overview_title} [A]", f"celery-sidecar-task.json: {task_title} [A]"):
            [value] = values[where].values()
            assert burst <= value <= 1.1 * everything, (where, value, burst, everything)
    [(labels, received)] = values["celery-sidecar-task.json: Workers running this task [A]"].items()
    assert dict(labels) == {"hostname": WORKER_NAME}
    burst = sum(outcomes(RECEIVED, BURST).values())
    assert burst <= received <= 1.1 * (burst + sum(outcomes(RECEIVED, WARM_UP).values()))


def test_the_rules_take_each_series_once_live(ha: TwoSidecars, settled: dict[str, float]):
    """The rules Prometheus loaded, as the static check reads them, and failures counted once:
    CeleryTaskFailures' value is each task's failures (series new in its window count whole)."""
    ha.wait_evaluated_after(settled["settled"])
    failing = {a["labels"]["name"]: float(a["value"]) for a in ha.active_alerts()
               if a["labels"]["alertname"] == "CeleryTaskFailures"}
    every_failure = {name: n * (WARM_UP[name] + BURST[name]) for name, n in FAILED.items()}
    assert failing == every_failure

    rules = [r for g in ha.api("rules")["groups"] for r in g["rules"]]
    assert len(rules) > 20
    problems = [f"{r['name']}: {p}" for r in rules if r["name"] not in PER_SIDECAR
                for p in undeduplicated(r["query"], own_labels)]
    assert not problems, problems


def test_a_stopped_worker_is_one_alert_and_no_alert_names_a_sidecar(ha: TwoSidecars, settled: dict[str, float]):
    ha.stop_worker()

    def both_sidecars_see_it_down() -> bool:
        ha.check_alive("worker")
        return ha.per_sidecar(f'celery_worker_up{{hostname="{WORKER_NAME}"}} == 0') == {
            instance: 0 for instance in ha.instances}

    wait_for(both_sidecars_see_it_down, timeout=30, interval=0.2, what="both sidecars to report the worker down")
    ha.wait_evaluated_after(time.time(), "worker")

    down = [dict(labels) for labels in ha.query('ALERTS{alertname="CeleryWorkerDown"}')]
    states = [labels.pop("alertstate") for labels in down]  # pending for its first minute
    assert down == [{"__name__": "ALERTS", "alertname": "CeleryWorkerDown", "hostname": WORKER_NAME,
                     "severity": "critical"}], down
    assert states in (["pending"], ["firing"])

    alerts = ha.active_alerts()
    assert any(a["labels"]["alertname"] == "CeleryWorkerDown" for a in alerts)
    named = [a["labels"] for a in alerts if a["labels"]["alertname"] not in PER_SIDECAR
             and {"instance", "job"} & set(a["labels"])]
    assert not named, f"alerts that name a sidecar, so fire once per sidecar: {named}"
    label_sets = [tuple(sorted(a["labels"].items())) for a in alerts]
    assert len(label_sets) == len(set(label_sets))

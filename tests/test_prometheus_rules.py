"""The Prometheus rules and the Alertmanager config we ship are valid, and every alert is tested.

promtool and amtool are required: CI installs them (Debian: `prometheus`,
`prometheus-alertmanager`). A missing tool fails these tests instead of skipping them,
so a broken rule cannot slip through on a machine without it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest
import yaml

from celery_sidecar.grafana.panels import own_labels
from celery_sidecar.monitor.config.dashboard_links import OVERVIEW_UID, TASK_UID, VARIABLE_OF_SUBJECT
from celery_sidecar.monitor.signals import SIGNALS
from celery_sidecar.render import GRAFANA_URL_PLACEHOLDER
from tests.support.paths import package_file
from tests.support.promql import undeduplicated

# The installed package's copies: what render writes and Prometheus loads.
RULES = package_file("alerts/prometheus/rules.yml")
RULES_TEST = package_file("alerts/prometheus/tests/rules_test.yml")
ALERTMANAGER_TEMPLATE = package_file("alerts/prometheus/alertmanager.yml.j2")

INSTALL_HINT = {
    "promtool": "apt-get install prometheus  (or a release tarball from prometheus.io)",
    "amtool": "apt-get install prometheus-alertmanager  (or a release tarball from prometheus.io)",
}


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed, and these tests need it: {INSTALL_HINT[name]}", pytrace=False)
    return path


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=RULES.parent, capture_output=True, text=True, timeout=120)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def recording_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "record" in rule]


def rule_tests() -> list[dict]:
    return yaml.safe_load(RULES_TEST.read_text())["tests"]


def render_alertmanager_config(**settings: str) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(ALERTMANAGER_TEMPLATE.read_text()).render(**settings)


# ------------------------------------------------------------------ promtool


@pytest.mark.e2e  # runs promtool or amtool: not in the quick tier
def test_rules_pass_promtool_check() -> None:
    promtool = require_tool("promtool")
    assert_ok(run(promtool, "check", "rules", RULES))


@pytest.mark.e2e
def test_rules_pass_their_promtool_unit_tests() -> None:
    promtool = require_tool("promtool")
    assert_ok(run(promtool, "test", "rules", RULES_TEST))


# ------------------------------------------------------------------ what every rule must have


def test_every_alert_has_a_severity_and_a_summary() -> None:
    problems = []
    for rule in alert_rules():
        if rule.get("labels", {}).get("severity") not in {"info", "warning", "critical"}:
            problems.append(f"{rule['alert']}: labels.severity must be info, warning or critical")
        if not rule.get("annotations", {}).get("summary"):
            problems.append(f"{rule['alert']}: annotations.summary is missing")
        if not rule.get("annotations", {}).get("description"):
            problems.append(f"{rule['alert']}: annotations.description is missing")
    assert not problems, "\n".join(problems)


def test_every_alert_links_to_the_dashboard_that_shows_it() -> None:
    """dashboard_url, as the mixins do: per-task alerts open the per-task dashboard on their task,
    the others the overview (on their queue or worker). render replaces the placeholder."""
    per_task_signals = {s.prometheus_alert for s in SIGNALS if s.subject == "task"}
    problems = []
    for rule in alert_rules():
        name, url = rule["alert"], rule.get("annotations", {}).get("dashboard_url", "")
        per_task = "$labels.name" in rule["annotations"]["summary"]
        expected = f"{GRAFANA_URL_PLACEHOLDER}/d/{TASK_UID if per_task else OVERVIEW_UID}"
        if name in per_task_signals and not per_task:
            problems.append(f"{name}: judges a per-task signal but its summary names no task")
        if url.split("?")[0] != expected:
            problems.append(f"{name}: dashboard_url {url!r} should start with {expected}")
        # Each variable set is a label of the alert, URL-escaped, and a variable the dashboard has.
        for variable, label in re.findall(r"var-(\w+)=\{\{ \$labels\.(\w+) \| urlquery \}\}", url):
            if variable not in {v for v in VARIABLE_OF_SUBJECT.values() if v}:
                problems.append(f"{name}: no dashboard variable {variable}")
            if {"task": "name", "queue": "queue_name", "hostname": "hostname"}[variable] != label:
                problems.append(f"{name}: var-{variable} is set from {label}")
        if per_task and "var-task={{ $labels.name | urlquery }}" not in url:
            problems.append(f"{name}: the per-task dashboard needs var-task={{{{ $labels.name | urlquery }}}}")
    assert not problems, "\n".join(problems)


def test_every_alert_has_a_firing_and_a_quiet_promtool_case() -> None:
    fires: set[str] = set()
    stays_quiet: set[str] = set()
    for case in rule_tests():
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else stays_quiet).add(check["alertname"])

    names = [rule["alert"] for rule in alert_rules()]
    never_fires = [n for n in names if n not in fires]
    never_quiet = [n for n in names if n not in stays_quiet]
    assert not never_fires, f"alerts with no exp_alerts case in {RULES_TEST.name}: {never_fires}"
    assert not never_quiet, f"alerts with no 'exp_alerts: []' case in {RULES_TEST.name}: {never_quiet}"


def test_every_recording_rule_has_a_promql_expr_test() -> None:
    tested = {check["expr"] for case in rule_tests() for check in case.get("promql_expr_test", [])}
    untested = [rule["record"] for rule in recording_rules() if not any(rule["record"] in e for e in tested)]
    assert not untested, f"recording rules with no promql_expr_test in {RULES_TEST.name}: {untested}"


# About one sidecar each: every sidecar that lost the broker is its own alert, naming it.
PER_SIDECAR = {"CelerySidecarBrokerDisconnected"}


def test_every_rule_takes_each_series_once_across_sidecars() -> None:
    """Two sidecars scraped by one Prometheus export the same series (instance tells them
    apart): each rule takes every series once, by max or min over its own labels, so an alert
    fires once and a count is not doubled. The two-sidecar promtool stories show it per rule."""
    problems = []
    for rule in recording_rules() + alert_rules():
        name = rule.get("alert") or rule["record"]
        if name not in PER_SIDECAR:
            problems += [f"{name}: {problem}" for problem in undeduplicated(rule["expr"], own_labels)]
    assert not problems, "\n".join(problems)
    for name in PER_SIDECAR:
        [rule] = [r for r in alert_rules() if r["alert"] == name]
        assert "$labels.instance" in rule["annotations"]["summary"], f"{name} is about one sidecar: name it"


def test_thresholds_come_from_the_exported_gauges() -> None:
    """A rule that compares against a number would silently ignore a threshold change."""
    threshold_alerts = {
        "CeleryTaskLatencyHigh",
        "CeleryQueueLengthHigh",
        "CeleryQueueLengthCritical",
        "CeleryWorkerCpuHigh",
        "CeleryWorkerMemoryHigh",
        "CeleryTaskRetryRateHigh",
    }
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    missing = [name for name in sorted(threshold_alerts) if "celery_threshold" not in exprs.get(name, "")]
    assert not missing, f"these alerts must compare against celery_threshold: {missing}"


# ------------------------------------------------------------------ Alertmanager


@pytest.mark.parametrize(
    "settings",
    [
        {"slack_api_url_file": "/run/secrets/slack_webhook_url", "slack_channel": "#celery-alerts"},
        {"slack_api_url_file": "/run/secrets/slack_webhook_url"},
    ],
    ids=["with-channel", "webhook-default-channel"],
)
@pytest.mark.e2e
def test_rendered_alertmanager_config_passes_amtool(tmp_path: Path, settings: dict[str, str]) -> None:
    amtool = require_tool("amtool")
    config_file = tmp_path / "alertmanager.yml"
    config_file.write_text(render_alertmanager_config(**settings))

    assert_ok(run(amtool, "check-config", config_file))

    config = yaml.safe_load(config_file.read_text())
    slack = config["receivers"][0]["slack_configs"][0]
    assert slack["api_url_file"] == settings["slack_api_url_file"]
    assert "api_url" not in slack, "the webhook URL is a secret: reference it with api_url_file"

    # check-config does not parse inline Go templates; render them once so a typo fails here.
    empty_glob = tmp_path / "none.tmpl"
    empty_glob.write_text("")
    for field in ("title", "text"):
        assert_ok(run(amtool, "template", "render", f"--template.glob={empty_glob}", f"--template.text={slack[field]}"))


def test_alertmanager_template_refuses_to_render_without_the_webhook_file() -> None:
    with pytest.raises(jinja2.UndefinedError, match="slack_api_url_file"):
        render_alertmanager_config(slack_channel="#celery-alerts")

"""The deployable stack's configuration: an operator fills in .env and the configs are valid.

These run the real validators (nginx -t, promtool, docker-compose config) on what
`celery-sidecar render` and the compose file produce. The live stack is tests/test_stack_live.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import bcrypt
import pytest
import yaml
from click.testing import CliRunner

from celery_sidecar.render_cli import render_command
from tests.support.paths import SOURCE, package_file
from tests.support.stack import COMPOSE_FILE, DASHBOARD, DASHBOARDS, dashboard_expressions

GOOD_ENV = {
    "ALLOW_CIDRS": "10.0.0.0/8, 192.168.1.0/24,2001:db8::/32",
    "FLOWER_USER": "ops",
    "FLOWER_PASSWORD": "s3cret-Pa55",
    "SET_REAL_IP_FROM": "172.16.0.0/12",
    "ENABLE_PROMETHEUS_UI": "true",
}
COMPOSE_ENV = {
    "CELERY_BROKER_URL": "redis://redis:6379/0",
    "ALLOW_CIDRS": "10.0.0.0/8",
    "FLOWER_USER": "ops",
    "FLOWER_PASSWORD": "s3cret",
    "GRAFANA_ADMIN_PASSWORD": "also-secret",
}


def require(tool: str) -> str:
    """The tool's path; a missing tool fails the test (scripts/test installs them all)."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: scripts/test installs it with apt-get", pytrace=False)
    return path


def render(out: Path, env: dict[str, str], *args: str):
    # Only the given variables: the developer's own environment must not leak in.
    clean = {k: None for k in os.environ
             if k in GOOD_ENV or k.startswith(("ENABLE_", "LISTEN", "ALERTMANAGER_", "SHARE_"))
             or k == "GRAFANA_ROOT_URL"}
    return CliRunner().invoke(render_command, ["--out", str(out), *args], env={**clean, **env})


@pytest.fixture
def rendered(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    result = render(out, GOOD_ENV, "--rules-path", str(out / "prometheus" / "rules" / "*.yml"))
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.e2e  # runs a validator (nginx, promtool, amtool, docker-compose): not in the quick tier
def test_rendered_nginx_config_passes_nginx_t(rendered: Path, tmp_path: Path):
    conf = rendered / "nginx" / "nginx.conf"
    text = conf.read_text()
    assert "allow 10.0.0.0/8;" in text and "allow 192.168.1.0/24;" in text and "allow 2001:db8::/32;" in text
    assert "deny all;" in text
    assert "set_real_ip_from 172.16.0.0/12;" in text
    result = subprocess.run(
        [require("nginx"), "-t", "-c", str(conf), "-p", str(tmp_path), "-e", "stderr",
         "-g", f"pid {tmp_path / 'nginx.pid'};"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_htpasswd_holds_a_bcrypt_hash_not_the_password(rendered: Path):
    line = (rendered / "nginx" / "htpasswd").read_text().strip()
    user, hashed = line.split(":", 1)
    assert user == "ops"
    assert hashed.startswith("$2b$")
    assert bcrypt.checkpw(GOOD_ENV["FLOWER_PASSWORD"].encode(), hashed.encode())
    for path in rendered.rglob("*"):
        if path.is_file():
            assert GOOD_ENV["FLOWER_PASSWORD"] not in path.read_text(), path


@pytest.mark.e2e
def test_rendered_prometheus_config_passes_promtool(rendered: Path):
    config = rendered / "prometheus" / "prometheus.yml"
    rules = rendered / "prometheus" / "rules" / "celery-sidecar.yml"
    assert yaml.safe_load(config.read_text())["rule_files"] == [str(rules.parent / "*.yml")]
    shipped = package_file("alerts/prometheus/rules.yml").read_text()
    assert rules.read_text() == shipped.replace("__GRAFANA_URL__", "http://localhost:8080/grafana"), \
        "the shipped rules, their dashboard links on the compose stack's Grafana by default"
    result = subprocess.run([require("promtool"), "check", "config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "rules found" in result.stdout, result.stdout


def test_render_points_every_alerts_dashboard_link_at_the_grafana_url(tmp_path: Path):
    result = render(tmp_path / "out", {**GOOD_ENV, "GRAFANA_ROOT_URL": "https://ops.example.com/grafana/"})
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out/prometheus/rules/celery-sidecar.yml").read_text()
    assert "__GRAFANA_URL__" not in text
    groups = yaml.safe_load(text)["groups"]
    urls = [r["annotations"]["dashboard_url"] for g in groups for r in g["rules"] if "alert" in r]
    assert urls and all(u.startswith("https://ops.example.com/grafana/d/celery-sidecar") for u in urls), urls

    for bad in ("ftp://ops.example.com/grafana", "https://ops.example.com/gra fana",
                "%(protocol)s://%(domain)s:%(http_port)s/grafana/", 'https://x/"}}'):
        refused = render(tmp_path / "bad", {**GOOD_ENV, "GRAFANA_ROOT_URL": bad})
        assert refused.exit_code != 0 and "GRAFANA_ROOT_URL" in refused.output, bad
        assert not (tmp_path / "bad").exists()


def test_grafana_provisioning_has_fixed_datasource_and_dashboard_provider(rendered: Path):
    ds = yaml.safe_load((rendered / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["uid"] == "celery-sidecar-prometheus"
    assert source["url"] == "http://prometheus:9090/prometheus"
    providers = yaml.safe_load((rendered / "grafana/provisioning/dashboards/celery-sidecar.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards/celery-sidecar"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({**GOOD_ENV, "FLOWER_PASSWORD": ""}, "FLOWER_PASSWORD is not set"),
        ({**GOOD_ENV, "FLOWER_USER": ""}, "FLOWER_USER is not set"),
        ({**GOOD_ENV, "ALLOW_CIDRS": ""}, "ALLOW_CIDRS is empty"),
        ({**GOOD_ENV, "ALLOW_CIDRS": "10.0.0.0/8,10.0.0.300/32"}, "ALLOW_CIDRS: '10.0.0.300/32' is not a valid"),
        ({**GOOD_ENV, "ALLOW_CIDRS": "192.168.1.10/24"}, "did you mean 192.168.1.0/24?"),
        ({**GOOD_ENV, "SET_REAL_IP_FROM": "everyone"}, "SET_REAL_IP_FROM: 'everyone' is not a valid"),
        ({**GOOD_ENV, "FLOWER_USER": "ops;deny"}, "FLOWER_USER may only contain"),
    ],
)
def test_render_refuses_missing_secrets_and_bad_networks(tmp_path: Path, env: dict, message: str):
    result = render(tmp_path / "out", env)
    assert result.exit_code != 0
    assert message in result.output
    assert not (tmp_path / "out").exists(), "nothing is written when a setting is refused"
    assert GOOD_ENV["FLOWER_PASSWORD"] not in result.output


def test_render_reports_every_missing_or_invalid_setting_in_one_run(tmp_path: Path):
    missing = render(tmp_path / "out", {"ALLOW_CIDRS": "", "FLOWER_USER": "", "FLOWER_PASSWORD": "",
                                        "ENABLE_ALERTMANAGER": "true"})
    assert missing.exit_code != 0
    assert "4 settings are missing or invalid" in missing.output, missing.output
    for message in ("ALLOW_CIDRS is empty", "FLOWER_USER is not set", "FLOWER_PASSWORD is not set",
                    "ALERTMANAGER_SLACK_WEBHOOK_URL is not set"):
        assert missing.output.count(message) == 1, (message, missing.output)

    # Values that do not parse are listed with the rest, and each variable once.
    invalid = render(tmp_path / "out", {**GOOD_ENV, "ALLOW_CIDRS": "10.0.0.300/32, 192.168.1.10/24",
                                        "SET_REAL_IP_FROM": "everyone", "FLOWER_PASSWORD": "",
                                        "SCRAPE_INTERVAL": "often"})
    assert invalid.exit_code != 0
    for message in ("ALLOW_CIDRS: '10.0.0.300/32' is not a valid", "did you mean 192.168.1.0/24?",
                    "SET_REAL_IP_FROM: 'everyone' is not a valid", "FLOWER_PASSWORD is not set",
                    "SCRAPE_INTERVAL: 'often' is not a duration"):
        assert message in invalid.output, (message, invalid.output)
    assert "ALLOW_CIDRS is empty" not in invalid.output, "a value that did not parse is not also empty"
    assert "5 settings are missing or invalid" in invalid.output, invalid.output
    assert not (tmp_path / "out").exists(), "nothing is written when a setting is refused"


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_secret_files_are_readable_by_their_owner_only_unless_shared(tmp_path: Path):
    secrets = {"nginx/htpasswd", "alertmanager/slack_webhook_url"}
    env = {**GOOD_ENV, "ENABLE_ALERTMANAGER": "true",
           "ALERTMANAGER_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T000/B000/XXXX"}
    out = tmp_path / "out"
    # No umask to lean on: the modes are render's own.
    umask = os.umask(0)
    try:
        shared = render(out, {**env, "SHARE_SECRET_FILES": "true"})
        assert shared.exit_code == 0, shared.output
        assert {name for name, mode in _modes(out).items() if mode == 0o644} >= secrets, "shared: 0644"

        # Rendered again over the shared files: the secrets are closed again, and nothing else moves.
        result = render(out, env)
        assert result.exit_code == 0, result.output
    finally:
        os.umask(umask)
    modes = _modes(out)
    assert {name: f"{modes[name]:o}" for name in secrets} == {name: "600" for name in secrets}
    for name, mode in modes.items():
        if name in secrets:
            continue
        if (out / name).is_dir():
            assert mode == 0o755, f"{name} is {mode:o}"
        else:
            assert mode == 0o644, f"{name} is {mode:o}: its reader (nginx, Grafana, Prometheus) is another user"
    assert not [p.name for p in out.rglob(".*.tmp")], "no temp file is left behind"


def test_the_alertmanager_webhook_flag_says_whose_webhook_it_is_and_the_old_name_still_works(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    hook = "https://hooks.slack.com/services/T000/B000/XXXX"
    env = {**GOOD_ENV, "ENABLE_ALERTMANAGER": "true"}
    helped = render(tmp_path / "help", env, "--help")
    assert "--alertmanager-slack-webhook-url" in helped.output and "ALERTMANAGER_SLACK_WEBHOOK_URL" in helped.output
    assert "--slack-webhook-url" not in helped.output.replace("--alertmanager-slack-webhook-url", ""), \
        "the old name is hidden from --help"

    with caplog.at_level(logging.WARNING):
        new = render(tmp_path / "new", env, "--alertmanager-slack-webhook-url", hook)
    assert new.exit_code == 0, new.output
    assert (tmp_path / "new/alertmanager/slack_webhook_url").read_text().strip() == hook
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        old = render(tmp_path / "old", env, "--slack-webhook-url", hook)
    assert old.exit_code == 0, old.output
    assert (tmp_path / "old/alertmanager/slack_webhook_url").read_text().strip() == hook
    (warning,) = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert "--alertmanager-slack-webhook-url" in warning and "\n" not in warning and hook not in warning
    assert hook not in old.output

    # The old name on the command line still beats the variable, as any flag does.
    caplog.clear()
    from_env = {**env, "ALERTMANAGER_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T1/B1/Y"}
    both = render(tmp_path / "both", from_env, "--slack-webhook-url", hook)
    assert both.exit_code == 0, both.output
    assert (tmp_path / "both/alertmanager/slack_webhook_url").read_text().strip() == hook


@pytest.mark.e2e
def test_alertmanager_profile_renders_the_webhook_into_a_file_not_the_config(tmp_path: Path):
    env = {**GOOD_ENV, "ENABLE_ALERTMANAGER": "true"}
    refused = render(tmp_path / "no", env)
    assert refused.exit_code != 0 and "ALERTMANAGER_SLACK_WEBHOOK_URL is not set" in refused.output

    hook = "https://hooks.slack.com/services/T000/B000/XXXX"
    result = render(tmp_path / "out", {**env, "ALERTMANAGER_SLACK_WEBHOOK_URL": hook})
    assert result.exit_code == 0, result.output
    prom = yaml.safe_load((tmp_path / "out/prometheus/prometheus.yml").read_text())
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    am = tmp_path / "out/alertmanager/alertmanager.yml"
    assert hook not in am.read_text() and hook not in result.output
    assert (tmp_path / "out/alertmanager/slack_webhook_url").read_text().strip() == hook
    check = subprocess.run([require("amtool"), "check-config", str(am)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


# --- compose ----------------------------------------------------------------------------

def compose_config(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    # An empty --env-file: a developer's own .env must not satisfy (or break) the check.
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    return subprocess.run(
        [require("docker-compose"), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "config"],
        capture_output=True, text=True, timeout=60, cwd=SOURCE,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env},
    )


@pytest.mark.e2e
def test_compose_file_validates_with_the_required_settings(tmp_path: Path):
    result = compose_config(COMPOSE_ENV, tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", ["FLOWER_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "ALLOW_CIDRS",
                                     "CELERY_BROKER_URL"])
@pytest.mark.e2e
def test_compose_refuses_to_start_without_a_required_setting(missing: str, tmp_path: Path):
    env = {k: v for k, v in COMPOSE_ENV.items() if k != missing}
    result = compose_config(env, tmp_path)
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr, result.stderr


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_the_compose_file_mounts_nothing_from_the_checkout_but_the_config():
    """The stack runs from the image: everything else comes from render's volumes."""
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert source == "./config", f"{name} mounts {source} from the checkout"
                assert (SOURCE / source / "sidecar.yml").exists()
        build = service.get("build")
        if build:
            assert (SOURCE / build["context"] / build.get("dockerfile", "Dockerfile")).exists()


def test_compose_paths_agree_with_what_render_writes(rendered: Path):
    """Each service reads the rendered file at the path its volume mounts it on."""
    services = compose()["services"]

    def mount(service: str, source: str) -> str:
        (target,) = [v.split(":")[1] for v in services[service]["volumes"] if v.split(":")[0] == source]
        return target

    render_mounts = {v.split(":")[0]: v.split(":")[1] for v in services["render"]["volumes"]}
    assert render_mounts == {"nginx-conf": "/out/nginx", "prometheus-conf": "/out/prometheus",
                             "grafana-provisioning": "/out/grafana/provisioning",
                             "grafana-dashboards": "/out/grafana/dashboards",
                             "alertmanager-conf": "/out/alertmanager"}
    assert services["render"]["command"][-2:] == ["--out", "/out"]

    nginx = services["nginx"]["command"]
    assert nginx[nginx.index("-c") + 1] == mount("nginx", "nginx-conf") + "/nginx.conf"
    assert "--config.file=" + mount("prometheus", "prometheus-conf") + "/prometheus.yml" in \
        services["prometheus"]["command"]
    default_rules = render_command.params[[p.name for p in render_command.params].index("rules_path")].default
    assert default_rules == mount("prometheus", "prometheus-conf") + "/rules/*.yml"
    assert (rendered / "prometheus" / "rules" / "celery-sidecar.yml").exists()
    assert mount("grafana", "grafana-provisioning") == "/etc/grafana/provisioning"
    provider = yaml.safe_load((rendered / "grafana/provisioning/dashboards/celery-sidecar.yml").read_text())
    dashboards = mount("grafana", "grafana-dashboards")
    assert provider["providers"][0]["options"]["path"] == dashboards
    for dashboard in DASHBOARDS:
        assert (rendered / "grafana" / "dashboards" / dashboard.name).read_text() == dashboard.read_text()
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards}/{DASHBOARD.name}"
    am = services["alertmanager"]["command"]
    assert "--config.file=" + mount("alertmanager", "alertmanager-conf") + "/alertmanager.yml" in am


def test_compose_shares_the_secret_files_with_the_other_users_that_read_them():
    """render runs as uid 10001; nginx's workers (101) and Alertmanager (nobody) must read its secrets."""
    services = compose()["services"]
    assert str(services["render"]["environment"]["SHARE_SECRET_FILES"]).lower() == "true"
    for reader in ("nginx", "alertmanager"):
        assert "user" not in services[reader], f"{reader} runs as its image's own user, not render's"


def test_only_nginx_publishes_a_port():
    publishing = {name for name, s in compose()["services"].items() if s.get("ports")}
    assert publishing == {"nginx"}
    for name, service in compose()["services"].items():
        assert service.get("network_mode") != "host", name


def test_sidecar_image_runs_as_non_root_with_a_healthcheck():
    dockerfile = (SOURCE / "Dockerfile").read_text()
    final_stage = dockerfile.split("\nFROM ")[-1]
    assert final_stage.startswith("python:3.11-slim")
    assert "\nUSER " in final_stage and "USER root" not in final_stage
    healthcheck = final_stage[final_stage.index("\nHEALTHCHECK"):].split("\nCMD")[0]
    assert "/health" in healthcheck and "python" in healthcheck and "curl" not in healthcheck
    assert "build-essential" not in final_stage and "apt-get install" not in final_stage


# --- dashboard --------------------------------------------------------------------------

DASHBOARD_IDS = [p.name for p in DASHBOARDS]
UIDS = {"celery-sidecar.json": "celery-sidecar", "celery-sidecar-task.json": "celery-sidecar-task"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=DASHBOARD_IDS)
def test_dashboard_is_provisionable(path: Path):
    text = path.read_text()
    dashboard = json.loads(text)
    assert "__inputs" not in dashboard and "${DS_" not in text
    assert dashboard["uid"] == UIDS[path.name], "a fixed uid: links and provisioning rely on it"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "celery-sidecar-prometheus"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}", var["name"]
            if var["includeAll"]:
                assert var["allValue"], f"${var['name']} needs All handling"


def test_every_dashboard_has_its_fixed_uid():
    assert sorted(UIDS) == sorted(DASHBOARD_IDS)
    assert DASHBOARD.name == "celery-sidecar.json"  # compose's home dashboard


@pytest.mark.parametrize(("path", "at_least"),
                         [pytest.param(p, 25 if p == DASHBOARD else 15, id=p.name) for p in DASHBOARDS])
def test_every_dashboard_panel_queries_prometheus_through_the_variable(path: Path, at_least: int):
    dashboard = json.loads(path.read_text())
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])] if p["type"] != "row"]
    assert len(panels) >= at_least
    for panel in panels:
        assert panel.get("targets"), f"panel {panel['title']!r} has no targets"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target.get("expr"), f"panel {panel['title']!r} has an empty query"
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=DASHBOARD_IDS)
def test_dashboard_uses_only_contract_metric_names(path: Path):
    contract = (SOURCE / "docs" / "metrics.md").read_text()  # generated from the exporters
    families = {"celery_task_" + s + "_total" for s in
                ("sent", "received", "started", "succeeded", "failed", "rejected", "revoked", "retried")}
    names: set[str] = set()
    dashboard = json.loads(path.read_text())
    for expr in [e for _, e in dashboard_expressions(dashboard)] + [
            v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]:
        names.update(n for n in _metric_names(expr))
    for name in names:
        base = name.removesuffix("_bucket")
        assert name in families or f"`{base}`" in contract, f"{name}: not served (docs/metrics.md)"


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(celery_[a-z_]+)\b", expr))

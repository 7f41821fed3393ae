"""The `celery-sidecar render` command: its flags (each also read from an environment variable),
and which render they drive: the compose stack's configs (sidecar/render.py) or, with
``--kubernetes``, the manifests (sidecar/kubernetes.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
import jinja2

from celery_sidecar import kubernetes, resources
from celery_sidecar.render import (
    DEFAULT_GRAFANA_URL,
    SettingsError,
    StackSettings,
    link_and_scrape_problems,
    parse_cidrs,
    render_kubernetes,
    render_stack,
    variable_of,
)

log = logging.getLogger(__name__)


def _given_by_environment(param: str) -> bool:
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(param) is click.core.ParameterSource.ENVIRONMENT


@click.command("render")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write nginx/, prometheus/, grafana/ and alertmanager/ into (with "
                   "--kubernetes: the manifests and their kustomization.yaml).")
@click.option("--allow-cidrs", envvar="ALLOW_CIDRS", default="", show_envvar=True,
              help="Client networks allowed through nginx, comma separated. Required.")
@click.option("--flower-user", envvar="FLOWER_USER", default="", show_envvar=True,
              help="Basic-auth user for /flower/ (and /prometheus/). Required.")
@click.option("--flower-password", envvar="FLOWER_PASSWORD", default="", show_envvar=True,
              help="Basic-auth password; stored only as a bcrypt hash. Required.")
@click.option("--set-real-ip-from", envvar="SET_REAL_IP_FROM", default="", show_envvar=True,
              help="Proxies whose X-Forwarded-For nginx may trust. Empty: trust none.")
@click.option("--listen", envvar="LISTEN", default="8080", show_default=True, show_envvar=True,
              help="nginx listen: PORT or ADDRESS:PORT.")
@click.option("--sidecar-addr", envvar="SIDECAR_ADDR", default="sidecar:9808", show_default=True,
              show_envvar=True)
@click.option("--flower-addr", envvar="FLOWER_ADDR", default="flower:5555", show_default=True,
              show_envvar=True)
@click.option("--grafana-addr", envvar="GRAFANA_ADDR", default="grafana:3000", show_default=True,
              show_envvar=True)
@click.option("--prometheus-addr", envvar="PROMETHEUS_ADDR", default="prometheus:9090", show_default=True,
              show_envvar=True)
@click.option("--alertmanager-addr", envvar="ALERTMANAGER_ADDR", default="alertmanager:9093",
              show_default=True, show_envvar=True)
@click.option("--resolver", envvar="RESOLVER", default="127.0.0.11", show_default=True, show_envvar=True,
              help="DNS server nginx resolves upstream names with (Docker's embedded DNS).")
@click.option("--enable-prometheus-ui/--no-enable-prometheus-ui", envvar="ENABLE_PROMETHEUS_UI",
              default=False, show_default=True, show_envvar=True,
              help="Route /prometheus/ (allow-list + basic auth) to Prometheus's UI.")
@click.option("--scrape-interval", envvar="SCRAPE_INTERVAL", default="15s", show_default=True,
              show_envvar=True)
@click.option("--rules-path", envvar="PROMETHEUS_RULES_PATH", default="/etc/prometheus/rendered/rules/*.yml",
              show_default=True, show_envvar=True,
              help="rule_files entry, as Prometheus sees it (render writes the rules to OUT/prometheus/rules/).")
@click.option("--enable-alertmanager/--no-enable-alertmanager", envvar="ENABLE_ALERTMANAGER",
              default=False, show_default=True, show_envvar=True,
              help="Send Prometheus alerts to Alertmanager (the compose 'alertmanager' profile).")
@click.option("--alertmanager-slack-webhook-url", "slack_webhook_url", envvar="ALERTMANAGER_SLACK_WEBHOOK_URL",
              default="", show_envvar=True,
              help="Alertmanager's Slack webhook (written to a file, not into alertmanager.yml). The sidecar's "
                   "own alerts use `run --slack-webhook-url` (SLACK_WEBHOOK_URL) instead.")
# The flag's old name, which `run` uses for the sidecar's own webhook: kept working, unlisted.
@click.option("--slack-webhook-url", "deprecated_slack_webhook_url", default=None, hidden=True)
@click.option("--slack-channel", envvar="ALERTMANAGER_SLACK_CHANNEL", default="", show_envvar=True)
@click.option("--share-secret-files/--no-share-secret-files", envvar="SHARE_SECRET_FILES", default=False,
              show_default=True, show_envvar=True,
              help="Write htpasswd and Alertmanager's webhook file readable by all (0644) instead of by their "
                   "owner only (0600): for when another user reads them, as in the compose stack, whose nginx "
                   "and Alertmanager read them from volumes only they mount.")
@click.option("--grafana-url", envvar="GRAFANA_ROOT_URL", default=DEFAULT_GRAFANA_URL, show_default=True,
              show_envvar=True,
              help="Where users open Grafana (the compose stack's Grafana root URL): the base of the "
                   "dashboard_url annotation of every Prometheus alert.")
@kubernetes.kubernetes_options
# Long only by its signature: click passes every flag as a parameter.
def render_command(out: Path, allow_cidrs: str, flower_user: str, flower_password: str,
                   set_real_ip_from: str, listen: str, sidecar_addr: str, flower_addr: str,
                   grafana_addr: str, prometheus_addr: str, alertmanager_addr: str, resolver: str,
                   enable_prometheus_ui: bool, scrape_interval: str, rules_path: str,
                   enable_alertmanager: bool, slack_webhook_url: str, deprecated_slack_webhook_url: str | None,
                   slack_channel: str, share_secret_files: bool, grafana_url: str, manifests: bool,
                   **kubernetes_flags: Any) -> None:
    """Render the monitoring stack's nginx, Prometheus, Grafana and Alertmanager configs, or
    (--kubernetes) the manifests that run the sidecar on Kubernetes."""
    if manifests:
        _render_kubernetes(out, grafana_url.rstrip("/"), scrape_interval, kubernetes_flags)
        return
    if deprecated_slack_webhook_url is not None:
        log.warning("render --slack-webhook-url is deprecated: use --alertmanager-slack-webhook-url "
                    "(Alertmanager's webhook; run --slack-webhook-url is the sidecar's own)")
        if not slack_webhook_url or _given_by_environment("slack_webhook_url"):
            slack_webhook_url = deprecated_slack_webhook_url
    problems: list[str] = []

    def networks(text: str, variable: str) -> tuple[str, ...]:
        try:
            return parse_cidrs(text, variable)
        except SettingsError as exc:
            problems.extend(exc.problems)
            return ()

    allowed, trusted = networks(allow_cidrs, "ALLOW_CIDRS"), networks(set_real_ip_from, "SET_REAL_IP_FROM")
    try:
        settings = StackSettings(
            allow_cidrs=allowed,
            flower_user=flower_user,
            flower_password=flower_password,
            set_real_ip_from=trusted,
            listen=listen,
            sidecar_addr=sidecar_addr,
            flower_addr=flower_addr,
            grafana_addr=grafana_addr,
            prometheus_addr=prometheus_addr,
            alertmanager_addr=alertmanager_addr,
            resolver=resolver,
            prometheus_ui=enable_prometheus_ui,
            scrape_interval=scrape_interval,
            rules_path=rules_path,
            alertmanager=enable_alertmanager,
            slack_webhook_url=slack_webhook_url,
            slack_channel=slack_channel,
            grafana_url=grafana_url.rstrip("/"),
            share_secret_files=share_secret_files,
        )
    except SettingsError as exc:
        # A variable whose value did not parse is not reported a second time as empty.
        reported = {variable_of(p) for p in problems}
        problems.extend(p for p in exc.problems if variable_of(p) not in reported)
    if problems:
        raise click.UsageError(str(SettingsError(*problems)))
    try:
        written = render_stack(settings, out)
    except (resources.MissingResource, jinja2.TemplateNotFound) as exc:
        raise click.ClickException(str(exc)) from None
    for path in written:
        click.echo(f"wrote {path}")


# The compose stack's settings: meaningless for the manifests, so said once when given as flags.
_COMPOSE_ONLY = ("allow_cidrs", "flower_user", "flower_password", "set_real_ip_from", "listen", "sidecar_addr",
                 "flower_addr", "grafana_addr", "prometheus_addr", "alertmanager_addr", "resolver",
                 "enable_prometheus_ui", "rules_path", "enable_alertmanager", "slack_webhook_url",
                 "deprecated_slack_webhook_url", "slack_channel", "share_secret_files")


def _render_kubernetes(out: Path, grafana_url: str, scrape_interval: str, flags: dict[str, Any]) -> None:
    ctx = click.get_current_context()
    ignored = [f"--{name.replace('_', '-')}" for name in _COMPOSE_ONLY
               if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
    if ignored:
        log.warning("render --kubernetes ignores the compose stack's %s", ", ".join(ignored))
    problems = link_and_scrape_problems(grafana_url, scrape_interval)
    try:
        settings = kubernetes.settings_from_flags(scrape_interval, flags)
    except kubernetes.KubernetesSettingsError as exc:
        problems += exc.problems
    if problems:
        raise click.UsageError(str(SettingsError(*problems)))
    try:
        written = render_kubernetes(settings, grafana_url, out)
    except resources.MissingResource as exc:
        raise click.ClickException(str(exc)) from None
    for path in written:
        click.echo(f"wrote {path}")


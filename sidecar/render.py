"""`celery-sidecar render`: the stack's deployment configs from one set of settings.

One render produces everything the compose stack (and the native test harness) runs
from: the nginx config and its htpasswd, prometheus.yml and the alert rules (their
``dashboard_url`` links pointed at ``--grafana-url``), Grafana provisioning and dashboards
and, when the Alertmanager profile is on, alertmanager.yml.
The templates, rules and dashboards are the package's own data (sidecar/resources.py),
so an installed wheel renders the stack without a source checkout. Only the click options
read the environment; the render itself takes a `StackSettings`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import click
import jinja2

from celery_sidecar import resources

RULES_FILE = "celery-sidecar.yml"
# The shipped rules' dashboard_url annotations start with this; render puts the Grafana URL there.
GRAFANA_URL_PLACEHOLDER = "__GRAFANA_URL__"
# nginx serves Grafana under /grafana/ on the one published port (NGINX_PORT, 8080 by default).
DEFAULT_GRAFANA_URL = "http://localhost:8080/grafana"

# nginx checks the password on *every* request (each Flower asset), synchronously in a worker.
# Cost 12 would add ~250 ms per asset; 8 keeps a page load snappy and still costs an
# offline attacker ~2^8 rounds per guess.
BCRYPT_ROUNDS = 8

_ADDR = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):\d{1,5}$")
_LISTEN = re.compile(r"^(?:(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]):)?\d{1,5}$")
_DURATION = re.compile(r"^\d+(?:ms|s|m|h)$")
_USER = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_URL_PATH = re.compile(r"^(/[A-Za-z0-9._-]+)+$")
# Goes into YAML double quotes and a Go template: no quotes, backslashes, braces or whitespace.
_GRAFANA_URL = re.compile(r"^https?://[^\s\"'\\{}<>`|^]+$")


class SettingsError(ValueError):
    """A setting the stack cannot start with; the message names the variable, never a secret."""


@dataclass(frozen=True)
class StackSettings:
    allow_cidrs: tuple[str, ...]
    flower_user: str
    flower_password: str = field(repr=False)
    set_real_ip_from: tuple[str, ...] = ()
    listen: str = "8080"
    sidecar_addr: str = "sidecar:9808"
    flower_addr: str = "flower:5555"
    grafana_addr: str = "grafana:3000"
    prometheus_addr: str = "prometheus:9090"
    alertmanager_addr: str = "alertmanager:9093"
    # Docker's embedded DNS. nginx resolves upstreams per request, so a restarted container's
    # new IP is picked up and `nginx -t` does not need the upstream hosts to exist.
    resolver: str = "127.0.0.11"
    prometheus_ui: bool = False
    prometheus_path: str = "/prometheus"
    scrape_interval: str = "15s"
    rules_path: str = "/etc/prometheus/rendered/rules/*.yml"
    alertmanager: bool = False
    slack_webhook_url: str = field(default="", repr=False)
    slack_channel: str = ""
    alertmanager_secret_path: str = "/etc/alertmanager/rendered/slack_webhook_url"
    grafana_url: str = DEFAULT_GRAFANA_URL  # where users reach Grafana: the alerts' dashboard links

    def __post_init__(self) -> None:
        _check_settings(self)

    def template_context(self) -> dict[str, object]:
        # The password is left out on purpose: templates only ever see the hash file's path.
        return {
            "allow_cidrs": self.allow_cidrs,
            "set_real_ip_from": self.set_real_ip_from,
            "listen": self.listen,
            "sidecar_addr": self.sidecar_addr,
            "flower_addr": self.flower_addr,
            "grafana_addr": self.grafana_addr,
            "prometheus_addr": self.prometheus_addr,
            "alertmanager_addr": self.alertmanager_addr,
            "resolver": self.resolver,
            "prometheus_ui": self.prometheus_ui,
            "prometheus_path": self.prometheus_path,
            "scrape_interval": self.scrape_interval,
            "rules_path": self.rules_path,
            "alertmanager": self.alertmanager,
            "slack_api_url_file": self.alertmanager_secret_path,
            "slack_channel": self.slack_channel,
        }


def parse_cidrs(text: str, variable: str) -> tuple[str, ...]:
    """Comma/space separated networks; a bare address means that one host."""
    networks: list[str] = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f"; did you mean {ipaddress.ip_network(item, strict=False)}?"
            raise SettingsError(f"{variable}: {item!r} is not a valid IP network ({exc}){hint}") from None
        networks.append(str(net))
    return tuple(networks)


def _check_settings(s: StackSettings) -> None:
    if not s.allow_cidrs:
        raise SettingsError(
            "ALLOW_CIDRS is empty: list the client networks allowed to reach the stack, e.g. "
            "ALLOW_CIDRS=10.0.0.0/8,192.168.1.0/24 (0.0.0.0/0,::/0 opens it to everyone)"
        )
    if not s.flower_user:
        raise SettingsError("FLOWER_USER is not set: the basic-auth user for /flower/ is required")
    if not _USER.match(s.flower_user):
        raise SettingsError("FLOWER_USER may only contain letters, digits and . _ @ - (max 64)")
    if not s.flower_password:
        raise SettingsError("FLOWER_PASSWORD is not set: there is no default password, choose one")
    if any(c in s.flower_password for c in "\r\n\0"):
        raise SettingsError("FLOWER_PASSWORD must not contain newlines or NUL bytes")
    for name, value in (
        ("SIDECAR_ADDR", s.sidecar_addr),
        ("FLOWER_ADDR", s.flower_addr),
        ("GRAFANA_ADDR", s.grafana_addr),
        ("PROMETHEUS_ADDR", s.prometheus_addr),
        ("ALERTMANAGER_ADDR", s.alertmanager_addr),
    ):
        if not _ADDR.match(value):
            raise SettingsError(f"{name}: {value!r} is not host:port")
    if not _LISTEN.match(s.listen):
        raise SettingsError(f"LISTEN: {s.listen!r} is not PORT or ADDRESS:PORT")
    if not _DURATION.match(s.scrape_interval):
        raise SettingsError(f"SCRAPE_INTERVAL: {s.scrape_interval!r} is not a duration like 15s")
    if not _URL_PATH.match(s.prometheus_path):
        raise SettingsError(f"PROMETHEUS_PATH: {s.prometheus_path!r} must look like /prometheus")
    try:
        ipaddress.ip_address(s.resolver)
    except ValueError:
        raise SettingsError(f"RESOLVER: {s.resolver!r} is not an IP address") from None
    if "%(" in s.grafana_url:
        raise SettingsError(
            f"GRAFANA_ROOT_URL: {s.grafana_url!r} uses Grafana's %(...)s placeholders; alert links need "
            "the URL users open, e.g. https://ops.example.com/grafana/"
        )
    if not _GRAFANA_URL.match(s.grafana_url):
        raise SettingsError(f"GRAFANA_ROOT_URL: {s.grafana_url!r} is not an http(s) URL like https://ops.example.com/grafana/")
    if s.alertmanager and not s.slack_webhook_url:
        raise SettingsError(
            "ALERTMANAGER_SLACK_WEBHOOK_URL is not set: the alertmanager profile needs a Slack webhook"
        )


def hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode()


def _environment() -> jinja2.Environment:
    def load(name: str) -> str:
        try:
            return resources.read_text(name)
        except resources.MissingResource as exc:
            raise jinja2.TemplateNotFound(name, str(exc)) from None

    return jinja2.Environment(
        loader=jinja2.FunctionLoader(load),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # config files, not HTML; every value is validated above
    )


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o755)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    # World-readable on purpose: nginx's worker (uid 101), Grafana (472) and Prometheus
    # (nobody) read these from a volume the render container (uid 10001) wrote.
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def _render_tree(env: jinja2.Environment, name: str, out: Path, ctx: dict) -> list[Path]:
    """Render every *.j2 under the package directory ``name`` into out (suffix dropped); copy the rest."""
    written: list[Path] = []
    for rel, src in resources.walk(name):
        if rel.endswith(".j2"):
            written.append(_write(out / rel.removesuffix(".j2"), env.get_template(f"{name}/{rel}").render(ctx)))
        else:
            written.append(_write(out / rel, src.read_text(encoding="utf-8")))
    return written


def render_rules(grafana_url: str) -> str:
    """The shipped alert rules, their dashboard links pointing at ``grafana_url``."""
    return resources.read_text(resources.RULES).replace(GRAFANA_URL_PLACEHOLDER, grafana_url.rstrip("/"))


def render_stack(settings: StackSettings, out: Path) -> list[Path]:
    """Write the stack's configs under out/{nginx,prometheus,grafana,alertmanager}; return the files."""
    env = _environment()
    ctx = settings.template_context()
    htpasswd = f"{settings.flower_user}:{hash_password(settings.flower_password)}\n"
    written = [
        _write(out / "nginx" / "nginx.conf", env.get_template(resources.NGINX_TEMPLATE).render(ctx)),
        _write(out / "nginx" / "htpasswd", htpasswd),
        _write(out / "prometheus" / "prometheus.yml", env.get_template(resources.PROMETHEUS_TEMPLATE).render(ctx)),
        _write(out / "prometheus" / "rules" / RULES_FILE, render_rules(settings.grafana_url)),
    ]
    written += _render_tree(env, resources.GRAFANA_PROVISIONING, out / "grafana" / "provisioning", ctx)
    written += _render_tree(env, resources.GRAFANA_DASHBOARDS, out / "grafana" / "dashboards", ctx)
    if settings.alertmanager:
        am_out = out / "alertmanager"
        written.append(_write(am_out / "slack_webhook_url", settings.slack_webhook_url + "\n"))
        am_config = env.get_template(resources.ALERTMANAGER_TEMPLATE).render(ctx)
        written.append(_write(am_out / "alertmanager.yml", am_config))
    return written


@click.command("render")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write nginx/, prometheus/, grafana/ and alertmanager/ into.")
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
@click.option("--slack-webhook-url", envvar="ALERTMANAGER_SLACK_WEBHOOK_URL", default="", show_envvar=True,
              help="Alertmanager's Slack webhook (written to a file, not into alertmanager.yml).")
@click.option("--slack-channel", envvar="ALERTMANAGER_SLACK_CHANNEL", default="", show_envvar=True)
@click.option("--grafana-url", envvar="GRAFANA_ROOT_URL", default=DEFAULT_GRAFANA_URL, show_default=True,
              show_envvar=True,
              help="Where users open Grafana (the compose stack's Grafana root URL): the base of the "
                   "dashboard_url annotation of every Prometheus alert.")
def render_command(out: Path, allow_cidrs: str, flower_user: str, flower_password: str,
                   set_real_ip_from: str, listen: str, sidecar_addr: str, flower_addr: str,
                   grafana_addr: str, prometheus_addr: str, alertmanager_addr: str, resolver: str,
                   enable_prometheus_ui: bool, scrape_interval: str, rules_path: str,
                   enable_alertmanager: bool, slack_webhook_url: str, slack_channel: str,
                   grafana_url: str) -> None:
    """Render the monitoring stack's nginx, Prometheus, Grafana and Alertmanager configs."""
    try:
        settings = StackSettings(
            allow_cidrs=parse_cidrs(allow_cidrs, "ALLOW_CIDRS"),
            flower_user=flower_user,
            flower_password=flower_password,
            set_real_ip_from=parse_cidrs(set_real_ip_from, "SET_REAL_IP_FROM"),
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
        )
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        written = render_stack(settings, out)
    except (resources.MissingResource, jinja2.TemplateNotFound) as exc:
        raise click.ClickException(str(exc)) from None
    for path in written:
        click.echo(f"wrote {path}")


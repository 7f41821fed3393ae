"""`celery-sidecar render`: the stack's deployment configs from one set of settings.

One render produces everything the compose stack (and the native test harness) runs
from: the nginx config and its htpasswd, prometheus.yml and the alert rules (their
``dashboard_url`` links pointed at ``--grafana-url``), Grafana provisioning and dashboards
and, when the Alertmanager profile is on, alertmanager.yml. With ``--kubernetes`` it writes
Kubernetes manifests instead (sidecar/kubernetes.py), from the same rules and dashboards.
The templates, rules and dashboards are the package's own data (sidecar/resources.py),
so an installed wheel renders the stack without a source checkout. Only the click options
read the environment; the render itself takes a `StackSettings`.

Every problem with the settings is reported at once, in one message. The files holding a
secret (the htpasswd, Alertmanager's webhook) are written readable by their owner only,
unless the user who reads them is another one (``--share-secret-files``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import jinja2

from celery_sidecar import kubernetes, resources

log = logging.getLogger(__name__)

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

PLAIN_FILE_MODE = 0o644
# Secret-bearing files: the htpasswd's bcrypt hashes can be attacked offline, and the webhook
# URL is the credential itself.
SECRET_FILE_MODE = 0o600
# The compose stack's nginx workers (uid 101) and Alertmanager (nobody) read them from volumes
# that the render container (uid 10001) wrote and that only they mount.
SHARED_SECRET_FILE_MODE = 0o644


class SettingsError(ValueError):
    """Settings the stack cannot start with; each problem names its variable, never a secret."""

    def __init__(self, *problems: str) -> None:
        self.problems = problems
        if len(problems) == 1:
            message = problems[0]
        else:
            message = f"{len(problems)} settings are missing or invalid:\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(message)


def variable_of(problem: str) -> str:
    """The variable a problem names: each message starts with it."""
    return re.split(r"[\s:]", problem, maxsplit=1)[0]


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
    share_secret_files: bool = False  # another user reads htpasswd and the webhook file

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise SettingsError(*problems)

    @property
    def secret_file_mode(self) -> int:
        return SHARED_SECRET_FILE_MODE if self.share_secret_files else SECRET_FILE_MODE

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
    """Comma/space separated networks; a bare address means that one host.

    Raises SettingsError naming every item that is not a network."""
    networks: list[str] = []
    problems: list[str] = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f"; did you mean {ipaddress.ip_network(item, strict=False)}?"
            problems.append(f"{variable}: {item!r} is not a valid IP network ({exc}){hint}")
            continue
        networks.append(str(net))
    if problems:
        raise SettingsError(*problems)
    return tuple(networks)


def _problems(s: StackSettings) -> list[str]:
    """Everything wrong with ``s``, each naming its variable: one run says all there is to fix."""
    problems: list[str] = []
    if not s.allow_cidrs:
        problems.append(
            "ALLOW_CIDRS is empty: list the client networks allowed to reach the stack, e.g. "
            "ALLOW_CIDRS=10.0.0.0/8,192.168.1.0/24 (0.0.0.0/0,::/0 opens it to everyone)"
        )
    if not s.flower_user:
        problems.append("FLOWER_USER is not set: the basic-auth user for /flower/ is required")
    elif not _USER.match(s.flower_user):
        problems.append("FLOWER_USER may only contain letters, digits and . _ @ - (max 64)")
    if not s.flower_password:
        problems.append("FLOWER_PASSWORD is not set: there is no default password, choose one")
    elif any(c in s.flower_password for c in "\r\n\0"):
        problems.append("FLOWER_PASSWORD must not contain newlines or NUL bytes")
    if s.alertmanager and not s.slack_webhook_url:
        problems.append(
            "ALERTMANAGER_SLACK_WEBHOOK_URL is not set: the alertmanager profile needs a Slack webhook"
        )
    for name, value in (
        ("SIDECAR_ADDR", s.sidecar_addr),
        ("FLOWER_ADDR", s.flower_addr),
        ("GRAFANA_ADDR", s.grafana_addr),
        ("PROMETHEUS_ADDR", s.prometheus_addr),
        ("ALERTMANAGER_ADDR", s.alertmanager_addr),
    ):
        if not _ADDR.match(value):
            problems.append(f"{name}: {value!r} is not host:port")
    if not _LISTEN.match(s.listen):
        problems.append(f"LISTEN: {s.listen!r} is not PORT or ADDRESS:PORT")
    problems += link_and_scrape_problems(s.grafana_url, s.scrape_interval)
    if not _URL_PATH.match(s.prometheus_path):
        problems.append(f"PROMETHEUS_PATH: {s.prometheus_path!r} must look like /prometheus")
    try:
        ipaddress.ip_address(s.resolver)
    except ValueError:
        problems.append(f"RESOLVER: {s.resolver!r} is not an IP address")
    return problems


def link_and_scrape_problems(grafana_url: str, scrape_interval: str) -> list[str]:
    """The settings the compose stack and the Kubernetes manifests share: the alert rules'
    dashboard links and the scrape interval."""
    problems = []
    if not _DURATION.match(scrape_interval):
        problems.append(f"SCRAPE_INTERVAL: {scrape_interval!r} is not a duration like 15s")
    if "%(" in grafana_url:
        problems.append(
            f"GRAFANA_ROOT_URL: {grafana_url!r} uses Grafana's %(...)s placeholders; alert links need "
            "the URL users open, e.g. https://ops.example.com/grafana/"
        )
    elif not _GRAFANA_URL.match(grafana_url):
        problems.append(
            f"GRAFANA_ROOT_URL: {grafana_url!r} is not an http(s) URL like https://ops.example.com/grafana/"
        )
    return problems


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


def _write(path: Path, text: str, mode: int = PLAIN_FILE_MODE) -> Path:
    """Write ``path`` whole (a reader never sees half a file), with exactly ``mode``.

    The configs are world-readable on purpose: nginx's worker (uid 101), Grafana (472) and
    Prometheus (nobody) read them from a volume the render container (uid 10001) wrote.
    """
    # Every directory render creates is 0755, whatever the umask: mkdir -p would leave the
    # intermediate ones as the umask says (0777 under umask 0, writable by anyone).
    for directory in [*reversed(path.parents[1:]), path.parent]:
        if not directory.exists():
            directory.mkdir(exist_ok=True)
            directory.chmod(0o755)
    path.parent.chmod(0o755)
    tmp = path.with_name(f".{path.name}.tmp")
    # The mode is set before the first byte is written: a secret is never readable by others,
    # not even for a moment, whatever the umask or a leftover temp file's mode.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fd = -1
            f.write(text)
    finally:
        if fd != -1:
            os.close(fd)
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
        _write(out / "nginx" / "htpasswd", htpasswd, settings.secret_file_mode),
        _write(out / "prometheus" / "prometheus.yml", env.get_template(resources.PROMETHEUS_TEMPLATE).render(ctx)),
        _write(out / "prometheus" / "rules" / RULES_FILE, render_rules(settings.grafana_url)),
    ]
    written += _render_tree(env, resources.GRAFANA_PROVISIONING, out / "grafana" / "provisioning", ctx)
    written += _render_tree(env, resources.GRAFANA_DASHBOARDS, out / "grafana" / "dashboards", ctx)
    if settings.alertmanager:
        am_out = out / "alertmanager"
        written.append(_write(am_out / "slack_webhook_url", settings.slack_webhook_url + "\n",
                              settings.secret_file_mode))
        am_config = env.get_template(resources.ALERTMANAGER_TEMPLATE).render(ctx)
        written.append(_write(am_out / "alertmanager.yml", am_config))
    return written


def render_kubernetes(settings: kubernetes.KubernetesSettings, grafana_url: str, out: Path) -> list[Path]:
    """Write the manifests and their kustomization.yaml into out; return the files."""
    texts = kubernetes.manifests(settings, render_rules(grafana_url))
    return [_write(out / name, text) for name, text in texts.items()]

"""`celery-sidecar doctor`: check a deployed stack from outside, one line per check.

It reads the variables the stack itself is configured with (.env: NGINX_BIND/NGINX_PORT,
FLOWER_USER/FLOWER_PASSWORD, ENABLE_PROMETHEUS_UI, GRAFANA_ROOT_URL, GRAFANA_ADMIN_*,
SLACK_*), plus the addresses the stack does not publish (SIDECAR_URL, PROMETHEUS_URL), each
also a flag. Every check runs, whatever the others found, each request with a short
timeout; a check without what it needs is skipped, not failed. No secret is printed.

Exit codes (README, "Other commands"): 0 when no check failed (skipped ones included), 1
when one or more failed, 2 for a flag that cannot work (click's usage errors).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import click

if TYPE_CHECKING:
    from celery_sidecar.doctor_model import DoctorSettings

EXIT_OK, EXIT_FAILED = 0, 1
PROMETHEUS_PATH = "/prometheus"  # the stack's Prometheus serves under it (compose's --web.external-url)


def _default_nginx_url() -> str:
    """Where compose publishes nginx, from .env's NGINX_BIND and NGINX_PORT."""
    bind = os.environ.get("NGINX_BIND") or "127.0.0.1"
    if bind in ("0.0.0.0", "::", "[::]"):
        bind = "127.0.0.1"  # published on every address: this machine's loopback is one of them
    if ":" in bind and not bind.startswith("["):
        bind = f"[{bind}]"
    return f"http://{bind}:{os.environ.get('NGINX_PORT') or '8080'}"


def _url(value: str | None, flag: str) -> str | None:
    """An http(s) base URL without its trailing slash; host:port alone means http."""
    if not value or not value.strip():
        return None
    value = value.strip().rstrip("/")
    if "://" not in value:
        value = f"http://{value}"
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"{value!r} is not an http(s) URL", param_hint=flag)
    return value


def settings_from_flags(opts: dict) -> DoctorSettings:
    from celery_sidecar.doctor_model import DoctorSettings

    nginx_url = _url(opts["nginx_url"], "--nginx-url") or _default_nginx_url()
    prometheus_url = _url(opts["prometheus_url"], "--prometheus-url")
    if prometheus_url is None and opts["enable_prometheus_ui"]:
        prometheus_url = nginx_url + PROMETHEUS_PATH
    grafana_url = opts["grafana_url"]
    # Compose's own default for GF_SERVER_ROOT_URL uses Grafana's %(...)s placeholders: not a URL.
    if grafana_url and "%(" in grafana_url:
        grafana_url = None
    return DoctorSettings(
        nginx_url=nginx_url,
        flower_user=opts["flower_user"] or None,
        flower_password=opts["flower_password"] or None,
        sidecar_url=_url(opts["sidecar_url"], "--sidecar-url"),
        prometheus_url=prometheus_url,
        prometheus_via_nginx=bool(prometheus_url and prometheus_url.startswith(nginx_url + "/")),
        grafana_url=_url(grafana_url, "--grafana-url") or nginx_url + "/grafana",
        grafana_user=opts["grafana_user"] or "admin",
        grafana_password=opts["grafana_password"] or None,
        grafana_token=opts["grafana_token"] or None,
        slack_webhook_url=opts["slack_webhook_url"] or None,
        slack_bot_token=opts["slack_bot_token"] or None,
        slack_api_url=opts["slack_api_url"] or None,
        timeout=opts["timeout"],
        max_event_age=opts["max_event_age"],
    )


def _option(*decls: str, env: str, **kw: object) -> Callable:
    return click.option(*decls, envvar=env, show_envvar=True, **kw)  # type: ignore[arg-type]


OPTIONS = (
    _option("--nginx-url", env="NGINX_URL",
            help="The stack's nginx. Default: http://NGINX_BIND:NGINX_PORT (127.0.0.1 when it binds every "
                 "address; port 8080)."),
    _option("--flower-user", env="FLOWER_USER", help="The basic-auth login of /flower/ (and /prometheus/)."),
    _option("--flower-password", env="FLOWER_PASSWORD", help="Its password."),
    _option("--sidecar-url", env="SIDECAR_URL",
            help="The sidecar's own address (compose publishes none). Not given: its checks are skipped."),
    _option("--prometheus-url", env="PROMETHEUS_URL",
            help="Prometheus, with its path prefix (the stack's: http://HOST:9090/prometheus). Not given: "
                 "through nginx's /prometheus/ when ENABLE_PROMETHEUS_UI is on, else skipped."),
    _option("--enable-prometheus-ui/--no-enable-prometheus-ui", env="ENABLE_PROMETHEUS_UI", default=False,
            show_default=True, help="nginx routes /prometheus/ (as render was told)."),
    _option("--grafana-url", env="GRAFANA_ROOT_URL",
            help="Grafana as users open it. Default: the nginx URL's /grafana."),
    _option("--grafana-user", env="GRAFANA_ADMIN_USER", default="admin", show_default=True),
    _option("--grafana-password", env="GRAFANA_ADMIN_PASSWORD", help="Logs in through Grafana's login form."),
    _option("--grafana-token", env="GRAFANA_TOKEN", help="A Grafana service account token, instead of the password."),
    _option("--slack-webhook-url", env="SLACK_WEBHOOK_URL",
            help="Validated, never posted to (a webhook can only be tested by posting)."),
    _option("--slack-bot-token", env="SLACK_BOT_TOKEN", help="Checked with auth.test, which posts nothing."),
    _option("--slack-api-url", env="SLACK_API_URL", help="A Slack-compatible API base, as for `run`."),
    _option("--timeout", env="DOCTOR_TIMEOUT", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
            help="Seconds each request may take."),
    _option("--max-event-age", env="DOCTOR_MAX_EVENT_AGE", default=30.0, show_default=True,
            type=click.FloatRange(min=1), help="The sidecar's last event may be this many seconds old."),
)


def _with_options(command: Callable) -> Callable:
    for option in reversed(OPTIONS):
        command = option(command)
    return command


@click.command("doctor")
@_with_options
@click.pass_context
def doctor_command(ctx: click.Context, **opts: object) -> None:
    """Check a deployed stack from outside: nginx and its logins, Prometheus's targets and rules,
    the sidecar's health and event stream, Grafana's dashboards, Slack's credentials.

    Exits 0 when no check failed, 1 when one did, 2 for a bad flag."""
    # Imported here: the checks bring httpx and slack-sdk, which `run` does not need at start.
    from celery_sidecar.doctor_run import diagnose

    ctx.exit(EXIT_OK if diagnose(settings_from_flags(opts)) else EXIT_FAILED)

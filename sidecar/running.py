"""`celery-sidecar run` and `celery -A proj sidecar`: their flags, and starting the sidecar.

Both commands take the same flags, each also read from an environment variable. With a
Celery app (``--app``, or celery's own ``-A``) the app's settings are the defaults under them:
its broker and transport options unless given as flags, its queues, Beat entries and task
time limits under sidecar.yml (monitor/config/app_settings.py).

Exit codes (README, "Flags and environment variables"): 0 when stopped by a signal; 1 when
a file or the app cannot be used (the config file, --app, the port); 2 when a flag's value
cannot work (click's usage errors, and a broker URL the sidecar cannot read). A broker that
cannot be reached is no exit: the intake retries until it can.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from celery import Celery

from celery_sidecar.monitor.config.settings import ConfigError, load_config
from celery_sidecar.monitor.intake.broker_url import BrokerUrlError
from celery_sidecar.monitor.intake.broker_url import check as check_broker_url

log = logging.getLogger("celery_sidecar")


def broker_option(required: bool = True) -> Callable:
    return _option(
        "--broker-url", env="CELERY_BROKER_URL", required=required,
        help="Broker of the Celery app, e.g. redis://redis:6379/0 or amqp://user:pass@rabbit//; "
             "with an app, the app's broker unless given.",
    )


class WrongValue(click.ClickException):
    """A flag's (or its environment variable's) value cannot work: one line, exit code 2, as
    for click's own usage errors but without the usage text around it."""

    exit_code = 2


def _option(*decls: str, env: str, **kw: Any) -> Callable:
    return click.option(*decls, envvar=env, show_envvar=True, **kw)


class StaticLabel(click.ParamType):
    """``NAME=VALUE``, a label added to every series of /metrics. The environment variable
    holds several, separated by commas or spaces."""

    name = "NAME=VALUE"

    def split_envvar_value(self, rv: str) -> list[str]:
        return [item for item in re.split(r"[\s,]+", rv.strip()) if item]

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        name, sep, label_value = str(value).partition("=")
        if not sep:
            self.fail(f"{value!r} is not NAME=VALUE", param, ctx)
        from celery_sidecar.exporters.controls import check_static_labels

        try:
            check_static_labels([(name, label_value)])
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return name, label_value


def _state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "celery-sidecar"


def run_options(command: Callable) -> Callable:
    """Every flag of `run` except --broker-url and --app, for both commands."""
    # One flat list on purpose: it is the flags' reference, read top to bottom beside `--help`;
    # split into functions it would be as long and harder to scan.
    options = [
        _option("--config", "config_path", env="SIDECAR_CONFIG",
                type=click.Path(dir_okay=False, path_type=Path),
                help="YAML config (thresholds, alerts). Hot-reloaded."),
        _option("--bind", env="SIDECAR_BIND", default="127.0.0.1", show_default=True,
                help="Address for /metrics and /health. Use 0.0.0.0 in a container on a private network."),
        _option("--port", env="SIDECAR_PORT", default=9808, show_default=True, type=int),
        _option("--transport-options", env="SIDECAR_TRANSPORT_OPTIONS",
                help="broker_transport_options of the app as JSON (priority_steps, sep, global_keyprefix); "
                     "with an app, the app's unless given."),
        _option("--broker-use-ssl", env="SIDECAR_BROKER_USE_SSL",
                help="The app's broker_use_ssl as JSON: the broker's CA and a client certificate and key "
                     '(Redis: {"ssl_ca_certs": ..., "ssl_certfile": ..., "ssl_keyfile": ..., "ssl_cert_reqs": '
                     '"required"}; RabbitMQ: ca_certs, certfile, keyfile, cert_reqs); with an app, the app\'s unless '
                     "given."),
        _option("--fast-path/--no-fast-path", env="SIDECAR_FAST_PATH", default=True, show_default=True,
                help="Read Redis pub/sub or AMQP deliveries directly (much faster); --no-fast-path uses "
                     "EventReceiver."),
        _option("--event-queue-ttl", env="SIDECAR_EVENT_QUEUE_TTL", default=60.0, show_default=True,
                type=click.FloatRange(min=1),
                help="AMQP: seconds an event may wait in the sidecar's event queue before the broker drops it."),
        _option("--event-queue-max-bytes", env="SIDECAR_EVENT_QUEUE_MAX_BYTES", default=1 << 30,
                show_default="1 GiB, ~3 min at 10,000 events/s", type=click.IntRange(min=1 << 20),
                help="AMQP: broker memory the event queue may take; when full the oldest events go."),
        _option("--event-queue-expires", env="SIDECAR_EVENT_QUEUE_EXPIRES", default=300.0, show_default=True,
                type=click.FloatRange(min=1),
                help="AMQP: seconds after which the broker deletes an event queue nobody consumes."),
        _option("--enable-events", env="SIDECAR_ENABLE_EVENTS", is_flag=True,
                help="Ask workers that send no task events to enable them (remote control, as Flower does)."),
        _option("--probe-interval", env="SIDECAR_PROBE_INTERVAL", default=5.0, show_default=True,
                help="Seconds between queue length probes."),
        _option("--inspect-interval", env="SIDECAR_INSPECT_INTERVAL", default=30.0, show_default=True,
                help="Seconds between worker inspections (queues, pool size)."),
        _option("--probe-timeout", env="SIDECAR_PROBE_TIMEOUT", default=3.0, show_default=True,
                help="Timeout of each broker probe."),
        _option("--compat", env="SIDECAR_COMPAT", multiple=True, type=click.Choice(["ovalmoney"]),
                help="Also export another exporter's metric family."),
        _option("--namespace", env="SIDECAR_NAMESPACE", default="celery", show_default=True,
                help="namespace label of the ovalmoney family."),
        _option("--static-label", "static_labels", env="SIDECAR_STATIC_LABELS", multiple=True, type=StaticLabel(),
                help="A label on every series of /metrics, e.g. cluster=eu-1. Repeatable; the variable: "
                     "comma or space separated."),
        _option("--alerts/--no-alerts", env="SIDECAR_ALERTS", default=True, show_default=True,
                help="Run the alert engine (Slack, or the console when Slack is not configured)."),
        _option("--slack-webhook-url", env="SLACK_WEBHOOK_URL", help="Slack incoming webhook."),
        _option("--slack-bot-token", env="SLACK_BOT_TOKEN",
                help="Slack bot token (chat.postMessage; resolved alerts edit the original)."),
        _option("--slack-channel", env="SLACK_CHANNEL", help="Default channel for the bot token."),
        _option("--slack-api-url", env="SLACK_API_URL", help="Slack-compatible API base URL (proxies, tests)."),
        _option("--state-dir", env="SIDECAR_STATE_DIR", default=_state_dir,
                show_default="$XDG_STATE_HOME/celery-sidecar", type=click.Path(file_okay=False, path_type=Path),
                help="Where the alert outbox lives when the broker is not Redis."),
        _option("--instance-id", env="SIDECAR_INSTANCE_ID", default=lambda: f"{socket.gethostname()}:{os.getpid()}",
                show_default="host:pid", help="Unique name of this sidecar among redundant ones (alert claims)."),
        _option("--log-level", env="SIDECAR_LOG_LEVEL", default="info", show_default=True,
                type=click.Choice(["debug", "info", "warning", "error"])),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def start(app: Celery | None, broker_url: str | None, config_path: Path | None, log_level: str,
          **opts: Any) -> None:
    """Build the settings from flags (and the app's defaults under them) and serve until stopped."""
    from celery_sidecar.alerts.delivery.slack import SlackSettings
    from celery_sidecar.app import AppError, AppSettings, read
    from celery_sidecar.wiring import RunSettings

    setup_logging(log_level)
    config = load_or_exit(config_path)
    try:
        from_app = read(app) if app is not None else AppSettings(None)
    except AppError as exc:
        raise click.ClickException(str(exc)) from None
    broker_url = broker_url or from_app.broker_url
    if not broker_url:
        raise click.UsageError("no broker: give --broker-url (or CELERY_BROKER_URL), or an app that sets one")
    try:
        check_broker_url(broker_url)
    except BrokerUrlError as exc:
        raise WrongValue(str(exc)) from None
    transport_options = (parse_transport_options(opts["transport_options"]) if opts["transport_options"]
                         else from_app.transport_options)
    static_labels = _static_labels(opts["static_labels"])
    broker_use_ssl = (parse_broker_use_ssl(opts["broker_use_ssl"]) if opts["broker_use_ssl"]
                      else from_app.broker_use_ssl)
    if app is not None:
        log.info("settings from the Celery app %r: broker %s, %d queues, %d Beat entries, %d task time limits",
                 app.main, "from the app" if broker_url == from_app.broker_url else "from --broker-url",
                 len(from_app.defaults.queues), len(from_app.defaults.beat), len(from_app.defaults.time_limits))
    settings = RunSettings(
        broker_url=broker_url,
        bind=opts["bind"],
        port=opts["port"],
        config_path=config_path,
        transport_options=transport_options,
        broker_use_ssl=broker_use_ssl,
        app=from_app.defaults,
        fast_path=opts["fast_path"],
        enable_events=opts["enable_events"],
        probe_interval=opts["probe_interval"],
        inspect_interval=opts["inspect_interval"],
        probe_timeout=opts["probe_timeout"],
        compat=tuple(opts["compat"]),
        namespace=opts["namespace"],
        alerts=opts["alerts"],
        slack=SlackSettings(
            webhook_url=opts["slack_webhook_url"], bot_token=opts["slack_bot_token"],
            channel=opts["slack_channel"], base_url=opts["slack_api_url"],
        ),
        state_dir=opts["state_dir"],
        instance_id=opts["instance_id"],
        event_queue=_event_queue(opts["event_queue_ttl"], opts["event_queue_max_bytes"],
                                 opts["event_queue_expires"]),
        app_sent_event=bool(app.conf.task_send_sent_event) if app is not None else None,
        static_labels=static_labels,
    )
    serve(settings, config)


def _static_labels(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    from celery_sidecar.exporters.controls import check_static_labels

    try:
        return check_static_labels(pairs)  # each was checked alone; a name given twice is not
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--static-label / SIDECAR_STATIC_LABELS") from None


def _event_queue(ttl: float, max_bytes: int, expires: float):
    from celery_sidecar.monitor.intake.event_queue import EventQueue

    try:
        return EventQueue(ttl_seconds=ttl, max_bytes=max_bytes, expires_seconds=expires)
    except ValueError as exc:
        raise click.UsageError(f"--event-queue-*: {exc}") from None


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def parse_transport_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"must be a JSON object: {exc}", param_hint="--transport-options") from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"global_keyprefix\": \"app:\"}'",
                                 param_hint="--transport-options")
    return value


def parse_broker_use_ssl(text: str) -> dict:
    """--broker-use-ssl: a JSON object of the broker client's TLS options, cert_reqs as a word."""
    from celery_sidecar.monitor.intake.broker_ssl import normalize

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"must be a JSON object: {exc}", param_hint="--broker-use-ssl") from None
    if not isinstance(value, dict):
        raise click.BadParameter('must be a JSON object, e.g. \'{"ssl_ca_certs": "/etc/ssl/ca.pem"}\'',
                                 param_hint="--broker-use-ssl")
    try:
        return normalize(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker-use-ssl") from None


def load_or_exit(path: Path | None):
    """The config, or exit 1 with the reason: a refused file names the key and the problem; a
    file that cannot be read at all is one line."""
    try:
        return load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - whatever the file holds, one line and not a traceback
        raise click.ClickException(f"{path}: cannot be used as a config file: {type(exc).__name__}: {exc}") from None


def serve(settings, config) -> None:
    from celery_sidecar.wiring import Sidecar

    try:
        sidecar = Sidecar(settings, config)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sidecar.request_stop())
    sidecar.start()
    try:
        sidecar.wait()
    finally:
        log.info("stopping")
        sidecar.stop()



"""`celery-sidecar` command line. Every flag also reads an environment variable.

This is the only module that reads the environment (through click's ``envvar``);
everything below it receives typed settings.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import click

from celery_sidecar.monitor.config import ConfigError, load_config
from celery_sidecar.monitor.signals import thresholds
from celery_sidecar.render import render_command

log = logging.getLogger("celery_sidecar")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _transport_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"global_keyprefix\": \"app:\"}'")
    return value


def _load_or_exit(path: Path | None):
    try:
        return load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="celery-sidecar")
def main() -> None:
    """Monitoring and alerting sidecar for Celery: Prometheus metrics and Slack alerts."""


def broker_option(required: bool = True):
    return click.option(
        "--broker-url", envvar="CELERY_BROKER_URL", required=required, show_envvar=True,
        help="Broker of the Celery app, e.g. redis://redis:6379/0 or amqp://user:pass@rabbit//.",
    )


@main.command()
@broker_option()
@click.option("--config", "config_path", envvar="SIDECAR_CONFIG", show_envvar=True,
              type=click.Path(dir_okay=False, path_type=Path), help="YAML config (thresholds, alerts). Hot-reloaded.")
@click.option("--bind", envvar="SIDECAR_BIND", default="127.0.0.1", show_default=True, show_envvar=True,
              help="Address for /metrics and /health. Use 0.0.0.0 in a container on a private network.")
@click.option("--port", envvar="SIDECAR_PORT", default=9808, show_default=True, show_envvar=True, type=int)
@click.option("--transport-options", envvar="SIDECAR_TRANSPORT_OPTIONS", show_envvar=True,
              help="broker_transport_options of the app as JSON (priority_steps, sep, global_keyprefix).")
@click.option("--fast-path/--no-fast-path", envvar="SIDECAR_FAST_PATH", default=True, show_default=True,
              show_envvar=True, help="Read Redis pub/sub directly (much faster); --no-fast-path uses EventReceiver.")
@click.option("--enable-events", envvar="SIDECAR_ENABLE_EVENTS", is_flag=True, show_envvar=True,
              help="Ask workers that send no task events to enable them (remote control, as Flower does).")
@click.option("--probe-interval", envvar="SIDECAR_PROBE_INTERVAL", default=5.0, show_default=True,
              show_envvar=True, help="Seconds between queue length probes.")
@click.option("--inspect-interval", envvar="SIDECAR_INSPECT_INTERVAL", default=30.0, show_default=True,
              show_envvar=True, help="Seconds between worker inspections (queues, pool size).")
@click.option("--probe-timeout", envvar="SIDECAR_PROBE_TIMEOUT", default=3.0, show_default=True,
              show_envvar=True, help="Timeout of each broker probe.")
@click.option("--compat", envvar="SIDECAR_COMPAT", multiple=True, type=click.Choice(["ovalmoney"]),
              show_envvar=True, help="Also export another exporter's metric family.")
@click.option("--namespace", envvar="SIDECAR_NAMESPACE", default="celery", show_default=True, show_envvar=True,
              help="namespace label of the ovalmoney family.")
@click.option("--alerts/--no-alerts", envvar="SIDECAR_ALERTS", default=True, show_default=True, show_envvar=True,
              help="Run the alert engine (Slack, or the console when Slack is not configured).")
@click.option("--slack-webhook-url", envvar="SLACK_WEBHOOK_URL", show_envvar=True, help="Slack incoming webhook.")
@click.option("--slack-bot-token", envvar="SLACK_BOT_TOKEN", show_envvar=True,
              help="Slack bot token (chat.postMessage; resolved alerts edit the original).")
@click.option("--slack-channel", envvar="SLACK_CHANNEL", show_envvar=True, help="Default channel for the bot token.")
@click.option("--slack-api-url", envvar="SLACK_API_URL", show_envvar=True,
              help="Slack-compatible API base URL (proxies, tests).")
@click.option("--state-dir", envvar="SIDECAR_STATE_DIR", show_envvar=True,
              default=lambda: Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
              / "celery-sidecar", show_default="$XDG_STATE_HOME/celery-sidecar",
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the alert outbox lives when the broker is not Redis.")
@click.option("--instance-id", envvar="SIDECAR_INSTANCE_ID", default=lambda: f"{socket.gethostname()}:{os.getpid()}",
              show_default="host:pid", show_envvar=True,
              help="Unique name of this sidecar among redundant ones (alert claims).")
@click.option("--log-level", envvar="SIDECAR_LOG_LEVEL", default="info", show_default=True, show_envvar=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def run(broker_url: str, config_path: Path | None, log_level: str, **opts) -> None:
    """Consume events, serve /metrics and /health, send alerts."""
    from celery_sidecar.alerts.slack import SlackSettings
    from celery_sidecar.wiring import RunSettings

    _setup_logging(log_level)
    config = _load_or_exit(config_path)
    settings = RunSettings(
        broker_url=broker_url,
        bind=opts["bind"],
        port=opts["port"],
        config_path=config_path,
        transport_options=_transport_options(opts["transport_options"]),
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
    )
    serve(settings, config)


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


@main.group()
def config() -> None:
    """Work with the config file."""


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--slack-webhook-url", envvar="SLACK_WEBHOOK_URL", show_envvar=True,
              help="Also validate this webhook URL.")
def config_check(file: Path, slack_webhook_url: str | None) -> None:
    """Validate FILE and print the effective thresholds."""
    from celery_sidecar.alerts.blocks import check_templates
    from celery_sidecar.alerts.slack import validate_webhook_url

    cfg = _load_or_exit(file)
    try:
        check_templates(cfg.alerts)
        if slack_webhook_url:
            validate_webhook_url(slack_webhook_url)
    except ValueError as exc:
        raise click.ClickException(f"{file}: {exc}") from None
    click.echo(f"{file}: OK\n\nEffective thresholds:")
    click.echo(f"  {'signal':<24}{'level':<10}{'queue':<16}value")
    for row in thresholds(cfg):
        click.echo(f"  {row.signal:<24}{row.level:<10}{row.queue_name:<16}{row.value:g}")
    if cfg.heavy_tasks or cfg.heavy_queues:
        heavy_tasks, heavy_queues = ", ".join(cfg.heavy_tasks) or "-", ", ".join(cfg.heavy_queues) or "-"
        click.echo(f"\nHeavy tasks: {heavy_tasks}; heavy queues: {heavy_queues}")


@config.command("example")
def config_example() -> None:
    """Print a sidecar.yml holding every documented default, with a comment on each key."""
    from celery_sidecar import resources

    click.echo(resources.read_text(resources.DEFAULT_CONFIG), nl=False)


@main.command()
@click.option("--broker-url", envvar="CELERY_BROKER_URL", show_envvar=True,
              help="Use this broker instead of starting a private Redis.")
@click.option("--port", envvar="SIDECAR_PORT", default=9808, show_default=True, show_envvar=True, type=int,
              help="Port for /metrics (0 picks a free one).")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: until Ctrl-C).")
@click.option("--config", "config_path", envvar="SIDECAR_CONFIG", show_envvar=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Config file (default: the documented defaults).")
@click.option("--rate", type=float, default=5.0, show_default=True, help="Demo tasks sent per second.")
@click.option("--no-summary", is_flag=True, help="Do not draw the live terminal summary.")
def demo(**opts) -> None:
    """Run a private Redis, a demo worker and producer, and the sidecar; show a live summary."""
    from celery_sidecar.demo import Demo

    _setup_logging("warning")
    Demo(**opts).run()


main.add_command(render_command, "render")

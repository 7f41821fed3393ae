"""`celery-sidecar` command line: run, config, render, doctor, demo.

Every flag also reads an environment variable, through click's ``envvar``: the flags of
``run`` live in running.py (shared with ``celery -A proj sidecar``), render's in render.py.
The shell is the only part that reads the environment; everything below it receives typed
settings.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from celery_sidecar.doctor import doctor_command
from celery_sidecar.monitor.signals import thresholds
from celery_sidecar.render_cli import render_command
from celery_sidecar.running import broker_option, load_or_exit, run_options, setup_logging, start

log = logging.getLogger("celery_sidecar")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="celery-sidecar")
def main() -> None:
    """Monitoring and alerting sidecar for Celery: Prometheus metrics and Slack alerts."""


@main.command()
@click.option("--app", "app_spec", envvar="SIDECAR_APP", show_envvar=True,
              help="The Celery app, as for celery -A (proj, proj.celery:app): its broker, queues, "
                   "beat_schedule and task time limits become the defaults; flags and sidecar.yml win.")
@broker_option(required=False)
@run_options
def run(app_spec: str | None, broker_url: str | None, **opts) -> None:
    """Consume events, serve /metrics and /health, send alerts."""
    from celery_sidecar.app import AppError, load_app

    app = None
    if app_spec:
        try:
            app = load_app(app_spec)
        except AppError as exc:
            raise click.ClickException(str(exc)) from None
    start(app, broker_url, **opts)


@main.group()
def config() -> None:
    """Work with the config file."""


@config.command("check")
# Any path: what cannot be read as a config file (a directory, a FIFO, bytes that are not
# UTF-8) is refused by the loader in one line, as the hot reload refuses it.
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--slack-webhook-url", envvar="SLACK_WEBHOOK_URL", show_envvar=True,
              help="Also validate this webhook URL.")
def config_check(file: Path, slack_webhook_url: str | None) -> None:
    """Validate FILE and print the effective thresholds. `celery-sidecar config example`
    prints every key, with a comment on each."""
    from celery_sidecar.alerts.delivery.blocks import check_templates
    from celery_sidecar.alerts.delivery.slack import validate_webhook_url
    from celery_sidecar.exporters.controls import check_controls

    cfg = load_or_exit(file)
    try:
        check_controls(cfg)
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

    setup_logging("warning")
    Demo(**opts).run()


main.add_command(render_command, "render")
main.add_command(doctor_command, "doctor")

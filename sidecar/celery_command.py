"""``celery -A proj sidecar``: the sidecar as a celery subcommand, as ``celery -A proj flower``.

Registered through the ``celery.commands`` entry point (pyproject.toml). Celery loads the
app (``-A``) before this command runs, so an app that fails to import is reported by
celery itself; ``celery-sidecar run --app proj`` reports it in one line instead.
"""

from __future__ import annotations

import click
from celery.bin.base import CeleryCommand

from celery_sidecar.running import broker_option, run_options, start


@click.command(cls=CeleryCommand)
@broker_option(required=False)
@run_options
@click.pass_context
def sidecar(ctx: click.Context, broker_url: str | None, **opts) -> None:
    """Run celery-sidecar next to this app: its broker, queues, Beat schedule and time limits
    are the defaults; flags and sidecar.yml override them."""
    start(ctx.obj.app, broker_url, **opts)

"""`python -m monitor` runs the celery-sidecar CLI."""

from monitor.cli import main

main(prog_name="celery-sidecar")

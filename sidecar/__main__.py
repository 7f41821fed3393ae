"""`python -m celery_sidecar` runs the celery-sidecar CLI."""

from celery_sidecar.cli import main

main(prog_name="celery-sidecar")

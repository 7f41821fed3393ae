"""Where the tests find things, so the suite runs the same from a checkout and from the
copy that scripts/test runs against the installed wheel.

- ``SUITE``: the directory holding ``tests/``. scripts/test runs pytest from a scratch
  copy holding nothing else, so the source tree is never on sys.path: ``celery_sidecar``
  can only be the installed package. Child processes get only this on PYTHONPATH, so a
  worker can import the test apps in ``tests.support``.
- ``SOURCE``: the source checkout, for what is not package data (README, docs,
  docker-compose.monitoring.yml, Dockerfile): ``$SIDECAR_SOURCE``, else ``SUITE``.
- ``ARTIFACTS``: logs and screenshots kept after a run (``$SIDECAR_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
from pathlib import Path

SUITE = Path(__file__).resolve().parents[2]
SOURCE = Path(os.environ.get("SIDECAR_SOURCE") or SUITE)
ARTIFACTS = Path(os.environ.get("SIDECAR_TEST_ARTIFACTS") or SUITE / "tests" / "artifacts")

# How the tests start the sidecar: the installed package, never a source file.
SIDECAR = ("-m", "celery_sidecar")


def child_env(**extra: str) -> dict[str, str]:
    """A child's environment: none of the developer's Slack/sidecar/Celery settings leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "SIDECAR_", "CELERY_"))}
    env["PYTHONPATH"] = str(SUITE)
    env.update(extra)
    return env


def package_file(name: str) -> Path:
    """A file of the installed package's data, as a real path (for promtool, nginx...).

    ``name`` is as in celery_sidecar.resources: ``alerts/prometheus/rules.yml``.
    """
    from celery_sidecar import resources

    path = Path(str(resources.resource(name)))
    assert path.exists(), f"{name} is not a plain file of the installed package: {path}"
    return path

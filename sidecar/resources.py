"""The package data the stack is built from: nginx and Prometheus templates, alert rules and
their tests, Grafana provisioning and dashboards, the default sidecar.yml.

Everything is read through ``importlib.resources``, so it is found wherever the package
is installed (a wheel in site-packages, a zip, an editable checkout), never relative to a
source tree. A missing file is an error that names it, never a silent skip.

Names are ``<part>/<path>``: ``nginx/nginx.conf.j2``, ``alerts/prometheus/rules.yml``,
``grafana/dashboards``, ``defaults/sidecar.yml``; ``<part>`` is a celery_sidecar subpackage.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.resources import files
from importlib.resources.abc import Traversable

NGINX_TEMPLATE = "nginx/nginx.conf.j2"
PROMETHEUS_TEMPLATE = "alerts/prometheus/prometheus.yml.j2"
ALERTMANAGER_TEMPLATE = "alerts/prometheus/alertmanager.yml.j2"
RULES = "alerts/prometheus/rules.yml"
RULES_TEST = "alerts/prometheus/tests/rules_test.yml"
GRAFANA_PROVISIONING = "grafana/provisioning"
GRAFANA_DASHBOARDS = "grafana/dashboards"
DEFAULT_CONFIG = "defaults/sidecar.yml"


class MissingResource(FileNotFoundError):
    """A file the package should carry is not there: a broken install."""


def resource(name: str) -> Traversable:
    part, _, path = name.partition("/")
    try:
        found = files(f"celery_sidecar.{part}").joinpath(path)
    except ModuleNotFoundError:
        found = None
    if found is None or not (found.is_file() or found.is_dir()):
        raise MissingResource(
            f"celery-sidecar's package data has no {name!r}: the installation is incomplete "
            "(reinstall the package; a source checkout needs `pip install .` or `pip install -e .`)"
        )
    return found


def read_text(name: str) -> str:
    return resource(name).read_text(encoding="utf-8")


def walk(name: str) -> Iterator[tuple[str, Traversable]]:
    """(path relative to ``name``, file) for every file under the directory ``name``, sorted."""

    def visit(prefix: str, node: Traversable) -> Iterator[tuple[str, Traversable]]:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.name == "__pycache__":
                continue
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                yield from visit(rel + "/", child)
            else:
                yield rel, child

    yield from visit("", resource(name))

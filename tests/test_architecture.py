"""The data path runs one way, and the imports show it.

intake → boundary → fold → read API → {exporters, alert engine → delivery}, with the app
shell (CLI, wiring, demo, render) above everything. Checked on the installed package's
source, sub-packages included: an import that points the wrong way fails here, before it
tangles the layers. Only imports that run count: ``if TYPE_CHECKING:`` blocks are
annotations, not dependencies.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

import celery_sidecar
from tests.support.paths import SOURCE

PACKAGE = Path(celery_sidecar.__file__).parent  # the shell's own modules
LAYERS = ("monitor", "exporters", "alerts")
DATA = ("grafana", "nginx", "defaults")

# layer -> the layers it may import from (the shell is everything not in a layer)
ALLOWED = {
    "monitor": set(),
    "exporters": {"monitor"},
    "alerts": {"monitor"},
}

# Inside monitor/: stage -> the stages it may import. The boundary, the signal table and
# config are leaves (config reads the signal table's rule defaults, and the signal table
# imports nothing at run time); the fold applies checked fields under config; intakes feed
# the fold; the read API (view, sinks, advice) reads the fold.
MONITOR_STAGES = {
    "boundary": set(),
    "signals": set(),
    "config": {"signals"},
    "fold": {"boundary", "config", "signals"},
    "intake": {"boundary", "config", "fold"},
    "read": {"fold", "config", "signals"},
}
# What exporters/ and alerts/ may see of monitor/: the read API and config, never the inside.
MONITOR_PUBLIC = {"read", "signals", "config"}

# Inside alerts/: delivery (how an alert reaches Slack) knows nothing of when alerts fire.
ALERT_STAGES = {
    "model": set(),
    "delivery": {"model"},
    "rules": {"model"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "celery_sidecar":
        return "external"
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    if len(parts) > 1 and parts[1] in DATA:
        return "data"
    return "shell"


def monitor_stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["celery_sidecar", "monitor"] or len(parts) < 3:
        return None
    if parts[2] in ("intake", "boundary", "fold", "config", "signals"):
        return parts[2]
    return "read"  # view, sinks, advice: monitor's top


def alert_stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["celery_sidecar", "alerts"] or len(parts) < 3:
        return None
    if parts[2] in ("delivery", "model"):
        return parts[2]
    return "rules"  # engine, stuck_lost, beat_alerts: when an alert fires


def modules() -> dict[str, Path]:
    """Every module of the package, sub-packages included, by name."""
    found = {}
    for package in ("celery_sidecar", *(f"celery_sidecar.{p}" for p in (*LAYERS, *DATA))):
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.origin, package
        root = Path(spec.origin).parent
        paths = root.glob("*.py") if package == "celery_sidecar" else root.rglob("*.py")
        for path in sorted(paths):
            rel = path.relative_to(root).with_suffix("").parts
            name = ".".join((package, *rel))
            found[name.removesuffix(".__init__")] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node, except what sits under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(path: Path, known: dict[str, Path] | None = None) -> set[str]:
    """The modules ``path`` imports at run time (any package)."""
    known = modules() if known is None else known
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import of {node.module}"
            names.add(node.module)
            # `from celery_sidecar import resources` imports a module, not a name.
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in known)
    return names


def arrows() -> list[tuple[str, str]]:
    known = modules()
    return [(module, target) for module, path in known.items()
            for target in sorted(imports_of(path, known)) if target.startswith("celery_sidecar")]


def runs_wrong_way(module: str, target: str) -> bool:
    """Whether an import runs against the data path: between layers, inside monitor/ and
    alerts/, or from exporters/ and alerts/ into monitor's inside."""
    source, dest = layer_of(module), layer_of(target)
    if source not in LAYERS:
        return False
    if dest == "data":  # package data is read through resources, by the shell
        return True
    if dest not in ALLOWED[source] | {source, "external"}:
        return True
    if source == dest == "monitor":
        a, b = monitor_stage(module), monitor_stage(target)
        return bool(a and b and a != b and b not in MONITOR_STAGES[a])
    if source == dest == "alerts":
        a, b = alert_stage(module), alert_stage(target)
        return bool(a and b and a != b and b not in ALERT_STAGES[a])
    return dest == "monitor" and monitor_stage(target) not in MONITOR_PUBLIC


def wrong_way(edges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(module, target) for module, target in edges if runs_wrong_way(module, target)]


def test_the_package_has_the_three_layers_and_the_shell():
    layers = {layer_of(m) for m in modules()}
    assert {"monitor", "exporters", "alerts", "shell"} <= layers


def test_monitor_is_laid_out_along_the_data_path():
    stages = {monitor_stage(m) for m in modules()} - {None}
    assert stages == set(MONITOR_STAGES)
    assert {alert_stage(m) for m in modules()} - {None} == set(ALERT_STAGES)


def test_every_import_runs_with_the_data_path():
    assert wrong_way(arrows()) == []


@pytest.mark.parametrize("edge", [
    ("celery_sidecar.monitor.fold.state", "celery_sidecar.monitor.intake.probes"),  # the fold reaching up
    ("celery_sidecar.monitor.boundary.parse", "celery_sidecar.monitor.fold.records"),  # a leaf with a dependency
    ("celery_sidecar.monitor.config.settings", "celery_sidecar.monitor.view"),
    ("celery_sidecar.monitor.fold.pipeline", "celery_sidecar.monitor.sinks"),  # the fold reading its readers
    ("celery_sidecar.exporters.collectors", "celery_sidecar.monitor.fold.state"),  # past the read API
    ("celery_sidecar.exporters.collectors", "celery_sidecar.alerts.engine"),
    ("celery_sidecar.monitor.view", "celery_sidecar.exporters.http"),
    ("celery_sidecar.alerts.delivery.slack", "celery_sidecar.alerts.engine"),
    ("celery_sidecar.monitor.view", "celery_sidecar.wiring"),
])
def test_the_check_catches_an_import_against_the_order(edge):
    assert wrong_way([edge]) == [edge]


def test_nothing_below_the_shell_imports_the_shell():
    wrong = [(m, t) for m, t in arrows() if layer_of(m) in LAYERS and layer_of(t) == "shell"]
    assert wrong == []


GENERATOR = {f"celery_sidecar.grafana.{m}"
             for m in ("dashboards", "panels", "overview", "queues", "sidecar_row", "task_dashboard")}


def test_the_dashboard_generator_is_build_time_code_nothing_imports():
    """grafana/ builds the shipped JSON with grafana-foundation-sdk, a build extra: it may read
    the signal table and config, and nothing in the package may import it or the SDK."""
    assert set(modules()) >= GENERATOR
    importers = [(m, t) for m, t in arrows() if t in GENERATOR and m not in GENERATOR]
    assert importers == []
    assert {monitor_stage(t) or layer_of(t) for m, t in arrows() if m in GENERATOR and t not in GENERATOR} <= {
        "signals", "config"}
    sdk_users = [m for m, path in modules().items()
                 if m not in GENERATOR and "grafana_foundation_sdk" in path.read_text()]
    assert sdk_users == [], "grafana-foundation-sdk is not a runtime dependency"


def test_exporters_and_alerts_read_state_only_through_the_view():
    """No raw State fields or pipeline.lock outside monitor/: the read API is the snapshot."""
    offenders = []
    for module, path in modules().items():
        if layer_of(module) not in ("exporters", "alerts"):
            continue
        text = path.read_text()
        for pattern in (r"\.lock\b", r"\bstate\.(workers|tasks|counters|\w+_fold)\b", r"import State\b"):
            if re.search(pattern, text):
                offenders.append((module, pattern))
    assert offenders == []


# The worker plugin runs inside the user's worker: the standard library, celery (and what
# celery itself imports) and psutil, nothing else.
PLUGIN_MAY_IMPORT = {"celery", "kombu", "psutil"}


def third_party(names: set[str]) -> set[str]:
    tops = {name.split(".")[0] for name in names}
    return {t for t in tops if t not in sys.stdlib_module_names and t != "__future__"}


def test_the_plugin_imports_only_celery_psutil_and_the_standard_library():
    imported = imports_of(PACKAGE / "plugin.py")
    assert third_party(imported) <= PLUGIN_MAY_IMPORT, third_party(imported) - PLUGIN_MAY_IMPORT
    assert not any(n.startswith("celery_sidecar") for n in imported)


def test_the_plugin_check_would_catch_a_heavier_import(tmp_path):
    plugin = tmp_path / "plugin.py"
    plugin.write_text((PACKAGE / "plugin.py").read_text() + "\nimport requests\nfrom yaml import safe_load\n")
    assert third_party(imports_of(plugin)) - PLUGIN_MAY_IMPORT == {"requests", "yaml"}


def test_the_architecture_doc_names_real_files():
    doc = (SOURCE / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"\b((?:monitor|exporters|alerts|celery_sidecar|grafana)/[\w/]+\.py)\b", doc))
    assert len(named) >= 15, named
    missing = sorted(p for p in named if not (SOURCE / p).exists())
    assert missing == [], f"docs/architecture.md names files that do not exist: {missing}"

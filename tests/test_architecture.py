"""The data path runs one way, and the imports show it.

intake → fold → read API → {exporters, alert engine → delivery}, with the app shell (CLI,
wiring, demo, render) above everything. Checked on the installed package's source: an
import that points the wrong way fails here, before it tangles the layers.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

import celery_sidecar
from tests.support.paths import SOURCE

PACKAGE = Path(celery_sidecar.__file__).parent  # the shell's own modules
LAYERS = ("monitor", "exporters", "alerts")

# layer -> the layers it may import from (the shell is everything not in a layer)
ALLOWED = {
    "monitor": set(),
    "exporters": {"monitor"},
    "alerts": {"monitor"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "celery_sidecar":
        return "external"
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    if len(parts) > 1 and parts[1] in ("grafana", "nginx", "defaults"):
        return "data"
    return "shell"


def modules() -> dict[str, Path]:
    """Every module of the package, by name (wherever each subpackage's files live)."""
    found = {}
    for package in ("celery_sidecar", *(f"celery_sidecar.{p}" for p in (*LAYERS, "grafana", "nginx", "defaults"))):
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.origin, package
        for path in sorted(Path(spec.origin).parent.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import of {node.module}"
            names.add(node.module)
            # `from celery_sidecar import resources` imports a module, not a name.
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in modules())
    return {n for n in names if n.startswith("celery_sidecar")}


def arrows() -> list[tuple[str, str]]:
    return [(module, target) for module, path in modules().items() for target in sorted(imports_of(path))]


def test_the_package_has_the_three_layers_and_the_shell():
    layers = {layer_of(m) for m in modules()}
    assert {"monitor", "exporters", "alerts", "shell"} <= layers


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer):
    wrong = [(m, t) for m, t in arrows() if layer_of(m) == layer
             and layer_of(t) not in ALLOWED[layer] | {layer, "external"}]
    assert wrong == [], f"{layer} imports what it must not: {wrong}"


def test_nothing_below_the_shell_imports_the_shell():
    wrong = [(m, t) for m, t in arrows() if layer_of(m) in LAYERS and layer_of(t) == "shell"]
    assert wrong == []


def test_the_dashboard_generator_is_build_time_code_nothing_imports():
    """grafana/dashboards.py builds the shipped JSON with grafana-foundation-sdk, a build extra:
    it may read the signal table, and nothing in the package may import it or the SDK."""
    generator = "celery_sidecar.grafana.dashboards"
    assert generator in modules()
    importers = [(m, t) for m, t in arrows() if t.startswith("celery_sidecar.grafana") and layer_of(m) != "data"]
    assert importers == []
    assert {layer_of(t) for m, t in arrows() if m == generator} <= {"monitor"}
    sdk_users = [m for m, path in modules().items() if m != generator and "grafana_foundation_sdk" in path.read_text()]
    assert sdk_users == [], "grafana-foundation-sdk is not a runtime dependency"


def test_exporters_and_alerts_read_state_only_through_the_view():
    """No raw State fields or pipeline.lock outside monitor/: the read API is the snapshot."""
    offenders = []
    for module, path in modules().items():
        if layer_of(module) not in ("exporters", "alerts"):
            continue
        text = path.read_text()
        for pattern in (r"\.lock\b", r"\bstate\.(workers|tasks|counters|retry_windows|latency_windows)\b",
                        r"import State\b"):
            if re.search(pattern, text):
                offenders.append((module, pattern))
    assert offenders == []


def test_the_plugin_imports_nothing_heavier_than_celery_and_psutil():
    """It runs inside the user's worker."""
    assert imports_of(PACKAGE / "plugin.py") == set()


def test_the_architecture_doc_names_real_files():
    doc = (SOURCE / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"\b((?:monitor|exporters|alerts|celery_sidecar|grafana)/[\w/]+\.py)\b", doc))
    assert len(named) >= 15, named
    missing = sorted(p for p in named if not (SOURCE / p).exists())
    assert missing == [], f"docs/architecture.md names files that do not exist: {missing}"

"""Rendering the Kubernetes manifests in tests, and reading them back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from celery_sidecar.render_cli import render_command

# Every optional object on, and names that are not the defaults.
ALL_OPTIONS = ("--ha", "--network-policy", "--monitor", "service", "--prometheus-label", "release=kps",
               "--prometheus-label", "team=ops", "--scale-queue", "celery=worker",
               "--scale-queue", "reports.Heavy=report-worker", "--namespace", "shop",
               "--dashboard-namespace", "monitoring", "--broker-tls-secret", "shop-broker-tls")

# kubectl apply (client side) keeps the whole object in this annotation; the API server refuses
# more than this many bytes of annotations, keys included.
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
ANNOTATIONS_LIMIT = 262_144


def render(out: Path, *args: str, env: dict[str, str] | None = None):
    # None of the developer's render or Kubernetes settings leak in.
    clean = {k: None for k in os.environ if k.startswith(("K8S_", "RENDER_", "SIDECAR_", "GRAFANA_", "SCRAPE_"))}
    return CliRunner().invoke(render_command, ["--kubernetes", "--out", str(out), *args],
                              env={**clean, **(env or {})})


# libyaml's loader when there is one: the dashboards are 100 KB strings each.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(out: Path) -> dict[str, dict[str, Any]]:
    """Every rendered file but kustomization.yaml, parsed, by file name."""
    return {p.name: yaml.load(p.read_text(), Loader=LOADER) for p in sorted(out.glob("*.yaml"))
            if p.name != "kustomization.yaml"}


def one(objects: dict[str, dict], kind: str) -> dict:
    (found,) = [o for o in objects.values() if o["kind"] == kind]
    return found


def rendered_with(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "out"
    result = render(out, *args)
    assert result.exit_code == 0, result.output
    return out


def go_json(obj: Any) -> str:
    """JSON as kubectl's Go encoder writes it: keys sorted, compact, <>& escaped, newline at the end."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text + "\n"


def annotations_after_apply(obj: dict) -> int:
    """Bytes of annotations once `kubectl apply` has stored the object in its last-applied one."""
    annotations = {**(obj["metadata"].get("annotations") or {}), LAST_APPLIED: go_json(obj)}
    return sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())

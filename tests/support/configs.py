"""The sidecar.yml a test runs with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def write_config(path: Path, alerts: dict[str, Any] | None = None, **top: Any) -> Path:
    """Write a sidecar.yml at ``path`` with ``alerts`` as its alerts section and ``top`` as the
    other top-level keys (``queues=[...]``, ``thresholds={...}``); return ``path``.

    Writing it again is an edit the running sidecar hot-reloads: the file is replaced whole,
    so the sidecar never reads half of it.
    """
    settings = {**top, "alerts": alerts} if alerts is not None else top
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(yaml.safe_dump(settings))
    partial.replace(path)
    return path

"""The Grafana dashboards, as code, built with Grafana's own SDK (grafana-foundation-sdk).

Build-time only: ``scripts/generate`` writes what ``dashboards()`` returns to
grafana/dashboards/*.json, the JSON is committed and shipped as package data, and
tests/test_dashboards.py fails when the committed files differ from a fresh build. Nothing
imports the generator (this module and the rest of grafana/) at run time,
and the SDK is the ``dashboards`` extra, not a dependency.
The SDK release is pinned (pyproject.toml) to the Grafana version docker-compose runs, so the
builders and the model round trip follow that version's schema.

Two dashboards, in the mixin convention (an overview and a drill-down):

- ``celery-sidecar.json`` (uid ``celery-sidecar``, the stack's home dashboard): the whole
  system. Counters for the selected range, throughput by state, task and queue, queue wait p95
  against the latency thresholds, runtime p95 and the runtime / queue-wait distributions, queue
  length against its thresholds, workers and pool processes per queue, where tasks are (the age
  of each queue's oldest waiting task against the latency thresholds, running and stuck tasks,
  lost and redelivered ones, Redis's unacknowledged messages), retry ratio against its limit,
  workers up/down, pool utilization, CPU / memory against their limits, RSS, the top tasks and
  exceptions (a task name opens the per-task dashboard), the periodic tasks (Beat entries: last
  run, next due, misses, lateness) and the sidecar's own health, with how complete the event
  stream is (the share of task events missed against its limit, end events never seen).
- ``celery-sidecar-task.json`` (uid ``celery-sidecar-task``): one task name. Counters, running /
  stuck / oldest running, lost and redelivered, throughput by state, failures by exception,
  runtime p50/p95/p99, queue wait against the latency threshold of the task's class (normal or
  heavy, from ``celery_task_class``), retry ratio against its limit, and the workers that run it.

Every threshold line is a ``celery_threshold`` query built from a row of the signal table
(monitor/signals.py, ``panels.threshold_expr``), never typed here, so the graphs compare against
exactly what the alerts compare against, and follow an edit of sidecar.yml. Every other series is
taken once however many sidecars export it (``panels.dedup``: ``max by`` the family's own labels),
so two sidecars scraped by one Prometheus show what one shows (docs/deploy.md, "HA: two sidecars").

Each dashboard (overview.py, task_dashboard.py) is its header (uid, links, variables) and then
its rows, one function per row (``_overview_*_row``, ``_task_*_row``; the overview's queue rows
in queues.py and its sidecar row in sidecar_row.py) returning the row and its panels.
``assemble`` adds them in
that order and the SDK places each panel from that order alone, so the order of the rows, and of
the panels in a row, is the layout.
"""

from __future__ import annotations

import json

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model

from celery_sidecar.grafana.overview import overview
from celery_sidecar.grafana.panels import OVERVIEW_FILE, TASK_FILE
from celery_sidecar.grafana.task_dashboard import task_dashboard


def to_json(dashboard_model: model.Dashboard) -> str:
    """The file's text: the SDK's own serialisation, keys sorted, two-space indent."""
    return json.dumps(dashboard_model, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def dashboards() -> dict[str, str]:
    """{file name under grafana/dashboards/: JSON text} for every shipped dashboard."""
    return {OVERVIEW_FILE: to_json(overview()), TASK_FILE: to_json(task_dashboard())}

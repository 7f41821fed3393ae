"""celery-sidecar: monitoring and alerting for any Celery app, from its event stream.

The package is one namespace built from the repo's folders:

- ``celery_sidecar.monitor`` (monitor/): intakes, the boundary check, the fold, its read
  API, the config schema and the signal table;
- ``celery_sidecar.exporters`` (exporters/): /metrics and /health;
- ``celery_sidecar.alerts`` (alerts/): the alert engine and Slack delivery;
- this package itself: the app shell (CLI, wiring, demo, render) and the worker plugin,
  ``from celery_sidecar.plugin import ResourceUsage``.

Importing it does nothing: the worker plugin must stay cheap to import inside a worker.
"""

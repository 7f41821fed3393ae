"""/metrics and /health, read from monitor's read API.

The task counters and histograms follow each update (event_metrics.py, a sink, over
series.py's storage and reshape.py's routes); everything else is computed when Prometheus
scrapes, from one snapshot (collectors.py, queue_pressure.py, task_classes.py, ovalmoney.py).
controls.py says what sidecar.yml's cardinality controls and --static-label may name and
what they do to a family. exposition.py renders each family on its own so one bad series
never fails a scrape; http.py serves both endpoints.
"""

"""When an alert fires, and how it reaches someone.

The rules (engine.py: failures, workers, thresholds; stuck_lost.py; beat_alerts.py) read
monitor's read API and decide; delivery/ (dispatcher, outbox, routing, Block Kit templates,
Slack) gets each alert out exactly once. prometheus/ holds the Prometheus alert rules
and their promtool tests, which judge the same series from the outside.
"""

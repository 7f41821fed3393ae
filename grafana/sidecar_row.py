"""The overview's last row: the sidecar's own health (its broker connection, reconnects, the
latency source, the events it folded and those it missed), so a reader knows how far to trust
every other panel."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import timeseries
from grafana_foundation_sdk.models import common

from celery_sidecar.grafana.panels import (
    BAD_WHEN_ANY,
    GOOD_WHEN_ANY,
    HOSTNAME_SELECTOR,
    NOTE_WHEN_ANY,
    RowOfPanels,
    dedup,
    in_range,
    or_none,
    query,
    rare_in,
    rate,
    stat_panel,
    threshold_default,
    threshold_row,
    threshold_targets,
    timeseries_panel,
)


def sidecar_row() -> RowOfPanels:
    return builders.Row("Sidecar"), [
        # The sidecar's own connection: min, so that any sidecar of two that lost the broker shows.
        stat_panel("Broker connected", "min(celery_sidecar_broker_connected)", steps=GOOD_WHEN_ANY, width=6,
                   description="1 while the sidecar is connected to the broker; with two sidecars, 0 while "
                               "either is not (CelerySidecarBrokerDisconnected names it)."),
        stat_panel("Workers without task events",
                   f"sum(1 - {dedup('celery_sidecar_worker_task_events_enabled', selector=HOSTNAME_SELECTOR)})",
                   description="Workers sending heartbeats but no task events: start them with -E.",
                   steps=BAD_WHEN_ANY, width=6),
        stat_panel("Reconnects", in_range("celery_sidecar_reconnects_total", ""), steps=NOTE_WHEN_ANY, width=6,
                   description="Reconnects to the broker in the selected time range; with two sidecars, the "
                               "more of the two (a broker blip reconnects both)."),
        stat_panel("Latency source", f"{dedup('celery_sidecar_latency_source')} == 1",
                   legend="{{source}}", unit="none", width=6, text_mode=common.BigValueTextMode.NAME,
                   description="Which timestamp queue wait is measured from: 'sent' needs "
                               "task_send_sent_event=True."),
        timeseries_panel("Events consumed", [
            query(rate("celery_sidecar_events_total", ""), "{{type}}")],
            unit="reqps", width=24, description="Events per second folded into state, by type; with two sidecars, "
                                                "the more of the two."),
        _events_missed_panel(),
        timeseries_panel("End events unseen by task", [
            query(or_none(f"sum by (name) ({rare_in('celery_task_end_unseen_total', '$__rate_interval')})"),
                  "{{name}}")],
            unit="short", min_value=0, description=(
                "Tasks per interval whose worker, asked, no longer ran them, and whose end event (succeeded, "
                "failed ...) never came: closed without a stuck page, and counted among the missed events "
                "on the left. 'none' while there were none."))
    ]


# CeleryEventStreamIncomplete's window: the line crosses its threshold where the rule judges it.
STREAM_WINDOW = "10m"
# The share of task events missed, per sidecar, then the lowest: with two sidecars the more complete
# one's, the numbers the other panels show (their max), as CeleryEventStreamIncomplete judges it.
EVENTS_MISSED_SHARE = (f"min(increase(celery_sidecar_task_events_missed_fleet_total[{STREAM_WINDOW}]) "
                       f"/ (increase(celery_sidecar_task_events_expected_fleet_total[{STREAM_WINDOW}]) > 0))")


def _events_missed_panel() -> timeseries.Panel:
    ratio = threshold_row("events_missed", signal="events_missed_ratio")
    return timeseries_panel(
        "Task events missed vs threshold",
        [query(EVENTS_MISSED_SHARE, "missed"),
         *threshold_targets("events_missed", signal=ratio.signal)],
        unit="percentunit", min_value=0, description=(
            f"Over the last {STREAM_WINDOW}: the task events the workers' own counts (heartbeats' processed) "
            "account for that never reached the sidecar, plus end events never seen, as a share of those "
            "expected (with two sidecars, the more complete one's), against the limit "
            f"({threshold_default('events_missed', ratio)} by default). Above the line, with at least "
            "events_missed_min missed, CeleryEventStreamIncomplete fires: task counts, latencies and stuck "
            "tasks over that time are short. Empty while no task ran."))

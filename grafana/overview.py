"""The overview dashboard (uid ``celery-sidecar``, the stack's home dashboard): the whole system,
one function per row, in the order they appear.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import stat, statetimeline, table, timeseries
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

from celery_sidecar.grafana.panels import (
    BAD_WHEN_ANY,
    DATASOURCE,
    GOOD_WHEN_ANY,
    HOSTNAME_SELECTOR,
    NAME_SELECTOR,
    NOTE_WHEN_ANY,
    QUEUE_SELECTOR,
    RUNTIME_LIMIT,
    SUCCESS_RATE,
    SUCCESS_STEPS,
    THRESHOLD_LEGEND,
    RowOfPanels,
    assemble,
    dashboard,
    datasource_variable,
    dedup,
    heatmap_panel,
    in_range,
    increase,
    latency_rows,
    link,
    or_none,
    query,
    query_variable,
    rare_in,
    rate,
    stat_panel,
    table_panel,
    table_query,
    threshold_default,
    threshold_row,
    threshold_targets,
    thresholds,
    throughput_by_state,
    timeseries_panel,
)
from celery_sidecar.grafana.queues import pressure_row, queues_row
from celery_sidecar.grafana.sidecar_row import sidecar_row
from celery_sidecar.monitor.config.dashboard_links import OVERVIEW_UID, TASK_UID

# -- the overview ------------------------------------------------------------------------


def overview() -> model.Dashboard:
    board = (
        dashboard(OVERVIEW_UID, "Celery", (
            "Celery tasks, queues and workers from celery-sidecar: counters for the selected range, "
            "throughput by state, task and queue, queue wait and runtime, queue length, where tasks are "
            "(waiting, running, stuck, lost, redelivered), retries, workers, periodic tasks (Beat) and the "
            "sidecar's own health, with how complete its event stream is. Threshold lines read the "
            "celery_threshold gauges, so they follow the sidecar's config. A task name in the task tables opens "
            "the per-task dashboard."))
        .links([link("Celery task", f"/d/{TASK_UID}", keep_time=True), link("Flower", "/flower/", blank=True)])
        .with_variable(datasource_variable())
        .with_variable(query_variable("queue", "Queue", "label_values(celery_queue_length, queue_name)"))
        .with_variable(query_variable("task", "Task", "label_values(celery_task_received_total, name)"))
        .with_variable(query_variable("hostname", "Worker", "label_values(celery_worker_up, hostname)"))
    )
    return assemble(board, [
        _overview_counters_row(), _overview_throughput_row(), _overview_latency_row(), queues_row(), pressure_row(),
        _overview_where_tasks_are_row(), _overview_retries_row(), _overview_workers_row(),
        _overview_top_tasks_row(), _overview_beat_row(), sidecar_row(),
    ])


def _overview_counters_row() -> RowOfPanels:
    return builders.Row("Overview"), [
        stat_panel("Workers online", f"sum({dedup('celery_worker_up', selector=HOSTNAME_SELECTOR)})",
                   steps=GOOD_WHEN_ANY),
        stat_panel("Workers offline", f"sum(1 - {dedup('celery_worker_up', selector=HOSTNAME_SELECTOR)})",
                   description="Known workers whose heartbeats stopped.", steps=BAD_WHEN_ANY),
        stat_panel("Tasks active", f"sum({dedup('celery_worker_tasks_active', selector=HOSTNAME_SELECTOR)})"),
        stat_panel("Tasks received", f"sum({in_range('celery_task_received_total')})",
                   description="In the selected time range."),
        stat_panel("Tasks succeeded", f"sum({in_range('celery_task_succeeded_total')})"),
        stat_panel("Tasks failed", f"sum({in_range('celery_task_failed_total')})", steps=BAD_WHEN_ANY),
        stat_panel("Tasks retried", f"sum({in_range('celery_task_retried_total')})", steps=NOTE_WHEN_ANY),
        stat_panel("Success rate", SUCCESS_RATE, unit="percentunit", decimals=1, steps=SUCCESS_STEPS,
                   description="succeeded / (succeeded + failed) in the selected time range; "
                               "a task without failures counts 0 failed."),
    ]


def _overview_throughput_row() -> RowOfPanels:
    return builders.Row("Throughput"), [
        timeseries_panel("Task throughput by state", throughput_by_state(), unit="reqps", description=(
            "Events per second for each task state (rejected omitted: rare and shown in Flower).")),
        timeseries_panel("Succeeded by task", [
            query(f"sum by (name) ({rate('celery_task_succeeded_total')})", "{{name}}")], unit="reqps"),
        timeseries_panel("Failed by task and exception", [
            query(f"sum by (name, exception) ({rate('celery_task_failed_total')})", "{{name}}: {{exception}}")],
            unit="reqps"),
        timeseries_panel("Received by queue", [
            query(f"sum by (queue_name) ({rate('celery_task_received_total')})", "{{queue_name}}")], unit="reqps"),
    ]


def _overview_latency_row() -> RowOfPanels:
    normal, heavy = latency_rows()
    return builders.Row("Latency and runtime"), [
        timeseries_panel(
            "Queue wait p95 vs thresholds",
            [query("histogram_quantile(0.95, sum by (le, task_class) "
                   f"({rate('celery_task_latency_seconds_bucket', QUEUE_SELECTOR)}))", "p95 {{task_class}}"),
             *threshold_targets("latency")],
            unit="s", description=(
                "Time from sent (or received) to started, p95 per task class. Normal tasks should stay under the "
                f"normal threshold ({threshold_default('latency', normal)} by default), heavy ones under the "
                f"heavy threshold ({threshold_default('latency', heavy)}); heavy_tasks / heavy_queues in the "
                "sidecar's config decide the class. Lines follow the sidecar's config.")),
        timeseries_panel("Runtime p95 by task", [
            query("histogram_quantile(0.95, sum by (le, name) "
                  f"({rate('celery_task_runtime_bucket')}))", "{{name}}")], unit="s"),
        heatmap_panel("Task runtime", f"sum by (le) ({increase('celery_task_runtime_bucket')})",
                      description="Distribution of task run times (started to done)."),
        heatmap_panel("Task queue wait", f"sum by (le) ({increase('celery_task_queue_wait_time_bucket')})",
                      description="Distribution of time spent queued."),
    ]


def _overview_where_tasks_are_row() -> RowOfPanels:
    return builders.Row("Where tasks are"), [
        _oldest_waiting_panel(),
        timeseries_panel("Running tasks by task", [
            query(dedup("celery_task_running", selector=NAME_SELECTOR), "{{name}}")],
            unit="short", min_value=0, description="Tasks started and not finished, per task name."),
        _running_tasks_table(),
        timeseries_panel("Stuck tasks by task", [
            query(dedup("celery_task_stuck", selector=NAME_SELECTOR), "{{name}}")],
            unit="short", min_value=0, description=(
                "Tasks running longer than their runtime limit (thresholds.task_runtime_seconds, "
                f"{RUNTIME_LIMIT} by default), per task name: CeleryTaskStuck fires on any.")),
        _lost_and_redelivered_panel(),
        timeseries_panel("Unacknowledged messages (Redis)", [
            query(dedup("celery_redis_unacked_tasks"), "unacked")],
            unit="short", width=6, min_value=0, description=(
                "Messages workers have taken and not acknowledged yet (kombu's unacked hash; Redis brokers "
                "only): prefetched and running tasks, and with acks_late those of a lost worker.")),
        timeseries_panel("Oldest unacknowledged message (Redis)", [
            query(dedup("celery_redis_unacked_oldest_age_seconds"), "oldest unacked")],
            unit="s", width=6, min_value=0, description=(
                "Age of the oldest unacknowledged message. Redis redelivers it once this passes the "
                "transport's visibility_timeout (1 h by default).")),
    ]


def _oldest_waiting_panel() -> timeseries.Panel:
    normal, heavy = latency_rows()
    return timeseries_panel(
        "Oldest waiting task vs latency thresholds",
        [query(dedup("celery_queue_oldest_task_age_seconds", selector=QUEUE_SELECTOR),
               "{{queue_name}} ({{task_class}})"),
         *threshold_targets("latency")],
        unit="s", min_value=0, description=(
            "How long the oldest task sent to each queue and not started yet has waited (0: none waits), "
            "against the latency threshold of that task's class: normal "
            f"({threshold_default('latency', normal)} by default) or heavy "
            f"({threshold_default('latency', heavy)}). A queue nobody consumes starts nothing, so it has "
            "no queue wait p95, but this keeps growing; CeleryTaskLatencyHigh fires on either. On Redis, a "
            "task sent before the sidecar started is timed from when the sidecar first saw it "
            "(celery_queue_oldest_task_age_lower_bound = 1): it is older than shown."))


def _running_tasks_table() -> table.Panel:
    return table_panel(
        "Running tasks",
        [table_query(dedup("celery_task_running", selector=NAME_SELECTOR), "A"),
         table_query(dedup("celery_task_stuck", selector=NAME_SELECTOR), "B"),
         table_query(dedup("celery_task_oldest_running_seconds", selector=NAME_SELECTOR), "C")],
        description=("Per task name, now: tasks running, how many of them are stuck (running past their "
                     f"runtime limit, thresholds.task_runtime_seconds: {RUNTIME_LIMIT} by default, overridable "
                     "per task), and how long the oldest has been running. Click a task to open its dashboard."),
        width=12, height=8, merge=True, sort_by="Oldest running", units={"Oldest running": "s"},
        task_link="Task",
        rename={"name": "Task", "Value #A": "Running", "Value #B": "Stuck", "Value #C": "Oldest running"})


def _lost_and_redelivered_panel() -> timeseries.Panel:
    return timeseries_panel(
        "Lost and redelivered by task",
        [query(or_none(f"sum by (name) ({rare_in('celery_task_lost_total', '$__rate_interval')})"),
               "{{name}} lost"),
         query(or_none(f"sum by (name) ({rare_in('celery_task_redelivered_total', '$__rate_interval')})"),
               "{{name}} redelivered", "B")],
        unit="short", min_value=0, description=(
            "Tasks per interval. Lost: started on a worker that went down, never finished (CeleryTasksLost). "
            "Redelivered: received a second time, not as a retry: the broker delivered it again after its "
            "worker was lost (acks_late) or, on Redis, after visibility_timeout (CeleryTaskRedelivered). "
            "'none' while nothing was ever lost or redelivered."))


def _overview_retries_row() -> RowOfPanels:
    retry = threshold_row("retry_rate", signal="retry_ratio")
    return builders.Row("Retries"), [
        timeseries_panel(
            "Retry rate vs threshold",
            [query(dedup("celery_task_retry_ratio", selector=NAME_SELECTOR), "{{name}}"),
             *threshold_targets("retry_rate", signal=retry.signal)],
            unit="percentunit", description=(
                "retries / (retries + finished) over the sidecar's sliding window, per task, against the limit "
                f"({threshold_default('retry_rate', retry)} by default).")),
        timeseries_panel("Retries by task", [
            query(f"sum by (name) ({rate('celery_task_retried_total')})", "{{name}}")], unit="reqps"),
    ]


def _overview_workers_row() -> RowOfPanels:
    cpu, memory = threshold_row("worker_cpu"), threshold_row("worker_memory")
    return builders.Row("Workers"), [
        _workers_up_panel(),
        timeseries_panel("Pool utilization", [
            query(dedup("celery_worker_pool_utilization", selector=HOSTNAME_SELECTOR), "{{hostname}}")],
            unit="percentunit", min_value=0, max_value=1, description="Busy pool processes / pool size."),
        timeseries_panel(
            "Worker CPU vs threshold",
            [query(dedup("celery_worker_cpu_percent", selector=HOSTNAME_SELECTOR), "{{hostname}}"),
             *threshold_targets("worker_cpu")],
            unit="percent", min_value=0, description=(
                "From the worker plugin (celery_sidecar.plugin.ResourceUsage), % of the host, against the limit "
                f"({threshold_default('worker_cpu', cpu)} by default).")),
        timeseries_panel(
            "Worker memory vs threshold",
            [query(dedup("celery_worker_memory_percent", selector=HOSTNAME_SELECTOR), "{{hostname}}"),
             *threshold_targets("worker_memory")],
            unit="percent", min_value=0, description=(
                "From the worker plugin, % of the host's memory, against the limit "
                f"({threshold_default('worker_memory', memory)} by default).")),
        timeseries_panel("Worker RSS", [
            query(dedup("celery_worker_rss_bytes", selector=HOSTNAME_SELECTOR), "{{hostname}}")],
            unit="bytes"),
        timeseries_panel("Active tasks per worker", [
            query(dedup("celery_worker_tasks_active", selector=HOSTNAME_SELECTOR), "{{hostname}}")],
            unit="short"),
    ]


def _workers_up_panel() -> statetimeline.Panel:
    return (
        statetimeline.Panel().title("Workers up/down").description("1 while heartbeats arrive.")
        .datasource(DATASOURCE).height(8).span(12)
        .with_target(query(dedup("celery_worker_up", selector=HOSTNAME_SELECTOR), "{{hostname}}"))
        .mappings([model.ValueMap(options={
            "0": model.ValueMappingResult(text="down", color="red", index=0),
            "1": model.ValueMappingResult(text="up", color="green", index=1),
        })])
        .thresholds(thresholds(GOOD_WHEN_ANY))
        .show_value(common.VisibilityMode.NEVER).merge_values(True).row_height(0.8)
        .align_value(common.TimelineValueAlignment.LEFT).fill_opacity(80).line_width(0)
        .legend(common_builders.VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM))
        .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.SINGLE)
                 .sort(common.SortOrder.NONE))
    )


def _overview_top_tasks_row() -> RowOfPanels:
    return builders.Row("Top tasks"), [
        table_panel(
            "Top tasks",
            [table_query(f"topk(15, sum by (name) ({in_range('celery_task_succeeded_total')}))", "A"),
             table_query(f"sum by (name) ({in_range('celery_task_failed_total')})", "B"),
             table_query(f"sum by (name) ({in_range('celery_task_retried_total')})", "C"),
             table_query("histogram_quantile(0.95, sum by (le, name) "
                         f"({increase('celery_task_runtime_bucket', window='$__range')}))", "D")],
            description="Per task name in the selected time range. Click a task to open its dashboard.",
            width=14, merge=True, sort_by="Succeeded", units={"Runtime p95": "s"}, task_link="Task",
            rename={"name": "Task", "Value #A": "Succeeded", "Value #B": "Failed", "Value #C": "Retried",
                    "Value #D": "Runtime p95"}),
        table_panel(
            "Top exceptions",
            [table_query(f"topk(15, sum by (name, exception) ({in_range('celery_task_failed_total')}))")],
            description="Failures per task and exception class in the selected time range. Click a task to open "
                        "its dashboard.",
            width=10, sort_by="Failures", task_link="Task",
            rename={"name": "Task", "exception": "Exception", "Value": "Failures"}),
    ]


BEAT_KEY = "entry, task"  # a Beat entry's identity in the celery_beat_entry_* gauges
PERIOD_AND_GRACE = "celery_beat_entry_period_seconds + celery_beat_entry_grace_seconds"


def _overview_beat_row() -> RowOfPanels:
    return builders.Row("Periodic tasks (Beat)"), [
        *_beat_stats(),
        _beat_entries_table(),
        timeseries_panel(
            "Time since last run vs period + grace",
            [query(f"time() - {dedup('celery_beat_entry_last_run_timestamp_seconds')}", "{{entry}}"),
             query(dedup("celery_beat_entry_period_seconds", PERIOD_AND_GRACE),
                   f"{{{{entry}}}} {THRESHOLD_LEGEND}", "B")],
            unit="s", min_value=0, description=(
                "Per entry seen running: time since its last run, against its period + grace (dashed). Above "
                "the line, a run was missed: CeleryBeatEntryMissed fires.")),
        timeseries_panel("Lateness of the last run", [
            query(dedup("celery_beat_entry_late_seconds"), "{{entry}}")],
            unit="s", min_value=0, description="How long after its due time each entry's last run came."),
    ]


def _beat_stats() -> list[stat.Panel]:
    # Overdue: not run for longer than period + grace, the CeleryBeatEntryMissed rule's first
    # case, read from the same gauges.
    # min by, as the rule has it: the shorter period + grace of two sidecars' copies.
    overdue = (f"time() - {dedup('celery_beat_entry_last_run_timestamp_seconds')} "
               f"> on ({BEAT_KEY}) min by ({BEAT_KEY}) ({PERIOD_AND_GRACE})")
    return [
        stat_panel("Beat down", dedup("celery_beat_down"), steps=BAD_WHEN_ANY, width=6,
                   description="1 while Beat looks down: two entries (a lone entry: two of its due "
                               "times) missed since the last run of any entry (CeleryBeatNotScheduling)."),
        stat_panel("Beat entries", f"count({dedup('celery_beat_entry_period_seconds')}) or vector(0)", width=6,
                   description="Schedule entries watched: the app's beat_schedule (with --app) and the "
                               "beat: section of the sidecar's config."),
        stat_panel("Entries overdue", f"count({overdue}) or vector(0)", steps=BAD_WHEN_ANY, width=6,
                   description="Entries that have not run for longer than their period + grace "
                               "(CeleryBeatEntryMissed)."),
        stat_panel("Missed runs", f"sum({rare_in('celery_beat_entry_missed_total', '$__range', '')}) "
                   "or vector(0)", steps=NOTE_WHEN_ANY, width=6,
                   description="Due times that passed without a run, in the selected time range."),
    ]


def _beat_entries_table() -> table.Panel:
    return table_panel(
        "Beat entries",
        [table_query(f"{dedup('celery_beat_entry_last_run_timestamp_seconds')} * 1000", "A"),
         table_query(f"{dedup('celery_beat_entry_next_due_timestamp_seconds')} * 1000", "B"),
         table_query(rare_in("celery_beat_entry_missed_total", "$__range", ""), "C"),
         table_query(dedup("celery_beat_entry_late_seconds"), "D"),
         table_query(dedup("celery_beat_entry_period_seconds"), "E"),
         table_query(dedup("celery_beat_entry_grace_seconds"), "F")],
        description=("Each Beat schedule entry: its last run (empty until one is seen), when the next is due, "
                     "the due times missed in the selected time range, how late the last run came, and the "
                     "period and grace a run is judged by. Click a task to open its dashboard."),
        width=24, merge=True, sort_by="Missed", task_link="Task",
        units={"Last run": "dateTimeFromNow", "Next due": "dateTimeFromNow", "Late": "s", "Period": "s",
               "Grace": "s"},
        rename={"entry": "Entry", "task": "Task", "Value #A": "Last run", "Value #B": "Next due",
                "Value #C": "Missed", "Value #D": "Late", "Value #E": "Period", "Value #F": "Grace"})

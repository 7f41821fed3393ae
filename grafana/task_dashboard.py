"""The per-task dashboard (uid ``celery-sidecar-task``): one task name, one function per row, in
the order they appear.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

from celery_sidecar.grafana.panels import (
    BAD_WHEN_ANY,
    NAME_SELECTOR,
    NOTE_WHEN_ANY,
    RUNTIME_LIMIT,
    SUCCESS_RATE,
    SUCCESS_STEPS,
    TASK_SELECTOR,
    THRESHOLD_LEGEND,
    RowOfPanels,
    assemble,
    dashboard,
    datasource_variable,
    dedup,
    in_range,
    latency_rows,
    link,
    query,
    query_variable,
    rare_in,
    rate,
    stat_panel,
    table_panel,
    table_query,
    threshold_default,
    threshold_expr,
    threshold_row,
    threshold_targets,
    throughput_by_state,
    timeseries_panel,
)
from celery_sidecar.monitor.config.dashboard_links import OVERVIEW_UID, TASK_UID

# -- the per-task dashboard ----------------------------------------------------------------


def task_dashboard() -> model.Dashboard:
    board = (
        dashboard(TASK_UID, "Celery task", (
            "One Celery task name from celery-sidecar: counters for the selected range, tasks running now, "
            "stuck, lost and redelivered, throughput by state, failures by exception, runtime p50/p95/p99, queue "
            "wait against the latency threshold of the task's class (normal or heavy), retry ratio against its "
            "limit, and the workers that run it. Opened from the Celery dashboard's task tables and from alerts."))
        .links([link("Celery", f"/d/{OVERVIEW_UID}", keep_time=True), link("Flower", "/flower/", blank=True)])
        .with_variable(datasource_variable())
        .with_variable(query_variable("task", "Task", "label_values(celery_task_received_total, name)",
                                      include_all=False))
        .with_variable(query_variable("queue", "Queue",
                                      'label_values(celery_task_received_total{name=~"$task"}, queue_name)'))
    )
    return assemble(board, [
        _task_counters_row(), _task_running_row(), _task_throughput_row(), _task_runtime_row(),
        _task_retries_row(), _task_workers_row(),
    ])


def _task_counters_row() -> RowOfPanels:
    return builders.Row("$task"), [
        stat_panel("Received", f"sum({in_range('celery_task_received_total')})", width=4,
                   description="In the selected time range."),
        stat_panel("Succeeded", f"sum({in_range('celery_task_succeeded_total')})", width=4),
        stat_panel("Failed", f"sum({in_range('celery_task_failed_total')})", steps=BAD_WHEN_ANY, width=4),
        stat_panel("Retried", f"sum({in_range('celery_task_retried_total')})", steps=NOTE_WHEN_ANY, width=4),
        stat_panel("Success rate", SUCCESS_RATE, unit="percentunit", decimals=1, width=4, steps=SUCCESS_STEPS,
                   description="succeeded / (succeeded + failed) in the selected time range."),
        stat_panel("Task class", dedup("celery_task_class", selector=TASK_SELECTOR, by=("task_class",)),
                   legend="{{task_class}}", unit="none", width=4, text_mode=common.BigValueTextMode.NAME,
                   description="normal or heavy: which latency threshold the sidecar judges this task "
                               "by (heavy_tasks / heavy_queues in its config)."),
    ]


def _task_running_row() -> RowOfPanels:
    running = f"{dedup('celery_task_running', selector=NAME_SELECTOR, by=())} or vector(0)"
    stuck = f"{dedup('celery_task_stuck', selector=NAME_SELECTOR, by=())} or vector(0)"
    oldest = dedup("celery_task_oldest_running_seconds", selector=NAME_SELECTOR, by=())
    return builders.Row("Running, stuck and lost"), [
        stat_panel("Running", running, width=4, description="Tasks of this name started and not finished, now."),
        stat_panel("Stuck", stuck, steps=BAD_WHEN_ANY, width=4, description=(
            "Running longer than the task's runtime limit (thresholds.task_runtime_seconds: "
            f"{RUNTIME_LIMIT} by default, overridable per task): CeleryTaskStuck.")),
        stat_panel("Oldest running", f"{oldest} or vector(0)",
                   unit="s", width=4, description="How long the longest-running one has run so far."),
        stat_panel("Lost", f"sum({rare_in('celery_task_lost_total', '$__range')}) or vector(0)",
                   steps=BAD_WHEN_ANY, width=6, description=(
                       "In the selected time range: started on a worker that went down, never "
                       "finished (CeleryTasksLost).")),
        stat_panel("Redelivered", f"sum({rare_in('celery_task_redelivered_total', '$__range')}) or vector(0)",
                   steps=NOTE_WHEN_ANY, width=6, description=(
                       "In the selected time range: received a second time, not as a retry "
                       "(CeleryTaskRedelivered). It ran again: it must be idempotent.")),
        timeseries_panel(
            "Running and stuck", [query(running, "running"), query(stuck, "stuck", "B")],
            unit="short", min_value=0, description="Tasks of this name running, and those of them past the "
                                                   "runtime limit."),
        timeseries_panel(
            "Oldest running",
            [query(oldest, "oldest running")],
            unit="s", min_value=0, description=(
                "How long the longest-running task of this name has run so far (empty while none runs); "
                f"past its runtime limit ({RUNTIME_LIMIT} by default) it is stuck.")),
    ]


def _task_throughput_row() -> RowOfPanels:
    return builders.Row("Throughput and failures"), [
        timeseries_panel("Throughput by state", throughput_by_state(), unit="reqps", width=8,
                         description="Events per second for each task state."),
        timeseries_panel("Failures by exception", [
            query(f"sum by (exception) ({rate('celery_task_failed_total')})", "{{exception}}")],
            unit="reqps", width=8, description="Failures per second, by exception class."),
        table_panel(
            "Exceptions", [table_query(f"sum by (exception) ({in_range('celery_task_failed_total')})")],
            description="Failures by exception class in the selected time range.", width=8, height=8,
            sort_by="Failures",
            rename={"exception": "Exception", "Value": "Failures"}),
    ]


def _task_runtime_row() -> RowOfPanels:
    normal, heavy = latency_rows()
    # One line per latency level, shown only while a selected (task, queue) is of that class:
    # celery_task_class says which class the sidecar judges the task by.
    class_lines = [
        query(f"{threshold_expr(row)} and on () count({_of_class(row.level)})", f"{THRESHOLD_LEGEND} {row.level}", ref)
        for ref, row in zip("CD", (normal, heavy), strict=True)
    ]
    wait = rate("celery_task_queue_wait_time_bucket")
    return builders.Row("Runtime and queue wait"), [
        timeseries_panel(
            "Runtime p50 / p95 / p99",
            [query(f"histogram_quantile({q}, sum by (le) ({rate('celery_task_runtime_bucket')}))", f"p{p}", ref)
             for ref, q, p in (("A", "0.5", "50"), ("B", "0.95", "95"), ("C", "0.99", "99"))],
            unit="s", description="Run time (started to done) quantiles, from celery_task_runtime."),
        timeseries_panel(
            "Queue wait vs latency threshold",
            [query(f"histogram_quantile(0.5, sum by (le) ({wait}))", "p50"),
             query(f"histogram_quantile(0.95, sum by (le) ({wait}))", "p95", "B"),
             *class_lines],
            unit="s", description=(
                "Time from sent (or received) to started, against the latency threshold of the task's class: "
                f"normal ({threshold_default('latency', normal)} by default) or heavy "
                f"({threshold_default('latency', heavy)}). The sidecar's latency alert judges the p95 of "
                "the whole class; this is the task's own share of it.")),
    ]


def _of_class(level: str) -> str:
    """The selected (task, queue) pairs the sidecar judges by the latency threshold of ``level``."""
    return dedup("celery_task_class", selector=f'{TASK_SELECTOR}, task_class="{level}"')


def _task_retries_row() -> RowOfPanels:
    retry = threshold_row("retry_rate", signal="retry_ratio")
    return builders.Row("Retries"), [
        timeseries_panel(
            "Retry ratio vs threshold",
            [query(dedup("celery_task_retry_ratio", selector=NAME_SELECTOR), "{{name}}"),
             *threshold_targets("retry_rate", signal=retry.signal)],
            unit="percentunit", description=(
                "retries / (retries + finished) over the sidecar's sliding window, against the limit "
                f"({threshold_default('retry_rate', retry)} by default).")),
        timeseries_panel("Retries", [
            query(f"sum({rate('celery_task_retried_total')})", "retried")], unit="reqps",
            description="Retries per second."),
    ]


def _task_workers_row() -> RowOfPanels:
    return builders.Row("Workers"), [
        table_panel(
            "Workers running this task",
            [table_query(f"sum by (hostname) ({in_range('celery_task_received_total')})", "A"),
             table_query(f"sum by (hostname) ({in_range('celery_task_succeeded_total')})", "B"),
             table_query(f"sum by (hostname) ({in_range('celery_task_failed_total')})", "C"),
             table_query(f"{dedup('celery_worker_up')} and on (hostname) "
                         f"{dedup('celery_task_received_total', selector=TASK_SELECTOR, by=('hostname',))}", "D")],
            description="Workers that received this task in the selected time range, and whether they are up.",
            width=12, height=8, merge=True, sort_by="Received",
            rename={"hostname": "Worker", "Value #A": "Received", "Value #B": "Succeeded", "Value #C": "Failed",
                    "Value #D": "Up"}),
        timeseries_panel("Received per worker", [
            query(f"sum by (hostname) ({rate('celery_task_received_total')})", "{{hostname}}")], unit="reqps"),
    ]

"""The Grafana dashboards, as code, built with Grafana's own SDK (grafana-foundation-sdk).

Build-time only: ``scripts/generate`` writes what ``dashboards()`` returns to
grafana/dashboards/*.json, the JSON is committed and shipped as package data, and
tests/test_dashboards.py fails when the committed files differ from a fresh build. Nothing
imports this module at run time, and the SDK is the ``dashboards`` extra, not a dependency.
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
  run, next due, misses, lateness) and the sidecar's own health.
- ``celery-sidecar-task.json`` (uid ``celery-sidecar-task``): one task name. Counters, running /
  stuck / oldest running, lost and redelivered, throughput by state, failures by exception,
  runtime p50/p95/p99, queue wait against the latency threshold of the task's class (normal or
  heavy, from ``celery_task_class``), retry ratio against its limit, and the workers that run it.

Every threshold line is a ``celery_threshold`` query built from a row of the signal table
(monitor/signals.py, ``threshold_expr``), never typed here, so the graphs compare against
exactly what the alerts compare against, and follow an edit of sidecar.yml.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import heatmap as heatmap_model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat, QueryEditorMode

from celery_sidecar.monitor.config import Config
from celery_sidecar.monitor.dashboard_links import DATASOURCE_UID, OVERVIEW_UID, TASK_UID
from celery_sidecar.monitor.signals import BY_RULE, Threshold, format_value

OVERVIEW_FILE = "celery-sidecar.json"
TASK_FILE = "celery-sidecar-task.json"

DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
DEFAULTS = Config()  # only for the numbers quoted in descriptions; the lines read the live gauges
TASK_SELECTOR = 'name=~"$task", queue_name=~"$queue"'
THRESHOLD_LEGEND = "threshold"  # legends with this word get the dashed red threshold style

Step = tuple[float | None, str]  # (value, color) of a stat's color thresholds; None: the base


# -- thresholds, from the signal table -----------------------------------------------------


def threshold_rows(rule: str) -> list[Threshold]:
    """The ``celery_threshold`` rows of one signal, one per (signal, level)."""
    rows: dict[tuple[str, str], Threshold] = {}
    for row in BY_RULE[rule].thresholds(DEFAULTS, []):
        rows.setdefault((row.signal, row.level), row)
    return list(rows.values())


def threshold_row(rule: str, signal: str | None = None, level: str | None = None) -> Threshold:
    (row,) = [r for r in threshold_rows(rule) if signal in (None, r.signal) and level in (None, r.level)]
    return row


def threshold_expr(row: Threshold) -> str:
    """The PromQL of one threshold line: per selected queue for a per-queue threshold."""
    matchers = f'signal="{row.signal}", level="{row.level}"'
    if row.queue_name:
        return f'max by (queue_name) (celery_threshold{{{matchers}, queue_name=~"$queue"}})'
    return f"max(celery_threshold{{{matchers}}})"


def threshold_default(rule: str, row: Threshold) -> str:
    """A row's documented default, for descriptions ("100", "5.0 s", "5.0%")."""
    return format_value(row.value, "messages" if row.signal.endswith("outcomes") else BY_RULE[rule].unit)


def threshold_targets(rule: str, signal: str | None = None, refs: str = "BCDEFG") -> list[prometheus.Dataquery]:
    rows = [r for r in threshold_rows(rule) if signal in (None, r.signal)]
    assert len(rows) <= len(refs), f"{rule}: more threshold rows than refIds"
    targets = []
    for ref, row in zip(refs, rows, strict=False):
        legend = THRESHOLD_LEGEND + (f" {row.level}" if len(rows) > 1 else "")
        if row.queue_name:
            legend = "{{queue_name}} " + legend
        targets.append(query(threshold_expr(row), legend, ref))
    return targets


# -- building blocks ---------------------------------------------------------------------


def query(expr: str, legend: str, ref: str = "A", *, instant: bool = False,
          fmt: PromQueryFormat = PromQueryFormat.TIME_SERIES) -> prometheus.Dataquery:
    q = (prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)
         .format(fmt).editor_mode(QueryEditorMode.CODE))
    return q.instant() if instant else q.range()


def thresholds(steps: Iterable[Step]) -> builders.ThresholdsConfig:
    return builders.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(
        [model.Threshold(value=value, color=color) for value, color in steps])


GREEN: list[Step] = [(None, "green")]
BAD_WHEN_ANY: list[Step] = [(None, "green"), (1, "red")]
GOOD_WHEN_ANY: list[Step] = [(None, "red"), (1, "green")]
NOTE_WHEN_ANY: list[Step] = [(None, "green"), (1, "orange")]


def stat_panel(title: str, expr: str, *, description: str = "", unit: str = "short", steps: Iterable[Step] = GREEN,
               width: int = 3, decimals: float | None = None, legend: str | None = None,
               text_mode: common.BigValueTextMode = common.BigValueTextMode.VALUE) -> stat.Panel:
    panel = (
        stat.Panel().title(title).description(description).datasource(DATASOURCE).height(4).span(width)
        .with_target(query(expr, title if legend is None else legend))
        .unit(unit).thresholds(thresholds(steps))
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .color_mode(common.BigValueColorMode.VALUE).graph_mode(common.BigValueGraphMode.AREA)
        .text_mode(text_mode).justify_mode(common.BigValueJustifyMode.AUTO)
        .orientation(common.VizOrientation.AUTO)
    )
    return panel.decimals(decimals) if decimals is not None else panel


def timeseries_panel(title: str, targets: list[prometheus.Dataquery], *, unit: str, description: str = "",
                     width: int = 12, min_value: float | None = None,
                     max_value: float | None = None) -> timeseries.Panel:
    panel = (
        timeseries.Panel().title(title).description(description).datasource(DATASOURCE).height(8).span(width)
        .targets(targets).unit(unit)
        .draw_style(common.GraphDrawStyle.LINE).line_width(1).fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER).span_nulls(True)
        .legend(common_builders.VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.TABLE)
                .placement(common.LegendPlacement.BOTTOM).calcs(["lastNotNull", "max"]))
        .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                 .sort(common.SortOrder.DESCENDING))
    )
    if any(THRESHOLD_LEGEND in (target.build().legend_format or "") for target in targets):
        # Threshold lines (legend "... threshold ..."): dashed, red, unfilled.
        panel = panel.override_by_regexp(f".*{THRESHOLD_LEGEND}.*", [
            model.DynamicConfigValue(id_val="custom.lineStyle", value=common.LineStyle(fill="dash", dash=[10, 10])),
            model.DynamicConfigValue(id_val="color", value=model.FieldColor(
                mode=model.FieldColorModeId.FIXED, fixed_color="red")),
            model.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
            model.DynamicConfigValue(id_val="custom.lineWidth", value=2),
        ])
    if min_value is not None:
        panel = panel.min(min_value)
    if max_value is not None:
        panel = panel.max(max_value)
    return panel


def heatmap_panel(title: str, expr: str, *, description: str) -> heatmap.Panel:
    return (
        heatmap.Panel().title(title).description(description).datasource(DATASOURCE).height(8).span(12)
        .with_target(query(expr, "{{le}}", fmt=PromQueryFormat.HEATMAP))
        .unit("s").calculate(False).cell_gap(1)
        .y_axis(heatmap.YAxisConfig().axis_placement(common.AxisPlacement.LEFT).unit("s"))
        .color(heatmap.HeatmapColorOptions().mode(heatmap_model.HeatmapColorMode.SCHEME).scheme("Oranges")
               .steps(64).exponent(0.5).fill("dark-orange"))
        .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.AUTO))
        .mode(common.TooltipDisplayMode.SINGLE).show_y_histogram().show_legend()
        .scale_distribution(common_builders.ScaleDistributionConfig().type(common.ScaleDistribution.LINEAR))
    )


def table_panel(title: str, targets: Iterable[prometheus.Dataquery], *, description: str, width: int,
                rename: dict[str, str], sort_by: str, merge: bool = False, height: int = 9,
                units: dict[str, str] | None = None, task_link: str | None = None) -> table.Panel:
    panel = (
        table.Panel().title(title).description(description).datasource(DATASOURCE).height(height).span(width)
        .targets(list(targets)).show_header(True).cell_height(common.TableCellHeight.SM)
        .sort_by([common_builders.TableSortByFieldState().display_name(sort_by).desc(True)])
        .align(common.FieldTextAlignment.AUTO)
    )
    if merge:
        panel = panel.with_transformation(model.DataTransformerConfig(id_val="merge", options={}))
    panel = panel.with_transformation(model.DataTransformerConfig(
        id_val="organize", options={"excludeByName": {"Time": True}, "renameByName": rename}))
    for column, unit in (units or {}).items():
        panel = panel.override_by_name(column, [model.DynamicConfigValue(id_val="unit", value=unit)])
    if task_link is not None:
        panel = panel.override_by_name(task_link, [model.DynamicConfigValue(id_val="links", value=[{
            "title": "Open the per-task dashboard",
            "url": f"/d/{TASK_UID}?var-task=${{__value.raw}}&${{datasource:queryparam}}&${{queue:queryparam}}"
                   "&${__url_time_range}",
        }])])
    return panel


def datasource_variable() -> builders.DatasourceVariable:
    return (builders.DatasourceVariable("datasource").label("Data source").type("prometheus")
            .current(model.VariableOption(selected=False, text="Prometheus", value=DATASOURCE_UID)))


def query_variable(name: str, label: str, values_of: str, *, include_all: bool = True) -> builders.QueryVariable:
    variable = (builders.QueryVariable(name).label(label).datasource(DATASOURCE).query(values_of)
                .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC))
    if include_all:  # Grafana's All is the regex .*, so every query matches with =~
        variable = (variable.include_all(True).all_value(".*").multi(True)
                    .current(model.VariableOption(selected=True, text=["All"], value=["$__all"])))
    return variable


def link(title: str, url: str, *, keep_time: bool = False, blank: bool = False) -> builders.DashboardLink:
    return (builders.DashboardLink(title).type(model.DashboardLinkType.LINK).url(url)
            .keep_time(keep_time).target_blank(blank).icon("external link" if blank else "dashboard"))


def dashboard(uid: str, title: str, description: str) -> builders.Dashboard:
    return (
        builders.Dashboard(title).uid(uid).description(description).tags(["celery", "celery-sidecar"])
        # Read-only: provisioned from files, so an edit in the UI would be lost anyway.
        .readonly().tooltip(model.DashboardCursorSync.CROSSHAIR).timezone("browser").refresh("30s")
        .time("now-1h", "now").version(1).annotations([])
    )


def finish(board: builders.Dashboard) -> model.Dashboard:
    """The built model, with fixed panel ids, in order (links and Grafana's viewPanel use them)."""
    built = board.build()
    for number, panel in enumerate(built.panels or [], start=1):
        panel.id_val = number
    return built


def rate(metric: str, selector: str = TASK_SELECTOR, window: str = "$__rate_interval") -> str:
    return f"rate({metric}{{{selector}}}[{window}])"


def in_range(metric: str, selector: str = TASK_SELECTOR) -> str:
    """Events in the selected time range, rounded: increase() extrapolates."""
    return f"round(increase({metric}{{{selector}}}[$__range]))"


def rare_in(metric: str, window: str, selector: str = TASK_SELECTOR) -> str:
    """Events of a rare-event counter in ``window``, the first one included, rounded.

    Its series appear with their first event, already at 1, and increase() only sees what follows
    a series' first sample: a series that did not exist at the window's start counts whole (the
    same as the CeleryTasksLost / CeleryTaskRedelivered rules)."""
    series = f"{metric}{{{selector}}}" if selector else metric
    return f"round(({series} unless {series} offset {window}) or increase({series}[{window}]))"


def or_none(expr: str, label: str = "name") -> str:
    """``expr``, or one 0 series labelled ``{label}="none"`` while it has no series at all (the
    counters of rare events exist only once one happened): a flat line, not "No data"."""
    return f'{expr} or on () label_replace(vector(0), "{label}", "none", "", "")'


STATES = ("sent", "received", "started", "succeeded", "failed", "retried", "revoked")  # rejected: rare, in Flower


# -- the overview ------------------------------------------------------------------------


def overview() -> model.Dashboard:
    latency = [threshold_row("latency", level="normal"), threshold_row("latency", level="heavy")]
    queue_normal, queue_peak = threshold_row("queue_length_normal"), threshold_row("queue_length_peak")
    retry = threshold_row("retry_rate", signal="retry_ratio")
    cpu, memory = threshold_row("worker_cpu"), threshold_row("worker_memory")
    runtime_limit = f"{DEFAULTS.thresholds.task_runtime_seconds.default:g} s"
    success = (f'sum(increase(celery_task_succeeded_total{{{TASK_SELECTOR}}}[$__range])) / '
               f'(sum(increase(celery_task_succeeded_total{{{TASK_SELECTOR}}}[$__range])) + '
               f'(sum(increase(celery_task_failed_total{{{TASK_SELECTOR}}}[$__range])) or vector(0)))')
    # A Beat entry is overdue when it has not run for longer than its period + grace: the
    # CeleryBeatEntryMissed rule's first case, from the same gauges.
    beat_key = "entry, task"
    overdue = (f"time() - max by ({beat_key}) (celery_beat_entry_last_run_timestamp_seconds) "
               f"> on ({beat_key}) min by ({beat_key}) "
               "(celery_beat_entry_period_seconds + celery_beat_entry_grace_seconds)")
    board = (
        dashboard(OVERVIEW_UID, "Celery", (
            "Celery tasks, queues and workers from celery-sidecar: counters for the selected range, "
            "throughput by state, task and queue, queue wait and runtime, queue length, where tasks are "
            "(waiting, running, stuck, lost, redelivered), retries, workers, periodic tasks (Beat) and the "
            "sidecar's own health. Threshold lines read the celery_threshold gauges, so they follow the "
            "sidecar's config. A task name in the task tables opens the per-task dashboard."))
        .links([link("Celery task", f"/d/{TASK_UID}", keep_time=True), link("Flower", "/flower/", blank=True)])
        .with_variable(datasource_variable())
        .with_variable(query_variable("queue", "Queue", "label_values(celery_queue_length, queue_name)"))
        .with_variable(query_variable("task", "Task", "label_values(celery_task_received_total, name)"))
        .with_variable(query_variable("hostname", "Worker", "label_values(celery_worker_up, hostname)"))

        .with_row(builders.Row("Overview"))
        .with_panel(stat_panel("Workers online", 'sum(celery_worker_up{hostname=~"$hostname"})',
                               steps=GOOD_WHEN_ANY))
        .with_panel(stat_panel("Workers offline", 'sum(1 - celery_worker_up{hostname=~"$hostname"})',
                               description="Known workers whose heartbeats stopped.", steps=BAD_WHEN_ANY))
        .with_panel(stat_panel("Tasks active", 'sum(celery_worker_tasks_active{hostname=~"$hostname"})'))
        .with_panel(stat_panel("Tasks received", f"sum({in_range('celery_task_received_total')})",
                               description="In the selected time range."))
        .with_panel(stat_panel("Tasks succeeded", f"sum({in_range('celery_task_succeeded_total')})"))
        .with_panel(stat_panel("Tasks failed", f"sum({in_range('celery_task_failed_total')})", steps=BAD_WHEN_ANY))
        .with_panel(stat_panel("Tasks retried", f"sum({in_range('celery_task_retried_total')})",
                               steps=NOTE_WHEN_ANY))
        .with_panel(stat_panel("Success rate", success, unit="percentunit", decimals=1,
                               steps=[(None, "red"), (0.9, "orange"), (0.99, "green")],
                               description="succeeded / (succeeded + failed) in the selected time range; "
                                           "a task without failures counts 0 failed."))

        .with_row(builders.Row("Throughput"))
        .with_panel(timeseries_panel(
            "Task throughput by state",
            [query(f"sum({rate(f'celery_task_{state}_total')})", state, ref) for ref, state in zip("ABCDEFG", STATES,
                                                                                                   strict=True)],
            unit="reqps", description="Events per second for each task state (rejected omitted: rare and shown "
                                      "in Flower)."))
        .with_panel(timeseries_panel("Succeeded by task", [
            query(f"sum by (name) ({rate('celery_task_succeeded_total')})", "{{name}}")], unit="reqps"))
        .with_panel(timeseries_panel("Failed by task and exception", [
            query(f"sum by (name, exception) ({rate('celery_task_failed_total')})", "{{name}}: {{exception}}")],
            unit="reqps"))
        .with_panel(timeseries_panel("Received by queue", [
            query(f"sum by (queue_name) ({rate('celery_task_received_total')})", "{{queue_name}}")], unit="reqps"))

        .with_row(builders.Row("Latency and runtime"))
        .with_panel(timeseries_panel(
            "Queue wait p95 vs thresholds",
            [query("histogram_quantile(0.95, sum by (le, task_class) "
                   '(rate(celery_task_latency_seconds_bucket{queue_name=~"$queue"}[$__rate_interval])))',
                   "p95 {{task_class}}"),
             *threshold_targets("latency")],
            unit="s", description=(
                "Time from sent (or received) to started, p95 per task class. Normal tasks should stay under the "
                f"normal threshold ({threshold_default('latency', latency[0])} by default), heavy ones under the "
                f"heavy threshold ({threshold_default('latency', latency[1])}); heavy_tasks / heavy_queues in the "
                "sidecar's config decide the class. Lines follow the sidecar's config.")))
        .with_panel(timeseries_panel("Runtime p95 by task", [
            query("histogram_quantile(0.95, sum by (le, name) "
                  f"({rate('celery_task_runtime_bucket')}))", "{{name}}")], unit="s"))
        .with_panel(heatmap_panel("Task runtime", f"sum by (le) (increase(celery_task_runtime_bucket"
                                                  f"{{{TASK_SELECTOR}}}[$__rate_interval]))",
                                  description="Distribution of task run times (started to done)."))
        .with_panel(heatmap_panel("Task queue wait", f"sum by (le) (increase(celery_task_queue_wait_time_bucket"
                                                     f"{{{TASK_SELECTOR}}}[$__rate_interval]))",
                                  description="Distribution of time spent queued."))

        .with_row(builders.Row("Queues"))
        .with_panel(timeseries_panel(
            "Queue length vs thresholds",
            [query('max by (queue_name) (celery_queue_length{queue_name=~"$queue"})', "{{queue_name}}"),
             *threshold_targets("queue_length_normal", refs="B"), *threshold_targets("queue_length_peak", refs="C")],
            unit="short", description=(
                "Messages waiting in each queue, against its normal "
                f"({threshold_default('queue_length_normal', queue_normal)} by default) and peak "
                f"({threshold_default('queue_length_peak', queue_peak)}) thresholds; queue_overrides in the "
                "sidecar's config set them per queue.")))
        .with_panel(timeseries_panel(
            "Workers per queue",
            [query('max by (queue_name) (celery_active_worker_count{queue_name=~"$queue"})',
                   "{{queue_name}} workers"),
             query('max by (queue_name) (celery_active_process_count{queue_name=~"$queue"})',
                   "{{queue_name}} processes", "B")],
            unit="short", description="Workers and pool processes consuming each queue (from worker inspection). "
                                      "A queue with messages but no workers is stuck."))

        .with_row(builders.Row("Where tasks are"))
        .with_panel(timeseries_panel(
            "Oldest waiting task vs latency thresholds",
            [query('max by (queue_name, task_class) (celery_queue_oldest_task_age_seconds{queue_name=~"$queue"})',
                   "{{queue_name}} ({{task_class}})"),
             *threshold_targets("latency")],
            unit="s", min_value=0, description=(
                "How long the oldest task sent to each queue and not started yet has waited (0: none waits), "
                "against the latency threshold of that task's class: normal "
                f"({threshold_default('latency', latency[0])} by default) or heavy "
                f"({threshold_default('latency', latency[1])}). A queue nobody consumes starts nothing, so it has "
                "no queue wait p95, but this keeps growing; CeleryTaskLatencyHigh fires on either. On Redis, a "
                "task sent before the sidecar started is timed from when the sidecar first saw it "
                "(celery_queue_oldest_task_age_lower_bound = 1): it is older than shown.")))
        .with_panel(timeseries_panel("Running tasks by task", [
            query('max by (name) (celery_task_running{name=~"$task"})', "{{name}}")],
            unit="short", min_value=0, description="Tasks started and not finished, per task name."))
        .with_panel(table_panel(
            "Running tasks",
            [query('max by (name) (celery_task_running{name=~"$task"})', "__auto", "A",
                   instant=True, fmt=PromQueryFormat.TABLE),
             query('max by (name) (celery_task_stuck{name=~"$task"})', "__auto", "B",
                   instant=True, fmt=PromQueryFormat.TABLE),
             query('max by (name) (celery_task_oldest_running_seconds{name=~"$task"})', "__auto", "C",
                   instant=True, fmt=PromQueryFormat.TABLE)],
            description=("Per task name, now: tasks running, how many of them are stuck (running past their "
                         f"runtime limit, thresholds.task_runtime_seconds: {runtime_limit} by default, overridable "
                         "per task), and how long the oldest has been running. Click a task to open its dashboard."),
            width=12, height=8, merge=True, sort_by="Oldest running", units={"Oldest running": "s"},
            task_link="Task",
            rename={"name": "Task", "Value #A": "Running", "Value #B": "Stuck", "Value #C": "Oldest running"}))
        .with_panel(timeseries_panel("Stuck tasks by task", [
            query('max by (name) (celery_task_stuck{name=~"$task"})', "{{name}}")],
            unit="short", min_value=0, description=(
                "Tasks running longer than their runtime limit (thresholds.task_runtime_seconds, "
                f"{runtime_limit} by default), per task name: CeleryTaskStuck fires on any.")))
        .with_panel(timeseries_panel(
            "Lost and redelivered by task",
            [query(or_none(f"sum by (name) ({rare_in('celery_task_lost_total', '$__rate_interval')})"),
                   "{{name}} lost"),
             query(or_none(f"sum by (name) ({rare_in('celery_task_redelivered_total', '$__rate_interval')})"),
                   "{{name}} redelivered", "B")],
            unit="short", min_value=0, description=(
                "Tasks per interval. Lost: started on a worker that went down, never finished (CeleryTasksLost). "
                "Redelivered: received a second time, not as a retry: the broker delivered it again after its "
                "worker was lost (acks_late) or, on Redis, after visibility_timeout (CeleryTaskRedelivered). "
                "'none' while nothing was ever lost or redelivered.")))
        .with_panel(timeseries_panel("Unacknowledged messages (Redis)", [
            query("max(celery_redis_unacked_tasks)", "unacked")],
            unit="short", width=6, min_value=0, description=(
                "Messages workers have taken and not acknowledged yet (kombu's unacked hash; Redis brokers "
                "only): prefetched and running tasks, and with acks_late those of a lost worker.")))
        .with_panel(timeseries_panel("Oldest unacknowledged message (Redis)", [
            query("max(celery_redis_unacked_oldest_age_seconds)", "oldest unacked")],
            unit="s", width=6, min_value=0, description=(
                "Age of the oldest unacknowledged message. Redis redelivers it once this passes the "
                "transport's visibility_timeout (1 h by default).")))

        .with_row(builders.Row("Retries"))
        .with_panel(timeseries_panel(
            "Retry rate vs threshold",
            [query('max by (name) (celery_task_retry_ratio{name=~"$task"})', "{{name}}"),
             *threshold_targets("retry_rate", signal=retry.signal)],
            unit="percentunit", description=(
                "retries / (retries + finished) over the sidecar's sliding window, per task, against the limit "
                f"({threshold_default('retry_rate', retry)} by default).")))
        .with_panel(timeseries_panel("Retries by task", [
            query(f"sum by (name) ({rate('celery_task_retried_total')})", "{{name}}")], unit="reqps"))

        .with_row(builders.Row("Workers"))
        .with_panel(
            statetimeline.Panel().title("Workers up/down").description("1 while heartbeats arrive.")
            .datasource(DATASOURCE).height(8).span(12)
            .with_target(query('max by (hostname) (celery_worker_up{hostname=~"$hostname"})', "{{hostname}}"))
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
        .with_panel(timeseries_panel("Pool utilization", [
            query('max by (hostname) (celery_worker_pool_utilization{hostname=~"$hostname"})', "{{hostname}}")],
            unit="percentunit", min_value=0, max_value=1, description="Busy pool processes / pool size."))
        .with_panel(timeseries_panel(
            "Worker CPU vs threshold",
            [query('max by (hostname) (celery_worker_cpu_percent{hostname=~"$hostname"})', "{{hostname}}"),
             *threshold_targets("worker_cpu")],
            unit="percent", min_value=0, description=(
                "From the worker plugin (celery_sidecar.plugin.ResourceUsage), % of the host, against the limit "
                f"({threshold_default('worker_cpu', cpu)} by default).")))
        .with_panel(timeseries_panel(
            "Worker memory vs threshold",
            [query('max by (hostname) (celery_worker_memory_percent{hostname=~"$hostname"})', "{{hostname}}"),
             *threshold_targets("worker_memory")],
            unit="percent", min_value=0, description=(
                "From the worker plugin, % of the host's memory, against the limit "
                f"({threshold_default('worker_memory', memory)} by default).")))
        .with_panel(timeseries_panel("Worker RSS", [
            query('max by (hostname) (celery_worker_rss_bytes{hostname=~"$hostname"})', "{{hostname}}")],
            unit="bytes"))
        .with_panel(timeseries_panel("Active tasks per worker", [
            query('max by (hostname) (celery_worker_tasks_active{hostname=~"$hostname"})', "{{hostname}}")],
            unit="short"))

        .with_row(builders.Row("Top tasks"))
        .with_panel(table_panel(
            "Top tasks",
            [query(f"topk(15, sum by (name) ({in_range('celery_task_succeeded_total')}))", "__auto", "A",
                   instant=True, fmt=PromQueryFormat.TABLE),
             query(f"sum by (name) ({in_range('celery_task_failed_total')})", "__auto", "B",
                   instant=True, fmt=PromQueryFormat.TABLE),
             query(f"sum by (name) ({in_range('celery_task_retried_total')})", "__auto", "C",
                   instant=True, fmt=PromQueryFormat.TABLE),
             query("histogram_quantile(0.95, sum by (le, name) "
                   f"(increase(celery_task_runtime_bucket{{{TASK_SELECTOR}}}[$__range])))", "__auto", "D",
                   instant=True, fmt=PromQueryFormat.TABLE)],
            description="Per task name in the selected time range. Click a task to open its dashboard.",
            width=14, merge=True, sort_by="Succeeded", units={"Runtime p95": "s"}, task_link="Task",
            rename={"name": "Task", "Value #A": "Succeeded", "Value #B": "Failed", "Value #C": "Retried",
                    "Value #D": "Runtime p95"}))
        .with_panel(table_panel(
            "Top exceptions",
            [query(f"topk(15, sum by (name, exception) ({in_range('celery_task_failed_total')}))", "__auto",
                   instant=True, fmt=PromQueryFormat.TABLE)],
            description="Failures per task and exception class in the selected time range. Click a task to open "
                        "its dashboard.",
            width=10, sort_by="Failures", task_link="Task",
            rename={"name": "Task", "exception": "Exception", "Value": "Failures"}))

        .with_row(builders.Row("Periodic tasks (Beat)"))
        .with_panel(stat_panel("Beat down", "max(celery_beat_down)", steps=BAD_WHEN_ANY, width=6,
                               description="1 while Beat looks down: two entries (a lone entry: two of its due "
                                           "times) missed since the last run of any entry (CeleryBeatNotScheduling)."))
        .with_panel(stat_panel("Beat entries", f"count(max by ({beat_key}) (celery_beat_entry_period_seconds)) "
                               "or vector(0)", width=6,
                               description="Schedule entries watched: the app's beat_schedule (with --app) and the "
                                           "beat: section of the sidecar's config."))
        .with_panel(stat_panel("Entries overdue", f"count({overdue}) or vector(0)", steps=BAD_WHEN_ANY, width=6,
                               description="Entries that have not run for longer than their period + grace "
                                           "(CeleryBeatEntryMissed)."))
        .with_panel(stat_panel("Missed runs", f"sum({rare_in('celery_beat_entry_missed_total', '$__range', '')}) "
                               "or vector(0)", steps=NOTE_WHEN_ANY, width=6,
                               description="Due times that passed without a run, in the selected time range."))
        .with_panel(table_panel(
            "Beat entries",
            [query(f"max by ({beat_key}) (celery_beat_entry_last_run_timestamp_seconds) * 1000", "__auto", "A",
                   instant=True, fmt=PromQueryFormat.TABLE),
             query(f"max by ({beat_key}) (celery_beat_entry_next_due_timestamp_seconds) * 1000", "__auto", "B",
                   instant=True, fmt=PromQueryFormat.TABLE),
             query(f"max by ({beat_key}) ({rare_in('celery_beat_entry_missed_total', '$__range', '')})", "__auto",
                   "C", instant=True, fmt=PromQueryFormat.TABLE),
             query(f"max by ({beat_key}) (celery_beat_entry_late_seconds)", "__auto", "D",
                   instant=True, fmt=PromQueryFormat.TABLE),
             query(f"max by ({beat_key}) (celery_beat_entry_period_seconds)", "__auto", "E",
                   instant=True, fmt=PromQueryFormat.TABLE),
             query(f"max by ({beat_key}) (celery_beat_entry_grace_seconds)", "__auto", "F",
                   instant=True, fmt=PromQueryFormat.TABLE)],
            description=("Each Beat schedule entry: its last run (empty until one is seen), when the next is due, "
                         "the due times missed in the selected time range, how late the last run came, and the "
                         "period and grace a run is judged by. Click a task to open its dashboard."),
            width=24, merge=True, sort_by="Missed", task_link="Task",
            units={"Last run": "dateTimeFromNow", "Next due": "dateTimeFromNow", "Late": "s", "Period": "s",
                   "Grace": "s"},
            rename={"entry": "Entry", "task": "Task", "Value #A": "Last run", "Value #B": "Next due",
                    "Value #C": "Missed", "Value #D": "Late", "Value #E": "Period", "Value #F": "Grace"}))
        .with_panel(timeseries_panel(
            "Time since last run vs period + grace",
            [query("time() - max by (entry) (celery_beat_entry_last_run_timestamp_seconds)", "{{entry}}"),
             query("max by (entry) (celery_beat_entry_period_seconds + celery_beat_entry_grace_seconds)",
                   f"{{{{entry}}}} {THRESHOLD_LEGEND}", "B")],
            unit="s", min_value=0, description=(
                "Per entry seen running: time since its last run, against its period + grace (dashed). Above "
                "the line, a run was missed: CeleryBeatEntryMissed fires.")))
        .with_panel(timeseries_panel("Lateness of the last run", [
            query("max by (entry) (celery_beat_entry_late_seconds)", "{{entry}}")],
            unit="s", min_value=0, description="How long after its due time each entry's last run came."))

        .with_row(builders.Row("Sidecar"))
        .with_panel(stat_panel("Broker connected", "min(celery_sidecar_broker_connected)", steps=GOOD_WHEN_ANY,
                               width=6))
        .with_panel(stat_panel("Workers without task events",
                               'sum(1 - celery_sidecar_worker_task_events_enabled{hostname=~"$hostname"})',
                               description="Workers sending heartbeats but no task events: start them with -E.",
                               steps=BAD_WHEN_ANY, width=6))
        .with_panel(stat_panel("Reconnects", "sum(round(increase(celery_sidecar_reconnects_total[$__range])))",
                               steps=NOTE_WHEN_ANY, width=6))
        .with_panel(stat_panel("Latency source", "max by (source) (celery_sidecar_latency_source) == 1",
                               legend="{{source}}", unit="none", width=6, text_mode=common.BigValueTextMode.NAME,
                               description="Which timestamp queue wait is measured from: 'sent' needs "
                                           "task_send_sent_event=True."))
        .with_panel(timeseries_panel("Events consumed", [
            query("sum by (type) (rate(celery_sidecar_events_total[$__rate_interval]))", "{{type}}")],
            unit="reqps", width=24))
    )
    return finish(board)


# -- the per-task dashboard ----------------------------------------------------------------


def task_dashboard() -> model.Dashboard:
    latency = [threshold_row("latency", level="normal"), threshold_row("latency", level="heavy")]
    retry = threshold_row("retry_rate", signal="retry_ratio")
    # One line per latency level, shown only while a selected (task, queue) is of that class:
    # celery_task_class says which class the sidecar judges the task by.
    class_lines = [
        query(f"{threshold_expr(row)} and on () count(celery_task_class{{{TASK_SELECTOR}, "
              f'task_class="{row.level}"}})', f"{THRESHOLD_LEGEND} {row.level}", ref)
        for ref, row in zip("CD", latency, strict=True)
    ]
    success = (f'sum(increase(celery_task_succeeded_total{{{TASK_SELECTOR}}}[$__range])) / '
               f'(sum(increase(celery_task_succeeded_total{{{TASK_SELECTOR}}}[$__range])) + '
               f'(sum(increase(celery_task_failed_total{{{TASK_SELECTOR}}}[$__range])) or vector(0)))')
    runtime_limit = f"{DEFAULTS.thresholds.task_runtime_seconds.default:g} s"
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

        .with_row(builders.Row("$task"))
        .with_panel(stat_panel("Received", f"sum({in_range('celery_task_received_total')})", width=4,
                               description="In the selected time range."))
        .with_panel(stat_panel("Succeeded", f"sum({in_range('celery_task_succeeded_total')})", width=4))
        .with_panel(stat_panel("Failed", f"sum({in_range('celery_task_failed_total')})", steps=BAD_WHEN_ANY,
                               width=4))
        .with_panel(stat_panel("Retried", f"sum({in_range('celery_task_retried_total')})", steps=NOTE_WHEN_ANY,
                               width=4))
        .with_panel(stat_panel("Success rate", success, unit="percentunit", decimals=1, width=4,
                               steps=[(None, "red"), (0.9, "orange"), (0.99, "green")],
                               description="succeeded / (succeeded + failed) in the selected time range."))
        .with_panel(stat_panel("Task class", f"max by (task_class) (celery_task_class{{{TASK_SELECTOR}}})",
                               legend="{{task_class}}", unit="none", width=4, text_mode=common.BigValueTextMode.NAME,
                               description="normal or heavy: which latency threshold the sidecar judges this task "
                                           "by (heavy_tasks / heavy_queues in its config)."))

        .with_row(builders.Row("Running, stuck and lost"))
        .with_panel(stat_panel("Running", 'max(celery_task_running{name=~"$task"}) or vector(0)', width=4,
                               description="Tasks of this name started and not finished, now."))
        .with_panel(stat_panel("Stuck", 'max(celery_task_stuck{name=~"$task"}) or vector(0)', steps=BAD_WHEN_ANY,
                               width=4, description=(
                                   "Running longer than the task's runtime limit (thresholds.task_runtime_seconds: "
                                   f"{runtime_limit} by default, overridable per task): CeleryTaskStuck.")))
        .with_panel(stat_panel("Oldest running", 'max(celery_task_oldest_running_seconds{name=~"$task"}) or vector(0)',
                               unit="s", width=4, description="How long the longest-running one has run so far."))
        .with_panel(stat_panel("Lost", f"sum({rare_in('celery_task_lost_total', '$__range')}) or vector(0)",
                               steps=BAD_WHEN_ANY, width=6, description=(
                                   "In the selected time range: started on a worker that went down, never "
                                   "finished (CeleryTasksLost).")))
        .with_panel(stat_panel("Redelivered", f"sum({rare_in('celery_task_redelivered_total', '$__range')}) "
                               "or vector(0)", steps=NOTE_WHEN_ANY, width=6, description=(
                                   "In the selected time range: received a second time, not as a retry "
                                   "(CeleryTaskRedelivered). It ran again: it must be idempotent.")))
        .with_panel(timeseries_panel(
            "Running and stuck",
            [query('max(celery_task_running{name=~"$task"}) or vector(0)', "running"),
             query('max(celery_task_stuck{name=~"$task"}) or vector(0)', "stuck", "B")],
            unit="short", min_value=0, description="Tasks of this name running, and those of them past the "
                                                   "runtime limit."))
        .with_panel(timeseries_panel(
            "Oldest running",
            [query('max(celery_task_oldest_running_seconds{name=~"$task"})', "oldest running")],
            unit="s", min_value=0, description=(
                "How long the longest-running task of this name has run so far (empty while none runs); "
                f"past its runtime limit ({runtime_limit} by default) it is stuck.")))

        .with_row(builders.Row("Throughput and failures"))
        .with_panel(timeseries_panel(
            "Throughput by state",
            [query(f"sum({rate(f'celery_task_{state}_total')})", state, ref) for ref, state in zip("ABCDEFG", STATES,
                                                                                                   strict=True)],
            unit="reqps", width=8, description="Events per second for each task state."))
        .with_panel(timeseries_panel("Failures by exception", [
            query(f"sum by (exception) ({rate('celery_task_failed_total')})", "{{exception}}")],
            unit="reqps", width=8, description="Failures per second, by exception class."))
        .with_panel(table_panel(
            "Exceptions",
            [query(f"sum by (exception) ({in_range('celery_task_failed_total')})", "__auto",
                   instant=True, fmt=PromQueryFormat.TABLE)],
            description="Failures by exception class in the selected time range.", width=8, height=8,
            sort_by="Failures",
            rename={"exception": "Exception", "Value": "Failures"}))

        .with_row(builders.Row("Runtime and queue wait"))
        .with_panel(timeseries_panel(
            "Runtime p50 / p95 / p99",
            [query(f"histogram_quantile({q}, sum by (le) ({rate('celery_task_runtime_bucket')}))", f"p{p}", ref)
             for ref, q, p in (("A", "0.5", "50"), ("B", "0.95", "95"), ("C", "0.99", "99"))],
            unit="s", description="Run time (started to done) quantiles, from celery_task_runtime."))
        .with_panel(timeseries_panel(
            "Queue wait vs latency threshold",
            [query(f"histogram_quantile(0.5, sum by (le) ({rate('celery_task_queue_wait_time_bucket')}))", "p50"),
             query(f"histogram_quantile(0.95, sum by (le) ({rate('celery_task_queue_wait_time_bucket')}))", "p95",
                   "B"),
             *class_lines],
            unit="s", description=(
                "Time from sent (or received) to started, against the latency threshold of the task's class: "
                f"normal ({threshold_default('latency', latency[0])} by default) or heavy "
                f"({threshold_default('latency', latency[1])}). The sidecar's latency alert judges the p95 of "
                "the whole class; this is the task's own share of it.")))

        .with_row(builders.Row("Retries"))
        .with_panel(timeseries_panel(
            "Retry ratio vs threshold",
            [query('max by (name) (celery_task_retry_ratio{name=~"$task"})', "{{name}}"),
             *threshold_targets("retry_rate", signal=retry.signal)],
            unit="percentunit", description=(
                "retries / (retries + finished) over the sidecar's sliding window, against the limit "
                f"({threshold_default('retry_rate', retry)} by default).")))
        .with_panel(timeseries_panel("Retries", [
            query(f"sum({rate('celery_task_retried_total')})", "retried")], unit="reqps",
            description="Retries per second."))

        .with_row(builders.Row("Workers"))
        .with_panel(table_panel(
            "Workers running this task",
            [query(f"sum by (hostname) ({in_range('celery_task_received_total')})", "__auto", "A",
                   instant=True, fmt=PromQueryFormat.TABLE),
             query(f"sum by (hostname) ({in_range('celery_task_succeeded_total')})", "__auto", "B",
                   instant=True, fmt=PromQueryFormat.TABLE),
             query(f"sum by (hostname) ({in_range('celery_task_failed_total')})", "__auto", "C",
                   instant=True, fmt=PromQueryFormat.TABLE),
             query("max by (hostname) (celery_worker_up) and on (hostname) "
                   f"sum by (hostname) (celery_task_received_total{{{TASK_SELECTOR}}})", "__auto", "D",
                   instant=True, fmt=PromQueryFormat.TABLE)],
            description="Workers that received this task in the selected time range, and whether they are up.",
            width=12, height=8, merge=True, sort_by="Received",
            rename={"hostname": "Worker", "Value #A": "Received", "Value #B": "Succeeded", "Value #C": "Failed",
                    "Value #D": "Up"}))
        .with_panel(timeseries_panel("Received per worker", [
            query(f"sum by (hostname) ({rate('celery_task_received_total')})", "{{hostname}}")], unit="reqps"))
    )
    return finish(board)


# -- output --------------------------------------------------------------------------------


def to_json(dashboard_model: model.Dashboard) -> str:
    """The file's text: the SDK's own serialisation, keys sorted, two-space indent."""
    return json.dumps(dashboard_model, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def dashboards() -> dict[str, str]:
    """{file name under grafana/dashboards/: JSON text} for every shipped dashboard."""
    return {OVERVIEW_FILE: to_json(overview()), TASK_FILE: to_json(task_dashboard())}

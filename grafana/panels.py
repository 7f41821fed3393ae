"""Building blocks of the dashboards: panels, queries and thresholds, each built one way.

Every threshold line is a ``celery_threshold`` query built from a row of the signal table
(monitor/signals.py), never typed here, so the graphs compare against exactly what the alerts
compare against. Every other series is selected through ``dedup`` (or ``rate``, ``increase``,
``in_range``, ``rare_in``, which use it), so a panel means the same with one sidecar or two
scraped by one Prometheus (docs/deploy.md, "HA: two sidecars"). Build-time only, like the rest
of the generator (grafana/dashboards.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import heatmap as heatmap_model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat, QueryEditorMode

from celery_sidecar.monitor.config.dashboard_links import DATASOURCE_UID, TASK_UID
from celery_sidecar.monitor.config.settings import Config
from celery_sidecar.monitor.signals import BY_RULE, Threshold, format_value

OVERVIEW_FILE = "celery-sidecar.json"
TASK_FILE = "celery-sidecar-task.json"

DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
DEFAULTS = Config()  # only for the numbers quoted in descriptions; the lines read the live gauges
TASK_SELECTOR = 'name=~"$task", queue_name=~"$queue"'
NAME_SELECTOR = 'name=~"$task"'
QUEUE_SELECTOR = 'queue_name=~"$queue"'
HOSTNAME_SELECTOR = 'hostname=~"$hostname"'
THRESHOLD_LEGEND = "threshold"  # legends with this word get the dashed red threshold style

Step = tuple[float | None, str]  # (value, color) of a stat's color thresholds; None: the base


# -- one series across sidecars --------------------------------------------------------------

# The labels each family carries as the sidecar exports it (docs/metrics.md; tests/test_dashboards.py
# holds this to what /metrics serves). They are a series' identity: two sidecars watching one
# broker export the same series, and Prometheus tells their copies apart only by the labels of the
# target it scraped (instance and job; pod, namespace, service, endpoint, container under the
# Prometheus Operator). Aggregating by these keeps every label of the series and drops whatever
# the scrape added, whatever the scrape config is.
OWN_LABELS: dict[str, tuple[str, ...]] = {
    **{f"celery_task_{state}_total": ("name", "hostname", "queue_name")
       for state in ("sent", "received", "started", "succeeded", "retried", "rejected", "revoked")},
    "celery_task_failed_total": ("name", "hostname", "queue_name", "exception"),
    "celery_task_runtime": ("name", "hostname", "queue_name"),
    "celery_task_queue_wait_time": ("name", "hostname", "queue_name"),
    "celery_task_latency_seconds": ("queue_name", "task_class"),
    "celery_task_class": ("name", "queue_name", "task_class"),
    "celery_task_retry_ratio": ("name",),
    "celery_task_running": ("name",),
    "celery_task_oldest_running_seconds": ("name",),
    "celery_task_stuck": ("name",),
    "celery_task_lost_total": ("name", "queue_name"),
    "celery_task_redelivered_total": ("name", "queue_name"),
    "celery_task_end_unseen_total": ("name", "queue_name"),
    **{f"celery_worker_{gauge}": ("hostname",)
       for gauge in ("up", "tasks_active", "pool_utilization", "cpu_percent", "memory_percent", "rss_bytes")},
    "celery_sidecar_worker_task_events_enabled": ("hostname",),
    "celery_queue_length": ("queue_name",),
    "celery_queue_oldest_task_age_seconds": ("queue_name", "task_class"),
    "celery_queue_oldest_task_age_lower_bound": ("queue_name",),
    "celery_active_worker_count": ("queue_name",),
    "celery_active_process_count": ("queue_name",),
    "celery_redis_unacked_tasks": (),
    "celery_redis_unacked_oldest_age_seconds": (),
    **{f"celery_beat_entry_{gauge}": ("entry", "task")
       for gauge in ("last_run_timestamp_seconds", "next_due_timestamp_seconds", "missed_total", "late_seconds",
                     "period_seconds", "grace_seconds")},
    "celery_beat_down": (),
    "celery_threshold": ("level", "queue_name", "signal"),
    "celery_sidecar_broker_connected": (),
    "celery_sidecar_reconnects_total": (),
    "celery_sidecar_latency_source": ("source",),
    "celery_sidecar_events_total": ("type",),
    "celery_sidecar_task_events_expected_fleet_total": (),
    "celery_sidecar_task_events_missed_fleet_total": (),
    **{f"celery_queue_{gauge}": ("queue_name",)
       for gauge in ("tasks_reserved", "tasks_scheduled", "tasks_running", "capacity", "pressure", "workers_desired",
                     "pool_size", "arrival_rate", "task_runtime_median_seconds", "latency_threshold_seconds")},
    "celery_worker_consuming": ("hostname", "queue_name"),
}
HISTOGRAM_SERIES = {"bucket": ("le",), "sum": (), "count": ()}


def own_labels(series: str) -> tuple[str, ...]:
    """The labels ``series`` carries as exported; a histogram's ``_bucket`` adds ``le``."""
    if series in OWN_LABELS:
        return OWN_LABELS[series]
    family, _, part = series.rpartition("_")
    if family in OWN_LABELS and part in HISTOGRAM_SERIES:
        return OWN_LABELS[family] + HISTOGRAM_SERIES[part]
    raise KeyError(f"{series}: add its family's labels to OWN_LABELS (docs/metrics.md lists them)")


def selected(series: str, selector: str = "") -> str:
    return f"{series}{{{selector}}}" if selector else series


def dedup(series: str, expr: str | None = None, *, selector: str = "", by: tuple[str, ...] | None = None) -> str:
    """``expr`` (default: ``series`` itself) of one family's series, once per series however many
    sidecars export it: ``max`` by the family's own labels.

    Both sidecars fold the same event stream, so their copies agree; where one missed events, its
    counts are the lower ones, and ``max`` of the per-sidecar rate or increase is the more complete
    sidecar's. For gauges, ``max`` means a worker is down only when no sidecar hears it, and a
    queue's length, age or stuck tasks are the higher reading. ``by`` narrows the grouping further
    (a panel's own ``max by``), never to a label the series does not carry."""
    labels = own_labels(series)
    if by is not None:
        assert set(by) <= set(labels), f"{series}: {by} are not all its own labels {labels}"
        labels = by
    inner = selected(series, selector) if expr is None else expr
    return f"max by ({', '.join(labels)}) ({inner})" if labels else f"max({inner})"


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


RowOfPanels = tuple[builders.Row, list[cogbuilder.Builder[model.Panel]]]


def assemble(board: builders.Dashboard, rows: Iterable[RowOfPanels]) -> model.Dashboard:
    """``board`` with each row and then its panels, in order: the SDK lays the grid out as they come."""
    for row, panels in rows:
        board = board.with_row(row)
        for panel in panels:
            board = board.with_panel(panel)
    return finish(board)


def rate(metric: str, selector: str = TASK_SELECTOR, window: str = "$__rate_interval") -> str:
    """Per second, per series: each sidecar's rate, then ``dedup``'s ``max`` of them."""
    return dedup(metric, f"rate({selected(metric, selector)}[{window}])")


def increase(metric: str, selector: str = TASK_SELECTOR, window: str = "$__rate_interval") -> str:
    return dedup(metric, f"increase({selected(metric, selector)}[{window}])")


def in_range(metric: str, selector: str = TASK_SELECTOR) -> str:
    """Events in the selected time range, per series, rounded: increase() extrapolates."""
    return f"round({increase(metric, selector, '$__range')})"


def rare_in(metric: str, window: str, selector: str = TASK_SELECTOR) -> str:
    """Events of a rare-event counter in ``window``, the first one included, per series, rounded.

    Its series appear with their first event, already at 1, and increase() only sees what follows
    a series' first sample: a series that did not exist at the window's start counts whole (the
    same as the CeleryTasksLost / CeleryTaskRedelivered rules). That is told per sidecar (a
    restarted sidecar's series are new to it), and then deduplicated."""
    series = selected(metric, selector)
    return f"round({dedup(metric, f'({series} unless {series} offset {window}) or increase({series}[{window}])')})"


def or_none(expr: str, label: str = "name") -> str:
    """``expr``, or one 0 series labelled ``{label}="none"`` while it has no series at all (the
    counters of rare events exist only once one happened): a flat line, not "No data"."""
    return f'{expr} or on () label_replace(vector(0), "{label}", "none", "", "")'


STATES = ("sent", "received", "started", "succeeded", "failed", "retried", "revoked")  # rejected: rare, in Flower
# A task that never failed has no failed series: "or vector(0)" makes that 0 failed, not no data.
SUCCESS_RATE = (f"sum({increase('celery_task_succeeded_total', window='$__range')}) / "
                f"(sum({increase('celery_task_succeeded_total', window='$__range')}) + "
                f"(sum({increase('celery_task_failed_total', window='$__range')}) or vector(0)))")
SUCCESS_STEPS: list[Step] = [(None, "red"), (0.9, "orange"), (0.99, "green")]
RUNTIME_LIMIT = f"{DEFAULTS.thresholds.task_runtime_seconds.default:g} s"


def latency_rows() -> tuple[Threshold, Threshold]:
    """The latency threshold rows: (normal, heavy)."""
    return threshold_row("latency", level="normal"), threshold_row("latency", level="heavy")


def table_query(expr: str, ref: str = "A") -> prometheus.Dataquery:
    """An instant query in table format, one row per series (a merged table names its column ``Value #<ref>``)."""
    return query(expr, "__auto", ref, instant=True, fmt=PromQueryFormat.TABLE)


def throughput_by_state() -> list[prometheus.Dataquery]:
    return [query(f"sum({rate(f'celery_task_{state}_total')})", state, ref)
            for ref, state in zip("ABCDEFG", STATES, strict=True)]

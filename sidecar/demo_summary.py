"""What the demo draws: the live summary, redrawn every second on a terminal, and the final
summary every run ends with (all a piped run shows besides its status lines)."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from celery_sidecar.alerts.engine import AlertEngine
from celery_sidecar.monitor.config.settings import Config
from celery_sidecar.monitor.signals import BY_RULE
from celery_sidecar.monitor.view import Snapshot

if TYPE_CHECKING:
    from celery_sidecar.demo import _AlertLog

HOST_WIDTH_CAP = 40  # longer worker hostnames are cut so the columns stay put


def raised_thresholds(engine: AlertEngine | None) -> set[tuple[str, str]]:
    """The (rule, subject) threshold alerts the engine has raised and not yet resolved."""
    if engine is None:
        return set()
    # A copy: the ticker thread adds and removes breaches while this reads them.
    return {key for key, breach in dict(engine.breaches).items() if breach.firing_key}


def summary(config: Config, snap: Snapshot, elapsed: float, sent: int, alerts: list[str],
            firing: Collection[tuple[str, str]] = ()) -> str:
    """The live summary: workers, queues, latency and retry rate against thresholds.

    ``firing`` holds the (rule, subject) threshold alerts the alert engine has raised.
    """
    t = config.thresholds
    intake = snap.intake
    events = sum(intake.events_by_type.values())
    p95 = snap.latency_p95
    flag = {True: "!!", False: "ok"}
    lines = [
        f"celery-sidecar demo  {elapsed:5.0f}s  tasks sent {sent}  events {events}  "
        f"broker {'connected' if intake.connected else 'DISCONNECTED'}  latency from task-"
        f"{intake.latency_source}",
        "",
        *_workers(config, snap),
    ]
    # Each header is formatted with its rows' widths, so the columns stay aligned.
    lines += ["", f"{'QUEUES':<14} {'length':>6}  {'normal/peak':>11}      {'oldest waiting':>14} (threshold)"]
    for queue, reading in sorted(snap.queues.items()):
        limits = config.queue_thresholds(queue)
        age = snap.queue_ages.get(queue)
        wait, wait_limit = (age.seconds, getattr(t.latency_seconds, age.task_class)) if age else (0.0, 0.0)
        lines.append(f"  {_fit(queue, 12):<12} {reading.length:>6}  {f'{limits.normal}/{limits.peak}':>11} "
                     f"{flag[reading.length > limits.normal]}  {wait:>13.1f}s (< {wait_limit:g}s) "
                     f"{flag[wait > wait_limit] if age else ''}")
    lines += ["", *_pressure(snap)]
    lines += ["", f"{'RUNNING':<18} {'now':>4}  {'longest so far':>14}  stuck (past its limit)"]
    for name, running in sorted(snap.running.items()):
        lines.append(f"  {_fit(name, 16):<16} {running.running:>4}  {running.oldest_seconds:>13.1f}s  "
                     f"{running.stuck:>5} {flag[running.stuck > 0]}")
    lines += ["", f"{'PERIODIC (Beat)':<18} {'last run':>10}   {'next due':<14}  {'late':>6}  {'missed':>6}"]
    for entry in snap.beat:
        last = "never" if entry.last_run is None else f"{snap.at - entry.last_run:.0f}s ago"
        lines.append(f"  {_fit(entry.entry, 16):<16} {last:>10}   {due_in(entry.next_due - snap.at):<14}  "
                     f"{entry.late:>5.1f}s  {entry.missed_total:>6}  {flag[entry.missing_since is not None]}")
    if snap.beat_down_since is not None:
        lines.append("  !! Beat is not scheduling")
    lines += ["", "LATENCY (p95 queue wait)"]
    for task_class, limit in (("normal", t.latency_seconds.normal), ("heavy", t.latency_seconds.heavy)):
        value = p95.get(task_class)
        verdict = "" if value is None else flag[value > limit]
        lines.append(f"  {task_class:<8} {_num(value, 's'):>8}  threshold {limit:g}s  {verdict}")
    lines += ["", *_retry_rates(config, snap, firing)]
    lines += ["", "RECENT ALERTS (console)"]
    lines += [f"  {line}" for line in alerts] or ["  none"]
    lines += ["", "Ctrl-C to stop"]
    return "\n".join(lines)


def _pressure(snap: Snapshot) -> list[str]:
    """Each queue's whole demand (the broker's list hides what workers prefetched) against its
    capacity, and the workers it needs (docs/autoscaling.md)."""
    lines = [f"{'PRESSURE':<14} {'waiting':>7} {'reserved':>8} {'running':>7}  {'capacity':>8}  "
             f"{'pressure':>8}  {'workers':>7} {'desired':>7}"]
    for queue, load in sorted(snap.loads.items()):
        pressure = "inf" if load.pressure == float("inf") else f"{load.pressure:.2f}"
        lines.append(f"  {_fit(queue, 12):<12} {load.waiting:>7} {load.reserved:>8} {load.running:>7}  "
                     f"{load.capacity:>8}  {pressure:>8}  {load.workers:>7} {load.workers_desired:>7}")
    return lines


def _workers(config: Config, snap: Snapshot) -> list[str]:
    """The WORKERS table: one width per column for the header and every row."""
    t = config.thresholds
    host = min(max([len(w.hostname) for w in snap.workers] + [len("WORKERS") - 2]), HOST_WIDTH_CAP)
    cpu_head, mem_head = f"cpu% (< {t.worker_cpu_percent:g})", f"mem% (< {t.worker_memory_percent:g})"
    cpu, mem = max(len(cpu_head), 9), max(len(mem_head), 9)  # 9: "100.0 !!"
    lines = [f"{'WORKERS':<{host + 2}}  {'state':<5}  {'active/pool':>11}  {cpu_head:>{cpu}}  {mem_head:>{mem}}"]
    for w in snap.workers:
        usage = [_usage(value, limit, w.alive) for value, limit in
                 ((w.cpu_percent, t.worker_cpu_percent), (w.memory_percent, t.worker_memory_percent))]
        pool = f"{w.active}/{w.pool_max or '?'}"
        lines.append(f"  {_fit(w.hostname, host):<{host}}  {'up' if w.alive else 'DOWN':<5}  "
                     f"{pool:>11}  {usage[0]:>{cpu}}  {usage[1]:>{mem}}")
    return lines


def _usage(value: float | None, limit: float, alive: bool) -> str:
    # The worker_cpu / worker_memory rules judge live workers only (monitor/signals.py).
    if value is None:
        return "-"
    return f"{value:.1f} {'!!' if alive and value > limit else 'ok'}"


def _retry_rates(config: Config, snap: Snapshot, firing: Collection[tuple[str, str]]) -> list[str]:
    """Retry rate per task, marked as the retry_rate alert rule judges it."""
    t = config.thresholds
    rule = config.alerts.rules.rule("retry_rate")
    signal = BY_RULE["retry_rate"]
    # The rule's own reading: it leaves out task names with too few outcomes to judge.
    judged = {reading.subject: reading for reading in signal.read(snap, config)}
    lines = [f"RETRY RATE (last {config.state.retry_window_seconds:g}s, threshold {t.retry_rate_percent:g}%, "
             f"judged from {t.retry_rate_min_outcomes} outcomes)"]
    for name, (hits, total) in sorted(snap.retries.items()):
        ratio = hits / total if total else 0.0
        reading = judged.get(name)
        if not rule.enabled:
            verdict = "(alert rule off)"
        elif reading is None:
            verdict = "(too few outcomes to judge)"
        elif reading.value <= reading.limit:
            verdict = "ok"
        elif (signal.rule, name) in firing:
            verdict = "!! alert raised"
        else:
            verdict = f"!! over (alert after {rule.for_seconds:g}s)"
        lines.append(f"  {_fit(name, 16):<16} {ratio:>6.1%}  {f'({hits}/{total})':>9}  {verdict}")
    return lines


def due_in(seconds: float) -> str:
    """When a Beat entry is next due, ``seconds`` from now; never a negative "in"."""
    whole = round(seconds)
    if whole > 0:
        return f"in {whole}s"
    return "due now" if whole == 0 else f"overdue by {-whole}s"


def final_summary(snap: Snapshot, elapsed: float, sent: int, alert_log: _AlertLog, private: bool,
                  alerts_logged: bool) -> str:
    """What ran and what it raised: the end of every run, and all a piped run shows besides status lines."""
    events = snap.intake.events_by_type
    outcomes = ", ".join(f"{events.get(f'task-{kind}', 0)} {kind}" for kind in ("succeeded", "failed", "retried"))
    raised = sum(alert_log.raised.values())
    kinds = ", ".join(f"{count} {kind}" for kind, count in alert_log.raised.most_common())
    beat = "; ".join(
        f"{e.entry}: {'never ran' if e.last_run is None else f'last ran {snap.at - e.last_run:.0f} s before the end'}"
        f", missed {e.missed_total}" for e in snap.beat)
    alerts = f"alerts raised: {raised}" + (f" ({kinds})" if kinds else "")
    if alert_log.resolved:
        alerts += f", {alert_log.resolved} resolved"
    if alerts_logged and (raised or alert_log.resolved):
        alerts += "; each is in the log on stderr"
    return "\n".join([
        f"demo summary: ran {elapsed:.0f} s on {'a private Redis' if private else 'the given broker'}: "
        f"a worker, Beat, a producer ({sent} tasks sent) and the sidecar ({sum(events.values())} events)",
        f"  task outcomes: {outcomes}; {len(snap.stuck)} stuck at the end",
        f"  periodic entries: {beat or 'none'}",
        f"  {alerts}",
    ])


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _num(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.1f}{unit}"

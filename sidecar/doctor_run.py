"""The doctor's runner and checklist: every check runs, whatever the others found, and each
prints its lines with a verdict word, the fix under each failure, and no secret."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import click

from celery_sidecar import doctor_checks as stack
from celery_sidecar import doctor_integrations as integrations
from celery_sidecar.doctor_model import Check, CheckError, DoctorSettings, Masker, Result, fail

# (name for a line if the check itself breaks, check), in the order the lines are printed.
CHECKS: tuple[tuple[str, Check], ...] = (
    ("nginx answers", stack.nginx_answers),
    ("Flower behind nginx", stack.flower_login),
    ("nothing internal through nginx without credentials", stack.internals_hidden),
    ("Prometheus targets", stack.prometheus_targets),
    ("Prometheus rules", stack.prometheus_rules),
    ("sidecar /health", stack.sidecar),
    ("sidecar not on a public address", stack.sidecar_exposure),
    ("Grafana refuses requests without credentials", integrations.grafana_anonymous),
    ("Grafana dashboards", integrations.grafana_dashboards),
    ("Slack", integrations.slack),
)

MARKS = {"ok": ("OK", "green"), "fail": ("FAIL", "red"), "skip": ("SKIP", "yellow")}


def run_checks(settings: DoctorSettings, checks: tuple[tuple[str, Check], ...] = CHECKS) -> list[Result]:
    """Every check's lines, in order. They run side by side, so the slowest check (a host that
    does not answer, up to the timeout) sets the run time, not the sum of them."""
    with ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="doctor") as pool:
        futures = [pool.submit(_guarded, name, check, settings) for name, check in checks]
        return [result for future in futures for result in future.result()]


def _guarded(name: str, check: Check, settings: DoctorSettings) -> list[Result]:
    try:
        return check(settings)
    except CheckError as exc:
        return [fail(name, exc.detail, exc.fix)]
    except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others' results
        return [fail(name, f"the check itself failed: {type(exc).__name__}: {exc}",
                     "run doctor again; if this line stays, report it as a bug in celery-sidecar doctor")]


def report(results: list[Result], mask: Masker, echo: Callable[[str], None] = click.echo) -> bool:
    """Print the checklist; True when nothing failed. Colour only on a terminal (click strips it
    through a pipe): the words OK, FAIL and SKIP carry the verdict on their own."""
    for r in results:
        word, colour = MARKS[r.status]
        echo(f"{click.style(f'{word:<4}', fg=colour, bold=r.status == 'fail')}  {mask(r.check)}: {mask(r.detail)}")
        if r.status == "fail":
            echo(f"      fix: {mask(r.fix)}")
    counts = {status: sum(r.status == status for r in results) for status in MARKS}
    echo(f"\n{counts['ok']} ok, {counts['fail']} failed, {counts['skip']} skipped")
    return counts["fail"] == 0


def diagnose(settings: DoctorSettings) -> bool:
    """Run every check and print the checklist; True when nothing failed."""
    return report(run_checks(settings), Masker(settings.secrets))

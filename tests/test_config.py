"""The thresholds file: documented defaults, clear refusals, `config check`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from celery_sidecar.monitor.config.settings import Config, load_config
from tests.support.paths import SIDECAR, SUITE, child_env, package_file


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *SIDECAR, "config", "check", str(path)],
                          capture_output=True, text=True, cwd=SUITE, env=child_env(), timeout=60)


def test_shipped_config_is_exactly_the_documented_defaults():
    shipped = load_config(package_file("defaults/sidecar.yml"))
    assert shipped == Config()
    t = shipped.thresholds
    assert (t.latency_seconds.normal, t.latency_seconds.heavy) == (5, 30)
    assert (t.queue_length.normal, t.queue_length.peak) == (100, 1000)
    assert (t.worker_cpu_percent, t.worker_memory_percent, t.retry_rate_percent) == (80, 70, 5)


@pytest.mark.e2e  # `config check` runs as a subprocess, as a user runs it
def test_config_check_prints_the_effective_thresholds(tmp_path):
    config = tmp_path / "sidecar.yml"
    config.write_text("queue_overrides: {bulk: {normal: 500, peak: 5000}}\nheavy_tasks: ['reports.*']\n")
    result = check(config)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["queue_length", "normal", "bulk", "500"] in lines
    assert ["queue_length", "peak", "celery", "1000"] in lines
    assert ["retry_ratio", "limit", "0.05"] in lines
    assert "reports.*" in result.stdout


@pytest.mark.e2e
def test_a_bad_file_names_the_key_and_the_problem(tmp_path):
    config = tmp_path / "sidecar.yml"
    config.write_text("thresholds:\n  worker_cpu_percent: -3\n  retry_rate: 5\n")
    result = check(config)
    assert result.returncode != 0
    assert "thresholds.worker_cpu_percent" in result.stderr and "greater than 0" in result.stderr
    assert "thresholds.retry_rate: unknown key" in result.stderr


@pytest.mark.e2e
def test_invalid_yaml_gives_the_line(tmp_path):
    config = tmp_path / "sidecar.yml"
    config.write_text("thresholds:\n  queue_length: {normal: 10\n")
    result = check(config)
    assert result.returncode != 0
    assert "invalid YAML at line" in result.stderr


@pytest.mark.e2e
def test_missing_file_and_peak_below_normal(tmp_path):
    result = check(tmp_path / "nope.yml")
    assert result.returncode != 0 and "cannot read the config file" in result.stderr
    config = tmp_path / "sidecar.yml"
    config.write_text("queue_overrides: {bulk: {normal: 500, peak: 50}}\n")
    result = check(config)
    assert result.returncode != 0 and "queue_overrides.bulk" in result.stderr and "peak (50)" in result.stderr


def test_heavy_tasks_match_by_name_or_queue():
    cfg = Config.model_validate({"heavy_tasks": ["reports.*"], "heavy_queues": ["batch-*"]})
    assert cfg.is_heavy("reports.monthly", "celery")
    assert cfg.is_heavy("mail.send", "batch-eu")
    assert not cfg.is_heavy("mail.send", "celery")

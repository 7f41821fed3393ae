"""celery-sidecar as users install it: one `celery_sidecar` namespace, everything the stack
needs inside the wheel, and nothing that collides with an app's own `monitor` or `alerts`.

scripts/test (and so CI) runs the whole suite against the built wheel installed in a fresh
virtualenv, from a copy of tests/ with no source tree on sys.path; these tests check that
this is what happened, and what a user of that install sees.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import celery_sidecar
from celery_sidecar import resources
from celery_sidecar.monitor.boundary.parse import RESOURCE_EVENT
from celery_sidecar.plugin import EVENT_TYPE
from tests.support.paths import SOURCE, child_env

PACKAGE_DIRS = ("sidecar", "monitor", "exporters", "alerts", "grafana", "nginx", "config")
INSTALLED_FROM_SOURCE = Path(celery_sidecar.__file__).resolve().is_relative_to(SOURCE.resolve())
installed_wheel = pytest.mark.skipif(
    INSTALLED_FROM_SOURCE, reason="an editable install: scripts/test runs this against the built wheel")


def console_script(name: str = "celery-sidecar") -> str:
    """The entry point pip installed next to this interpreter (the virtualenv's bin/)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name) or pytest.fail(f"no {name} console script")


def distribution_files() -> list[str]:
    files = importlib.metadata.files("celery-sidecar") or []
    return [str(f) for f in files]


@installed_wheel
def test_the_suite_runs_against_the_installed_wheel_not_the_source_tree():
    assert "site-packages" in Path(celery_sidecar.__file__).parts
    assert str(SOURCE) not in sys.path and os.path.realpath(SOURCE) not in map(os.path.realpath, sys.path)
    assert not os.environ.get("PYTHONPATH")


@installed_wheel
def test_the_wheel_installs_one_namespace_and_no_generic_top_level_package():
    top_level = {f.split("/", 1)[0] for f in distribution_files() if not f.startswith("..")}
    top_level = {t for t in top_level if not t.endswith((".dist-info", ".pth"))}
    assert top_level == {"celery_sidecar"}, top_level


@installed_wheel
@pytest.mark.skipif(not (SOURCE / ".git").exists(), reason="needs the git checkout to list its files")
def test_every_module_and_data_file_of_the_source_folders_is_in_the_wheel():
    tracked = subprocess.run(["git", "ls-files", *PACKAGE_DIRS], cwd=SOURCE, capture_output=True, text=True,
                             check=True).stdout.split()
    target = {"sidecar": "celery_sidecar", "monitor": "celery_sidecar/monitor",
              "exporters": "celery_sidecar/exporters", "alerts": "celery_sidecar/alerts",
              "grafana": "celery_sidecar/grafana", "nginx": "celery_sidecar/nginx",
              "config": "celery_sidecar/defaults"}
    expected = set()
    for path in tracked:
        folder, _, rest = path.partition("/")
        if folder == "grafana" and rest.endswith(".md"):
            continue
        expected.add(f"{target[folder]}/{rest}")
    installed = {f for f in distribution_files() if f.startswith("celery_sidecar/") and "__pycache__" not in f}
    assert expected - installed == set(), "in the repo but not in the wheel"
    assert installed - expected == set(), "in the wheel but not tracked in the repo"


def test_package_data_is_read_from_the_package_and_a_missing_file_is_an_error():
    for name in (resources.NGINX_TEMPLATE, resources.PROMETHEUS_TEMPLATE, resources.ALERTMANAGER_TEMPLATE,
                 resources.RULES, resources.RULES_TEST, resources.DEFAULT_CONFIG):
        assert resources.read_text(name).strip(), name
    assert [rel for rel, _ in resources.walk(resources.GRAFANA_DASHBOARDS)]
    with pytest.raises(resources.MissingResource, match=r"no 'nginx/missing\.j2'"):
        resources.read_text("nginx/missing.j2")


def test_nothing_named_monitor_exporters_or_alerts_is_importable_from_the_install(tmp_path):
    probe = "import importlib.util as u; print([m for m in ('monitor', 'exporters', 'alerts') if u.find_spec(m)])"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=child_env(PYTHONPATH=""),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_plugin_sends_the_event_type_the_fold_reads():
    assert EVENT_TYPE == RESOURCE_EVENT


USER_APP = """
    import os

    from celery import Celery
    from celery_sidecar.plugin import ResourceUsage

    import alerts
    import monitor

    assert monitor.OWNER == alerts.OWNER == "the user's app", (monitor.__file__, alerts.__file__)

    app = Celery("proj", broker=os.environ["CELERY_BROKER_URL"])
    app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True,
                    resource_usage_interval=0.5)
    app.steps["consumer"].add(ResourceUsage)


    @app.task(name="proj.ping")
    def ping():
        return monitor.OWNER
"""


def test_an_app_with_its_own_monitor_and_alerts_packages_keeps_them_and_runs_the_plugin(
        tmp_path, redis_srv, sidecar, worker):
    """Celery puts the app's directory first on sys.path: the app's `monitor` and `alerts` win,
    and the plugin, imported from celery_sidecar, still loads and reports CPU and memory."""
    app_dir = tmp_path / "app"
    for package in ("monitor", "alerts"):
        (app_dir / package).mkdir(parents=True)
        (app_dir / package / "__init__.py").write_text('OWNER = "the user\'s app"\n')
    (app_dir / "proj.py").write_text(textwrap.dedent(USER_APP))
    check = subprocess.run([sys.executable, "-c", "import proj"], cwd=app_dir, capture_output=True, text=True,
                           env=child_env(CELERY_BROKER_URL=redis_srv.url, PYTHONPATH=str(app_dir)), timeout=60)
    assert check.returncode == 0, check.stderr

    side = sidecar(redis_srv.url)
    worker(redis_srv.url, name="userapp", app="proj", queues="celery", cwd=app_dir)
    side.wait_metric("celery_worker_cpu_percent", lambda v: v >= 0, timeout=30)
    side.wait_metric("celery_worker_memory_percent", lambda v: v > 0, timeout=30)
    assert side.metrics().get("celery_sidecar_events_total", type="worker-resources") >= 1


@pytest.mark.e2e  # the console script, as a subprocess
def test_render_from_the_installed_console_script_gives_configs_nginx_and_promtool_accept(tmp_path):
    out = tmp_path / "out"
    env = child_env(FLOWER_USER="u", FLOWER_PASSWORD="p", GRAFANA_ADMIN_PASSWORD="g", ALLOW_CIDRS="10.0.0.0/8")
    result = subprocess.run([console_script(), "render", "--out", str(out),
                             "--rules-path", str(out / "prometheus" / "rules" / "*.yml")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for rendered in ("nginx/nginx.conf", "nginx/htpasswd", "prometheus/prometheus.yml",
                     "prometheus/rules/celery-sidecar.yml", "grafana/provisioning/datasources/prometheus.yml",
                     "grafana/dashboards/celery-sidecar.json"):
        assert (out / rendered).is_file(), rendered
    nginx = subprocess.run([shutil.which("nginx") or "nginx", "-t", "-c", str(out / "nginx" / "nginx.conf"),
                            "-p", str(tmp_path), "-e", "stderr", "-g", f"pid {tmp_path / 'nginx.pid'};"],
                           capture_output=True, text=True, timeout=30)
    assert nginx.returncode == 0, nginx.stderr
    promtool = subprocess.run(["promtool", "check", "config", str(out / "prometheus" / "prometheus.yml")],
                              capture_output=True, text=True, timeout=60)
    assert promtool.returncode == 0, promtool.stdout + promtool.stderr
    assert "rules found" in promtool.stdout


@pytest.mark.e2e
def test_config_example_prints_the_documented_defaults(tmp_path):
    result = subprocess.run([console_script(), "config", "example"], capture_output=True, text=True,
                            env=child_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == resources.read_text(resources.DEFAULT_CONFIG)
    (tmp_path / "sidecar.yml").write_text(result.stdout)
    check = subprocess.run([console_script(), "config", "check", str(tmp_path / "sidecar.yml")],
                           capture_output=True, text=True, env=child_env(), timeout=60)
    assert check.returncode == 0, check.stderr


def test_the_demo_app_imports_from_any_directory(tmp_path):
    """`celery -A celery_sidecar.demo_tasks worker` works from anywhere: the demo app is in the package."""
    result = subprocess.run([sys.executable, "-c", "import celery_sidecar.demo_tasks as d; print(d.app.main)"],
                            cwd=tmp_path, env=child_env(PYTHONPATH=""), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "demo"

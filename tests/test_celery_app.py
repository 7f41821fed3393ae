"""Settings from the Celery app: `celery -A app sidecar` and `celery-sidecar run --app`.

The app (tests/support/settings_app.py) names its broker in SETTINGS_APP_BROKER, not in
CELERY_BROKER_URL (the sidecar's own --broker-url variable), so a broker the sidecar uses
came from the app.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from celery import Celery

from celery_sidecar.app import read
from celery_sidecar.monitor.config.settings import parse_config
from tests.support.paths import SIDECAR, SUITE, child_env
from tests.support.procs import SidecarProcess

pytestmark = pytest.mark.timeout(120)

APP = "tests.support.settings_app"
CELERY_A = ("-m", "celery", "-A", APP, "sidecar")


def send_with_priority(broker_url: str, queue: str, priority: int) -> None:
    """One message on ``queue`` at ``priority``, as the app (priority_steps [0, 4]) sends it:
    on Redis it lands in the list of its step, ``queue\\x06\\x164``."""
    app = Celery("producer", broker=broker_url, broker_transport_options={"priority_steps": [0, 4]})
    app.send_task("settings.report", queue=queue, priority=priority)
    app.close()


def test_celery_a_app_sidecar_takes_the_broker_queues_priority_steps_and_beat_from_the_app(redis_srv, procs):
    send_with_priority(redis_srv.url, "from-task-queues", 4)
    side = SidecarProcess(None, command=CELERY_A, env={"SETTINGS_APP_BROKER": redis_srv.url})
    procs.append(side)
    _, health = side.health()
    assert health["broker"]["url"].endswith(f"127.0.0.1:{redis_srv.port}/0"), health["broker"]
    # The queues of task_queues and task_routes are probed though no worker consumes them; the
    # message in the priority-4 list counts only with the app's priority_steps.
    side.wait_metric("celery_queue_length", lambda v: v == 1, queue_name="from-task-queues")
    assert side.metrics().get("celery_queue_length", queue_name="from-task-routes") == 0
    # beat_schedule, in the app's timezone (tests/test_beat.py checks the due time itself).
    assert side.metrics().get("celery_beat_entry_next_due_timestamp_seconds", entry="nightly-cleanup",
                              task="settings.cleanup")
    assert "settings from the Celery app 'settingsapp': broker from the app" in side.log()


def test_flags_override_what_the_app_says(redis_srv, procs):
    send_with_priority(redis_srv.url, "from-task-queues", 4)
    steps = SidecarProcess(None, "--transport-options", json.dumps({"priority_steps": [0, 3]}),
                           command=CELERY_A, env={"SETTINGS_APP_BROKER": redis_srv.url})
    procs.append(steps)
    steps.wait_metric("celery_queue_length", lambda v: v == 0, queue_name="from-task-queues")
    steps.stop()

    other_db = redis_srv.url.rsplit("/", 1)[0] + "/3"
    broker = SidecarProcess(other_db, command=CELERY_A, env={"SETTINGS_APP_BROKER": redis_srv.url})
    procs.append(broker)
    assert broker.health()[1]["broker"]["url"].endswith("/3")
    assert "broker from --broker-url" in broker.log()


def test_run_with_app_is_the_same_as_celery_a_sidecar(redis_srv, procs):
    send_with_priority(redis_srv.url, "from-task-queues", 4)
    side = SidecarProcess(None, "--app", APP, env={"SETTINGS_APP_BROKER": redis_srv.url})
    procs.append(side)
    side.wait_metric("celery_queue_length", lambda v: v == 1, queue_name="from-task-queues")


@pytest.mark.e2e  # `celery-sidecar run`, as a subprocess
@pytest.mark.parametrize(("spec", "says"), [
    ("tests.support.broken_app", "cannot load the Celery app 'tests.support.broken_app': "
                                 "ZeroDivisionError: division by zero"),
    ("tests.support.no_such_module", "ModuleNotFoundError: No module named 'tests.support.no_such_module'"),
    ("tests.support.settings_app:nope", "module 'tests.support.settings_app' has no attribute 'nope'"),
])
def test_an_app_that_fails_to_load_is_one_clear_error_not_a_traceback(spec, says):
    result = subprocess.run([sys.executable, *SIDECAR, "run", "--app", spec], cwd=SUITE, env=child_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_importing_and_reading_the_app_starts_nothing_and_connects_nowhere():
    # In a fresh interpreter: the app module is imported there for the first time.
    script = (
        "import threading, psutil\n"
        "from celery_sidecar.app import load_app, read\n"
        f"app = load_app({APP!r})\n"
        "settings = read(app)\n"
        "print(len(psutil.Process().net_connections()), threading.active_count(),"
        " len(psutil.Process().children()), settings.broker_url)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=SUITE, capture_output=True, text=True, timeout=60,
                            env=child_env(SETTINGS_APP_BROKER="redis://127.0.0.1:1/0"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "1", "0", "redis://127.0.0.1:1/0"]


def test_the_apps_time_limits_are_stuck_limits_where_sidecar_yml_says_nothing():
    from tests.support.settings_app import app

    defaults = read(app).defaults
    assert defaults.time_limits == {"settings.report": 45.0} and defaults.default_time_limit == 600
    assert set(defaults.queues) == {"celery", "from-task-queues", "from-task-routes"}
    plain = parse_config({})
    assert defaults.runtime_limit(plain, "settings.report") == 45  # the task's own time_limit
    assert defaults.runtime_limit(plain, "settings.cleanup") == 600  # the app's task_time_limit
    mine = parse_config({"thresholds": {"task_runtime_seconds": {"default": 900, "overrides": {"settings.r*": 5}}}})
    assert defaults.runtime_limit(mine, "settings.report") == 5  # sidecar.yml wins
    assert defaults.runtime_limit(mine, "settings.cleanup") == 900

"""The sidecar's own log, as whoever greps it or pages on its ERROR lines reads it.

A real sidecar, a real worker that is killed, comes back and is restarted, and the fake Slack
of tests/support/fake_slack.py, down for a while: the log says where alerts go (and no secret),
one INFO line per message Slack took, one WARNING per failed attempt, and never ERROR for any
of it: nothing here needs a human once Slack is back.
"""

from __future__ import annotations

import re

import pytest

from tests.support.configs import write_config
from tests.support.fake_slack import WEBHOOK_PATH
from tests.support.servers import wait_for

pytestmark = pytest.mark.timeout(150)

ALERT_APP = "tests.support.alert_apps"
LEVEL = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+)\s")


def lines_at(log: str, *levels: str) -> list[str]:
    return [line for line in log.splitlines() if (m := LEVEL.match(line)) and m[1] in levels]


def test_a_worker_down_and_back_through_a_slack_outage_logs_no_error(redis_srv, slack, sidecar, worker, tmp_path):
    config = write_config(tmp_path / "sidecar.yml", {"rate_limit_per_second": 10})
    side = sidecar(redis_srv.url, config=config, env={"SLACK_WEBHOOK_URL": slack.webhook_url})
    doomed = worker(redis_srv.url, name="doomed", app=ALERT_APP, concurrency=1)
    host = side.wait_worker_up("doomed")

    slack.down()
    doomed.kill()  # SIGKILL: heartbeats stop, a page
    side.wait_metric("celery_sidecar_alerts_failed_total", lambda v: v >= 1, timeout=20)
    slack.up()
    slack.wait_message(f"Worker offline: {host}", side=side)
    back = worker(redis_srv.url, name="doomed", app=ALERT_APP, concurrency=1)
    slack.wait_message(f"Worker back online: {host}", side=side)
    back.stop()  # SIGTERM, and back again: a restart, nothing to say
    wait_for(lambda: side.health()[1]["workers"].get(host) == "down", timeout=15, what=f"{host} down")
    worker(redis_srv.url, name="doomed", app=ALERT_APP, concurrency=1)
    side.wait_worker_up("doomed")
    side.settled()

    log = side.log()
    assert lines_at(log, "ERROR", "CRITICAL") == []
    start = [line for line in lines_at(log, "INFO") if "alerts go to " in line]
    assert len(start) == 1 and f"alerts go to a Slack incoming webhook on 127.0.0.1:{slack.port}" in start[0]
    assert WEBHOOK_PATH not in log and WEBHOOK_PATH.rsplit("/", 1)[1] not in log
    posted = [line.split(": ", 1)[1] for line in lines_at(log, "INFO") if "alert posted to" in line]
    assert posted == [f"alert posted to webhook: Worker offline: {host} (firing)",
                      f"alert posted to webhook: Worker back online: {host} (resolved)"], posted
    failures = side.metrics().sum("celery_sidecar_alerts_failed_total")
    warnings = lines_at(log, "WARNING")
    assert len(warnings) == failures, warnings
    assert all(" attempt " in line and " failed (connection" in line for line in warnings), warnings
    assert slack.headlines() == [
        f"[CRITICAL] Worker offline: {host}", f"[CRITICAL] RESOLVED: Worker back online: {host}"]

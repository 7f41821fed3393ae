"""Alerts reach Slack once each, through rate limits, outages, restarts and a second sidecar.

The real slack-sdk client talks to a fake Slack on loopback; the outbox is a private
redis-server (or a sqlite file when the broker is not Redis).
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from celery_sidecar.alerts.delivery.blocks import MAX_BLOCKS, MAX_HEADER_TEXT, MAX_SECTION_TEXT, check_templates
from celery_sidecar.alerts.delivery.dispatcher import DeliveryTiming, Dispatcher, build_dispatcher
from celery_sidecar.alerts.delivery.outbox import open_outbox
from celery_sidecar.alerts.delivery.routing import Router
from celery_sidecar.alerts.delivery.slack import SlackSettings, validate_webhook_url
from celery_sidecar.alerts.model import Alert
from celery_sidecar.monitor.config.alert_rules import AlertsConfig, MuteWindow
from celery_sidecar.monitor.config.reload import ConfigReloader
from celery_sidecar.monitor.config.settings import Config, LiveConfig
from celery_sidecar.monitor.fold.status import Status
from tests.support.fake_slack import TOKEN, FakeSlack
from tests.support.servers import RedisServer, wait_for

pytestmark = pytest.mark.timeout(60)

FAST = DeliveryTiming(
    backoff_base=0.2,
    backoff_cap=0.5,
    http_timeout=1.0,
    lease_seconds=3.0,
    claim_recheck_seconds=0.3,
    rescan_seconds=1.0,
)
QUICK = AlertsConfig(rate_limit_per_second=50)
AMQP_BROKER = "amqp://guest:guest@127.0.0.1:5672//"


def make_alert(key: str, **overrides) -> Alert:
    values = {
        "key": key,
        "group": f"group-{key}",
        "kind": "task_failed",
        "status": "firing",
        "severity": "warning",
        "title": f"Task app.tasks.add failed ({key})",
        "text": "ZeroDivisionError: division by zero",
        "fields": {"task": "app.tasks.add", "worker": "celery@web-1"},
        "task_name": "app.tasks.add",
        "traceback": 'Traceback (most recent call last):\n  File "tasks.py", line 3\nZeroDivisionError',
        "created_at": time.time(),
    }
    values.update(overrides)
    return Alert(**values)


@pytest.fixture
def redis_srv(module_redis: RedisServer) -> RedisServer:
    """One redis-server for the module, emptied for each test."""
    module_redis.client().flushall()
    return module_redis


@pytest.fixture
def broker(redis_srv: RedisServer) -> str:
    return redis_srv.url


@pytest.fixture
def sidecar(tmp_path: Path, slack: FakeSlack) -> Iterator[Callable[..., Dispatcher]]:
    """Starts dispatchers the way the CLI does; stops whatever is left running at the end."""
    started: list[Dispatcher] = []

    def start(
        broker_url: str,
        cfg: AlertsConfig | LiveConfig = QUICK,
        mode: str = "webhook",
        instance_id: str = "sidecar-1",
        default_channel: str | None = "#alerts",
        timing: DeliveryTiming = FAST,
    ) -> Dispatcher:
        live = cfg if isinstance(cfg, LiveConfig) else LiveConfig(Config(alerts=cfg))
        settings = SlackSettings(
            webhook_url=slack.webhook_url if mode == "webhook" else None,
            bot_token=TOKEN if mode == "bot" else None,
            channel=default_channel if mode == "bot" else None,
            base_url=slack.api_url,
        )
        dispatcher = build_dispatcher(live, settings, open_outbox(broker_url, tmp_path / "state"),
                                      registry=CollectorRegistry(), instance_id=instance_id, timing=timing)
        dispatcher.start()
        started.append(dispatcher)
        return dispatcher

    yield start
    for dispatcher in started:
        dispatcher.stop(timeout=1)


def settled(*dispatchers: Dispatcher, timeout: float = 10) -> None:
    wait_for(lambda: all(d.pending_count() == 0 for d in dispatchers), timeout=timeout, what="empty outbox")


def metric(dispatcher: Dispatcher, name: str, **labels: str) -> float:
    return dispatcher.metrics.registry.get_sample_value(name, labels) or 0.0


def sent_keys(slack: FakeSlack) -> list[str]:
    """The alert keys in the accepted messages' headers ("... failed (key)"), in arrival order."""
    return [re.search(r"\((\S+)\)$", r.body["blocks"][0]["text"]["text"])[1] for r in slack.accepted()]


def section_texts(blocks: list[dict]) -> list[str]:
    return [b["text"]["text"] for b in blocks if b["type"] == "section" and "text" in b]


# -- webhook ----------------------------------------------------------------------------------


def test_a_failed_task_becomes_one_slack_message_with_its_blocks(broker, slack, sidecar):
    dispatcher = sidecar(broker)
    dispatcher.submit(make_alert("t1"))

    slack.wait_messages(count=1)
    settled(dispatcher)
    [message] = slack.accepted("webhook")
    blocks = message.body["blocks"]
    assert blocks[0]["type"] == "header"
    assert "Task app.tasks.add failed (t1)" in blocks[0]["text"]["text"]
    assert any("ZeroDivisionError" in t for t in section_texts(blocks))
    assert "Task app.tasks.add failed (t1)" in message.body["text"]
    assert metric(dispatcher, "celery_sidecar_alerts_sent_total", channel="webhook") == 1
    assert metric(dispatcher, "celery_sidecar_alerts_pending") == 0


def test_slack_rate_limits_three_times_and_the_message_still_arrives_once(broker, slack, sidecar):
    slack.rate_limit(3, retry_after=1)
    dispatcher = sidecar(broker)
    started = time.monotonic()
    dispatcher.submit(make_alert("t1"))

    slack.wait_messages(count=1, timeout=15)
    elapsed = slack.accepted()[0].at - started
    settled(dispatcher)
    assert elapsed >= 2.9, f"sent after {elapsed:.2f}s, before three Retry-After waits"
    assert len(slack.accepted()) == 1
    assert [r.status for r in slack.requests] == [429, 429, 429, 200]
    assert metric(dispatcher, "celery_sidecar_alerts_failed_total", reason="rate_limited") == 3


def test_slack_errors_and_a_hung_request_are_retried_until_delivered(broker, slack, sidecar):
    slack.fail(2, status=500)
    slack.hang(1, seconds=1.5)  # longer than the client's 1 s timeout
    dispatcher = sidecar(broker)
    dispatcher.submit(make_alert("t1"))

    wait_for(lambda: slack.accepted() and dispatcher.pending_count() == 0, timeout=15, what="delivery")
    assert metric(dispatcher, "celery_sidecar_alerts_failed_total", reason="http_500") == 2
    assert metric(dispatcher, "celery_sidecar_alerts_failed_total", reason="timeout") == 1
    # The hung request was posted by Slack after the client gave up: at least once, not exactly once.
    assert 1 <= len(slack.accepted()) <= 2


# -- bot token --------------------------------------------------------------------------------


def test_a_resolved_alert_edits_its_firing_message(broker, slack, sidecar):
    slack.rate_limit(1, retry_after=1)
    dispatcher = sidecar(broker, mode="bot")
    dispatcher.submit(make_alert("q-fire", group="queue:celery", kind="threshold", task_name=None))
    dispatcher.submit(make_alert("q-ok", group="queue:celery", kind="threshold", status="resolved", task_name=None))

    slack.wait_messages(count=2)
    settled(dispatcher)
    post, update = slack.accepted()
    assert post.method == "chat.postMessage" and update.method == "chat.update"
    assert (update.body["channel"], update.body["ts"]) == (post.reply["channel"], post.reply["ts"])
    assert "Resolved" in update.body["blocks"][0]["text"]["text"]
    assert metric(dispatcher, "celery_sidecar_alerts_failed_total", reason="rate_limited") == 1


def test_a_resolved_alert_replies_in_the_thread_when_configured(broker, slack, sidecar):
    dispatcher = sidecar(broker, QUICK.model_copy(update={"resolve_style": "thread"}), mode="bot")
    dispatcher.submit(make_alert("w-off", group="worker:w1", kind="worker_offline", task_name=None))
    slack.wait_messages(count=1)
    dispatcher.submit(make_alert("w-on", group="worker:w1", kind="worker_offline", status="resolved", task_name=None))

    slack.wait_messages(count=2)
    post, reply = slack.accepted()
    assert reply.method == "chat.postMessage"
    assert reply.body["thread_ts"] == post.reply["ts"]
    assert reply.body["channel"] == post.reply["channel"]


def test_severities_go_to_their_channels_and_critical_mentions_the_team(broker, slack, sidecar):
    cfg = QUICK.model_copy(
        update={"channels": {"critical": "#oncall", "warning": "#alerts-warn"}, "mention": "<!subteam^S0123>"}
    )
    dispatcher = sidecar(broker, cfg, mode="bot", default_channel="#general")
    dispatcher.submit(make_alert("crit", severity="critical", title="Worker celery@web-1 offline"))
    dispatcher.submit(make_alert("warn", severity="warning"))
    dispatcher.submit(make_alert("info", severity="info"))

    slack.wait_messages(count=3)
    by_channel = {r.body["channel"]: r.body for r in slack.accepted()}
    assert set(by_channel) == {"#oncall", "#alerts-warn", "#general"}
    critical = by_channel["#oncall"]
    assert critical["text"].startswith("<!subteam^S0123> ")
    assert section_texts(critical["blocks"])[0].startswith("<!subteam^S0123> ")
    assert "attachments" not in critical
    assert "subteam" not in by_channel["#alerts-warn"]["text"]


def test_messages_to_one_channel_are_paced(broker, slack, sidecar):
    dispatcher = sidecar(broker, AlertsConfig(rate_limit_per_second=2))
    for key in ("p1", "p2", "p3"):
        dispatcher.submit(make_alert(key))

    slack.wait_messages(count=3)
    times = [r.at for r in slack.accepted()]
    assert all(later - earlier >= 0.45 for earlier, later in itertools.pairwise(times)), times
    assert sent_keys(slack) == ["p1", "p2", "p3"]


# -- durability -------------------------------------------------------------------------------


def test_a_restart_during_a_slack_outage_loses_nothing_and_posts_each_alert_once(broker, slack, sidecar):
    slack.down()
    first = sidecar(broker, instance_id="sidecar-a")
    for key in ("a1", "a2", "a3"):
        first.submit(make_alert(key))
    wait_for(
        lambda: metric(first, "celery_sidecar_alerts_failed_total", reason="connection") >= 3,
        timeout=10,
        what="failed attempts during the outage",
    )
    first.stop(timeout=1)

    second = sidecar(broker, instance_id="sidecar-b")
    # Still down: the new sidecar picks up what the old one left, and its attempts fail too.
    wait_for(
        lambda: metric(second, "celery_sidecar_alerts_failed_total", reason="connection") >= 3,
        timeout=10,
        what="the second sidecar's attempts at the three alerts it took over",
    )
    assert slack.accepted() == []
    slack.up()

    slack.wait_messages(count=3)
    settled(second)
    assert sorted(sent_keys(slack)) == ["a1", "a2", "a3"]


def test_two_sidecars_on_one_broker_post_each_alert_once(broker, slack, sidecar):
    one = sidecar(broker, instance_id="sidecar-a")
    two = sidecar(broker, instance_id="sidecar-b")
    alerts = [make_alert(f"k{i}") for i in range(6)]
    for alert in alerts:  # both read the same event stream, so both raise the same alerts
        one.submit(alert)
        two.submit(alert)

    slack.wait_messages(count=6)
    settled(one, two)
    assert sorted(sent_keys(slack)) == [f"k{i}" for i in range(6)]


def test_a_dead_sidecars_claim_expires_and_another_sidecar_sends(broker, redis_srv, slack, sidecar):
    alert = make_alert("orphan")
    redis_srv.client().set("celery_sidecar:alerts:claim:orphan", "dead-sidecar", px=1500)
    dispatcher = sidecar(broker, instance_id="survivor")
    started = time.monotonic()
    dispatcher.submit(alert)

    slack.wait_messages(count=1)
    settled(dispatcher)
    [message] = slack.accepted()
    assert message.at - started >= 1.4, "sent while another sidecar held the claim"


def test_alerts_raised_while_the_broker_redis_is_down_are_sent_when_it_is_back(broker, redis_srv, slack, sidecar):
    dispatcher = sidecar(broker)
    redis_srv.stop()
    try:
        dispatcher.submit(make_alert("r1"))
        wait_for(
            lambda: metric(dispatcher, "celery_sidecar_alerts_failed_total", reason="outbox_error") >= 1,
            timeout=10,
            what="a failed attempt while Redis is down",
        )
        assert slack.accepted() == []  # no claim, no dedup: it waits rather than risk a double post
    finally:
        redis_srv.restart()
    slack.wait_messages(count=1)
    settled(dispatcher)
    assert sent_keys(slack) == ["r1"]


def test_without_a_redis_broker_the_file_outbox_survives_a_restart(tmp_path, slack, sidecar):
    slack.down()
    first = sidecar(AMQP_BROKER)
    first.submit(make_alert("f1"))
    first.submit(make_alert("f2"))
    wait_for(lambda: metric(first, "celery_sidecar_alerts_failed_total", reason="connection") >= 2, timeout=10)
    first.stop(timeout=1)
    assert (tmp_path / "state" / "alerts-outbox.sqlite3").exists()

    slack.up()
    second = sidecar(AMQP_BROKER)
    slack.wait_messages(count=2)
    settled(second)
    assert len(slack.accepted()) == 2


# -- routing ----------------------------------------------------------------------------------


def test_a_muted_alert_is_dropped_and_so_is_its_resolution(broker, slack, sidecar):
    quiet = MuteWindow(start="00:00", end="24:00", severities=["warning"])
    dispatcher = sidecar(broker, QUICK.model_copy(update={"mute": [quiet]}))
    dispatcher.submit(make_alert("muted", group="g1"))
    dispatcher.submit(make_alert("muted-ok", group="g1", status="resolved"))
    dispatcher.submit(make_alert("loud", severity="critical"))

    slack.wait_messages(count=1)
    settled(dispatcher)
    assert len(slack.accepted()) == 1
    assert sent_keys(slack) == ["loud"]
    assert metric(dispatcher, "celery_sidecar_alerts_dropped_total", reason="muted") == 1
    assert metric(dispatcher, "celery_sidecar_alerts_dropped_total", reason="suppressed") == 1


def test_an_overnight_mute_window_belongs_to_the_day_it_starts():
    friday_night = MuteWindow(start="22:00", end="06:00", weekdays=["fri"])
    cfg = AlertsConfig(mute=[friday_night])
    router = Router()

    def sent(moment: datetime) -> bool:
        return router.route(make_alert("x", status="info"), cfg, moment.timestamp()).send

    assert not sent(datetime(2024, 5, 17, 23, 0, tzinfo=UTC))  # Friday 23:00
    assert not sent(datetime(2024, 5, 18, 5, 59, tzinfo=UTC))  # Saturday 05:59
    assert sent(datetime(2024, 5, 18, 6, 0, tzinfo=UTC))  # Saturday 06:00
    assert sent(datetime(2024, 5, 17, 5, 0, tzinfo=UTC))  # Friday 05:00: Thursday's night is not muted


def test_task_patterns_include_and_exclude(broker, slack, sidecar):
    cfg = QUICK.model_copy(update={"include_tasks": ["app.*"], "exclude_tasks": ["app.noisy.*"]})
    dispatcher = sidecar(broker, cfg)
    dispatcher.submit(make_alert("wanted", task_name="app.tasks.add"))
    dispatcher.submit(make_alert("noisy", task_name="app.noisy.ping"))
    dispatcher.submit(make_alert("foreign", task_name="other.tasks.x"))
    dispatcher.submit(make_alert("no-task", task_name=None, kind="worker_offline"))

    slack.wait_messages(count=2)
    settled(dispatcher)
    assert sorted(sent_keys(slack)) == ["no-task", "wanted"]
    assert metric(dispatcher, "celery_sidecar_alerts_dropped_total", reason="excluded") == 2


def test_a_reloaded_config_applies_and_a_broken_one_is_refused(broker, slack, sidecar, tmp_path):
    path = tmp_path / "sidecar.yml"
    path.write_text("alerts: {rate_limit_per_second: 50}\n")
    live, status = LiveConfig(Config(alerts=QUICK)), Status()
    dispatcher = sidecar(broker, live)
    reloader = ConfigReloader(path, live, status.reload_result, [dispatcher.check])

    path.write_text("alerts: {rate_limit_per_second: 50, exclude_tasks: ['app.tasks.*']}\n")
    assert reloader.check()
    dispatcher.submit(make_alert("excluded"))
    dispatcher.submit(make_alert("kept", task_name="billing.charge"))
    slack.wait_messages(count=1)

    templates = tmp_path / "broken"
    templates.mkdir()
    (templates / "default.json.j2").write_text("[{{ alert.title }")
    path.write_text(f"alerts: {{rate_limit_per_second: 50, templates_dir: {str(templates)!r}}}\n")
    assert not reloader.check()
    assert "default.json.j2" in status.config_error
    assert live.current.alerts.exclude_tasks == ["app.tasks.*"], "the refused edit changed nothing"
    dispatcher.submit(make_alert("after", task_name="billing.charge"))

    slack.wait_messages(count=2)
    settled(dispatcher)
    assert sent_keys(slack) == ["kept", "after"]


# -- rendering --------------------------------------------------------------------------------


def test_an_operator_template_overrides_the_shipped_one(broker, slack, sidecar, tmp_path):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "task_failed.json.j2").write_text(
        '[{"type": "section", "text": {"type": "mrkdwn", "text": {{ ("CUSTOM " ~ alert.title) | json }}}}]'
    )
    dispatcher = sidecar(broker, QUICK.model_copy(update={"templates_dir": templates}))
    dispatcher.submit(make_alert("t1"))
    dispatcher.submit(make_alert("w1", kind="worker_offline", task_name=None))

    slack.wait_messages(count=2)
    first, second = slack.accepted()
    assert first.body["blocks"] == [
        {"type": "section", "text": {"type": "mrkdwn", "text": "CUSTOM Task app.tasks.add failed (t1)"}}
    ]
    assert second.body["blocks"][0]["type"] == "header"  # other kinds keep the shipped template


def test_a_broken_template_is_refused_with_its_name(tmp_path, slack):
    templates = tmp_path / "templates"
    templates.mkdir()
    cfg = AlertsConfig(templates_dir=templates)

    (templates / "threshold.json.j2").write_text('[{"type": "section", {% if %}]')
    with pytest.raises(ValueError, match=r"threshold\.json\.j2.*syntax error"):
        check_templates(cfg)

    (templates / "threshold.json.j2").write_text('[{"type": "section", "text": {{ alert.title }}}]')
    with pytest.raises(ValueError, match=r"threshold\.json\.j2.*valid JSON"):
        check_templates(cfg)
    with pytest.raises(ValueError, match=r"threshold\.json\.j2"):
        build_dispatcher(LiveConfig(Config(alerts=cfg)), SlackSettings(webhook_url=slack.webhook_url),
                         open_outbox(AMQP_BROKER, tmp_path), registry=CollectorRegistry(), instance_id="x")


def test_a_webhook_url_that_is_not_https_is_refused_without_showing_it(tmp_path):
    secret = "/services/T000/B000/s3cr3tS3CR3T"
    for bad in ("http://hooks.slack.com" + secret, "ftp://hooks.slack.com" + secret, "https://hooks.slack.com"):
        with pytest.raises(ValueError, match="SLACK_WEBHOOK_URL") as error:
            validate_webhook_url(bad)
        assert "s3cr3t" not in str(error.value)
    assert validate_webhook_url("https://hooks.slack.com" + secret)
    assert validate_webhook_url("http://127.0.0.1:9" + secret)
    with pytest.raises(ValueError, match="https"):
        build_dispatcher(LiveConfig(Config()), SlackSettings(webhook_url="http://example.com" + secret),
                         open_outbox(AMQP_BROKER, tmp_path), registry=CollectorRegistry(), instance_id="x")


def test_a_huge_traceback_and_many_fields_fit_block_kit_limits(broker, slack, sidecar):
    traceback = "\n".join(f'  File "/app/deep/module_{i}.py", line {i}, in f{i}  ' + "x" * 200 for i in range(5000))
    fields = {f"field_{i}": "v" * 3000 for i in range(600)}
    dispatcher = sidecar(broker)
    dispatcher.submit(make_alert("big", title="T" * 400, text="y" * 10_000, traceback=traceback, fields=fields))

    slack.wait_messages(count=1)
    blocks = slack.accepted()[0].body["blocks"]
    assert len(blocks) <= MAX_BLOCKS
    assert len(blocks[0]["text"]["text"]) <= MAX_HEADER_TEXT
    for block in blocks:
        if block["type"] == "section":
            assert len(block.get("text", {}).get("text", "")) <= MAX_SECTION_TEXT
            assert len(block.get("fields", [])) <= 10
    # The traceback keeps its end, where it failed, and says how much of the middle it cut.
    traceback_section = next(t for t in section_texts(blocks) if "module_4999.py" in t)
    assert traceback_section.startswith("```") and traceback_section.endswith("x```")
    assert re.search(r"… \d+ lines cut …", traceback_section)
    assert len(slack.accepted()[0].body["text"]) <= 3000


# -- console and secrets ----------------------------------------------------------------------


def test_without_slack_alerts_go_to_the_log_in_the_same_words(broker, sidecar, caplog):
    caplog.set_level(logging.INFO, logger="alerts.console")
    dispatcher = sidecar(broker, mode="console")
    dispatcher.submit(make_alert("c1", severity="critical"))

    wait_for(lambda: "(c1)" in caplog.text, timeout=5, what="the alert in the log")
    record = next(r for r in caplog.records if r.name == "alerts.console")
    assert record.levelno == logging.ERROR
    text = record.getMessage()
    for words in (
        "Task app.tasks.add failed (c1)",
        "ZeroDivisionError: division by zero",
        "worker: celery@web-1",
        "Traceback (most recent call last):",
    ):
        assert words in text
    settled(dispatcher)


def test_secrets_never_reach_the_log(broker, slack, sidecar, caplog):
    caplog.set_level(logging.DEBUG)
    slack.fail(1, status=404)
    hook = sidecar(broker, mode="webhook")
    hook.submit(make_alert("s1"))
    slack.wait_messages(count=1)
    hook.stop(timeout=1)  # one at a time: on one broker, either could send the other's alert
    bot = sidecar(broker, mode="bot", instance_id="sidecar-2")
    bot.submit(make_alert("s2", severity="critical"))
    slack.wait_messages(count=2)

    assert [r.method for r in slack.accepted()] == ["webhook", "chat.postMessage"]
    assert "XXXXXXXXXXXXXXXX" not in caplog.text  # the webhook URL's secret path
    assert TOKEN not in caplog.text
    assert "url: <redacted>" in caplog.text  # slack-sdk's debug line named the webhook URL, redacted


# -- what the sidecar's own log says ----------------------------------------------------------


def start_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("alerts go to ")]


@pytest.mark.parametrize("mode", ["webhook", "bot", "console"])
def test_the_start_says_where_alerts_go_in_one_info_line_without_secrets(broker, slack, sidecar, caplog, mode):
    caplog.set_level(logging.INFO)
    sidecar(broker, QUICK.model_copy(update={"channels": {"critical": "#oncall"}}), mode=mode,
            default_channel="#alerts")

    [line] = start_lines(caplog)
    assert line.levelno == logging.INFO
    said = line.getMessage()
    where = {
        "webhook": f"a Slack incoming webhook on 127.0.0.1:{slack.port}",
        "bot": f"Slack's Web API on 127.0.0.1:{slack.port} with a bot token, "
               "channels info: #alerts, warning: #alerts, critical: #oncall",
        "console": "the log (logger alerts.console)",
    }[mode]
    assert where in said, said
    assert "/services/" not in caplog.text and "XXXXXXXX" not in caplog.text
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("mode", ["webhook", "bot"])
def test_a_failed_attempt_is_one_warning_and_an_accepted_post_one_info_line(broker, slack, sidecar, caplog, mode):
    caplog.set_level(logging.INFO)
    slack.down()
    dispatcher = sidecar(broker, mode=mode)
    dispatcher.submit(make_alert("down-1", severity="critical"))
    wait_for(lambda: metric(dispatcher, "celery_sidecar_alerts_failed_total", reason="connection") >= 2,
             timeout=10, what="two failed attempts")
    slack.up()
    slack.wait_messages(count=1)
    settled(dispatcher)
    dispatcher.stop(timeout=1)

    failures = metric(dispatcher, "celery_sidecar_alerts_failed_total", reason="connection")
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == failures, [f"{r.levelname} {r.name}: {r.getMessage()}" for r in loud]
    assert all(r.levelno == logging.WARNING and "down-1: attempt" in r.getMessage() for r in loud)
    posted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("alert posted to ")]
    channel = "webhook" if mode == "webhook" else "#alerts"
    assert posted == [f"alert posted to {channel}: Task app.tasks.add failed (down-1) (firing)"]
    assert TOKEN not in caplog.text and "XXXXXXXX" not in caplog.text


def test_on_the_console_a_resolution_is_info_whatever_its_severity(broker, sidecar, caplog):
    caplog.set_level(logging.INFO, logger="alerts.console")
    dispatcher = sidecar(broker, mode="console")
    dispatcher.submit(make_alert("w-off", group="worker:w1", kind="worker_offline", severity="critical",
                                 title="Worker offline: w1", task_name=None))
    dispatcher.submit(make_alert("w-on", group="worker:w1", kind="worker_online", severity="critical",
                                 status="resolved", title="Worker back online: w1", task_name=None))
    settled(dispatcher)

    levels = {r.getMessage().splitlines()[0]: r.levelno for r in caplog.records if r.name == "alerts.console"}
    assert levels == {"[CRITICAL] Worker offline: w1": logging.ERROR,
                      "[CRITICAL] RESOLVED: Worker back online: w1": logging.INFO}

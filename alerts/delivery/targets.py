"""Where an alert goes: the sender for the configured Slack, and per alert its channel, or the
firing message a resolution edits or replies to.

Targets are chosen from what the sender can do (a fixed channel, edits, threads), never
from its class. In bot mode a severity's channel is `alerts.channels`, else the default
channel (SLACK_CHANNEL); a resolution finds its firing message in the outbox by group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from celery_sidecar.alerts.delivery.outbox import Outbox
from celery_sidecar.alerts.delivery.slack import (
    BotSender,
    ConsoleSender,
    Sender,
    SlackSettings,
    WebhookSender,
    validate_webhook_url,
)
from celery_sidecar.alerts.model import Alert, MessageRef
from celery_sidecar.monitor.config.alert_rules import AlertsConfig

log = logging.getLogger(__name__)

SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Target:
    label: str  # metric label: the configured channel, "webhook" or "console"
    channel: str | None  # where to post (bot mode)
    pace_key: str  # what the rate limit is per
    edit: MessageRef | None = None
    thread: MessageRef | None = None


def make_sender(slack: SlackSettings, http_timeout: float) -> Sender:
    """A bot token wins over a webhook; neither: the console. ValueError on a bad webhook URL."""
    if slack.bot_token:
        if slack.webhook_url:
            log.info("both SLACK_BOT_TOKEN and SLACK_WEBHOOK_URL are set: using the bot token")
        return BotSender(slack.bot_token, base_url=slack.base_url, timeout=http_timeout)
    if slack.webhook_url:
        return WebhookSender(validate_webhook_url(slack.webhook_url), timeout=http_timeout)
    return ConsoleSender()


class Targets:
    def __init__(self, sender: Sender, outbox: Outbox, default_channel: str | None) -> None:
        self._sender = sender
        self._outbox = outbox
        self._default_channel = default_channel

    def check(self, cfg: AlertsConfig) -> None:
        """ValueError when bot mode has no channel for some severity."""
        if self._sender.fixed_channel is None and not self._default_channel:
            missing = [s for s in SEVERITIES if s not in cfg.channels]
            if missing:
                raise ValueError(
                    "bot mode needs SLACK_CHANNEL or alerts.channels for every severity "
                    f"(missing: {', '.join(missing)})"
                )

    def describe(self, cfg: AlertsConfig) -> str:
        """Where alerts go, in words for the start-up log: no token, no webhook path."""
        where = self._sender.describe()
        if self._sender.fixed_channel is not None:
            return where
        channels = [f"{s}: {cfg.channels.get(s, self._default_channel)}" for s in SEVERITIES]
        return f"{where}, channels {', '.join(channels)}"

    def resolve(self, alert: Alert, cfg: AlertsConfig) -> Target:
        sender = self._sender
        if sender.fixed_channel is not None:
            return Target(sender.fixed_channel, None, sender.fixed_channel)
        channel = cfg.channels.get(alert.severity, self._default_channel)
        label = channel or "none"
        ref = self._firing_message(alert)
        if ref is None:
            return Target(label, channel, label)
        if cfg.resolve_style == "update" and sender.supports_edits:
            return Target(label, ref.channel, ref.channel, edit=ref)
        if sender.supports_threads:
            return Target(label, ref.channel, ref.channel, thread=ref)
        return Target(label, channel, label)

    def _firing_message(self, alert: Alert) -> MessageRef | None:
        can_follow_up = self._sender.supports_edits or self._sender.supports_threads
        if alert.status != "resolved" or not can_follow_up:
            return None
        return self._outbox.find_message(alert.group)

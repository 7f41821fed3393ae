"""The `alerts:` section of the sidecar's YAML: rules, routing and message rendering.

The engine reads `rules`; the delivery layer reads everything else. Unknown keys are
errors (a misspelt rule name or option is refused, not ignored). Secrets (webhook URL,
bot token) are not part of this file: the CLI reads them from the environment and
passes them to `alerts.delivery.build_dispatcher`.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alerts.blocks import MessageRenderer
from alerts.model import Severity

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ResolveStyle = Literal["update", "thread"]

_CLOCK = re.compile(r"^(\d{2}):(\d{2})$")
# Slack's special mentions: a user group, a user, or the channel-wide ones.
_MENTION = re.compile(r"^(<!subteam\^[A-Z0-9]+(\|[^>]*)?>|<@[UW][A-Z0-9]+>|<!here>|<!channel>)$")
_LOOPBACK_NAMES = {"localhost"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleConfig(_Strict):
    enabled: bool = True
    severity: Severity = "warning"
    for_seconds: float = Field(0.0, ge=0, description="the condition must hold this long before firing")
    resolve_after_seconds: float = Field(
        0.0, ge=0, description="hysteresis: the condition must be clear this long before resolving"
    )


# Defaults per rule; a YAML entry only needs the keys it changes (merged in RulesConfig).
_RULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "task_failed": {"severity": "warning", "for_seconds": 0},
    "worker_offline": {"severity": "critical"},
    "worker_shutdown": {"severity": "info"},
    "latency": {"severity": "warning", "for_seconds": 30, "resolve_after_seconds": 60},
    "queue_length_normal": {"severity": "warning", "for_seconds": 30, "resolve_after_seconds": 60},
    "queue_length_peak": {"severity": "critical", "for_seconds": 30, "resolve_after_seconds": 60},
    "worker_cpu": {"severity": "warning", "for_seconds": 60, "resolve_after_seconds": 60},
    "worker_memory": {"severity": "warning", "for_seconds": 60, "resolve_after_seconds": 60},
    "retry_rate": {"severity": "warning", "for_seconds": 60, "resolve_after_seconds": 120},
}


def _rule(name: str) -> Any:
    return Field(default_factory=lambda: RuleConfig(**_RULE_DEFAULTS[name]))


class RulesConfig(_Strict):
    """One named field per rule, so a misspelt rule name is an error."""

    task_failed: RuleConfig = _rule("task_failed")
    worker_offline: RuleConfig = _rule("worker_offline")
    worker_shutdown: RuleConfig = _rule("worker_shutdown")
    latency: RuleConfig = _rule("latency")
    queue_length_normal: RuleConfig = _rule("queue_length_normal")
    queue_length_peak: RuleConfig = _rule("queue_length_peak")
    worker_cpu: RuleConfig = _rule("worker_cpu")
    worker_memory: RuleConfig = _rule("worker_memory")
    retry_rate: RuleConfig = _rule("retry_rate")

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any) -> Any:
        # `latency: {for_seconds: 10}` keeps latency's default severity instead of RuleConfig's.
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, value in data.items():
            if name in _RULE_DEFAULTS and isinstance(value, dict):
                merged[name] = {**_RULE_DEFAULTS[name], **value}
        return merged


class MuteWindow(_Strict):
    """A daily time-of-day range in UTC, e.g. 22:00-06:00 (crosses midnight).

    ``weekdays`` are the days the window *starts* on (a Friday 22:00-06:00 window also
    covers Saturday until 06:00). ``severities`` limits the window to those severities;
    empty means all.
    """

    start: str = Field(description="HH:MM, UTC")
    end: str = Field(description="HH:MM, UTC; 24:00 is the end of the day")
    weekdays: list[Weekday] = Field(default_factory=lambda: list(WEEKDAYS))
    severities: list[Severity] = Field(default_factory=list)

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        _minutes(value)
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> MuteWindow:
        if self.start_minute == self.end_minute:
            raise ValueError(f"mute window {self.start}-{self.end} is empty; use 00:00-24:00 for a whole day")
        if self.start_minute == 24 * 60:
            raise ValueError("a mute window cannot start at 24:00")
        return self

    @property
    def start_minute(self) -> int:
        return _minutes(self.start)

    @property
    def end_minute(self) -> int:
        return _minutes(self.end)


def _minutes(clock: str) -> int:
    match = _CLOCK.match(clock)
    if not match:
        raise ValueError(f"{clock!r} is not a HH:MM time")
    hours, minutes = int(match[1]), int(match[2])
    if minutes > 59 or hours > 24 or (hours == 24 and minutes):
        raise ValueError(f"{clock!r} is not a time between 00:00 and 24:00")
    return hours * 60 + minutes


class AlertsConfig(_Strict):
    flower_url: str | None = Field(None, description="base URL of Flower, for task links")
    include_args: bool = Field(False, description="put task args/kwargs in alerts (may contain PII)")
    mention: str | None = Field(None, description="who to mention on critical alerts, e.g. <!subteam^S123>")
    channels: dict[Severity, str] = Field(default_factory=dict, description="bot mode: channel per severity")
    include_tasks: list[str] = Field(default_factory=lambda: ["*"], description="glob patterns on task name")
    exclude_tasks: list[str] = Field(default_factory=list, description="glob patterns on task name")
    mute: list[MuteWindow] = Field(default_factory=list)
    storm_window_seconds: float = Field(60.0, ge=0)
    rate_limit_per_second: float = Field(1.0, gt=0, description="messages per second per Slack channel")
    resolve_style: ResolveStyle = Field(
        "update", description="bot mode: a resolved alert edits its firing message, or replies in its thread"
    )
    templates_dir: Path | None = Field(None, description="templates here override the shipped ones by name")
    rules: RulesConfig = Field(default_factory=RulesConfig)

    @field_validator("flower_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"flower_url must be an http(s) URL with a host, got {value!r}")
        return value.rstrip("/")

    @field_validator("mention")
    @classmethod
    def _mention(cls, value: str | None) -> str | None:
        if value is not None and not _MENTION.match(value):
            raise ValueError(
                f"mention {value!r} is not a Slack mention: use <!subteam^ID>, <@U…>, <!here> or <!channel>"
            )
        return value

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: dict[Severity, str]) -> dict[Severity, str]:
        for severity, channel in value.items():
            if not channel.strip():
                raise ValueError(f"channels.{severity} is empty")
        return value

    @field_validator("templates_dir")
    @classmethod
    def _templates_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"templates_dir {str(value)!r} is not a directory")
        return value


def validate_webhook_url(url: str) -> str:
    """Refuse a webhook URL that is not https (plain http only to loopback, for tests).

    The messages never contain the URL itself: its path is the secret.
    """
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        raise ValueError("SLACK_WEBHOOK_URL is not a valid URL") from None
    if not host or parts.path in ("", "/"):
        raise ValueError("SLACK_WEBHOOK_URL must be a full URL like https://hooks.slack.com/services/T…/B…/…")
    if parts.scheme == "https":
        return url.strip()
    if parts.scheme == "http" and _is_loopback(host):
        return url.strip()
    raise ValueError(
        f"SLACK_WEBHOOK_URL must use https (got scheme {parts.scheme!r}, host {host!r}); "
        "plain http is only allowed to a loopback host"
    )


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_templates(cfg: AlertsConfig) -> None:
    """Render every template with a sample alert; raise ValueError naming a broken one."""
    MessageRenderer(cfg.templates_dir).check()

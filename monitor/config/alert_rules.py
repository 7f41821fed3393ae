"""The schema of the `alerts:` section of sidecar.yml: rules, routing and message rendering.

The alert engine reads `rules`; the delivery layer reads everything else. Unknown keys
are errors (a misspelt rule name or option is refused, not ignored). Secrets (webhook
URL, bot token) are not part of this file: they come from the environment.

Only the schema lives here. What needs the alerts package to check (that templates
render, that bot mode has its channels) is checked there when a config is loaded or
reloaded (``Dispatcher.check``), before the config is swapped in.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from celery_sidecar.monitor.signals import RULE_DEFAULTS, Severity

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ResolveStyle = Literal["update", "thread"]

_CLOCK = re.compile(r"^(\d{2}):(\d{2})$")
# Slack's special mentions: a user group, a user, or the channel-wide ones.
_MENTION = re.compile(r"^(<!subteam\^[A-Z0-9]+(\|[^>]*)?>|<@[UW][A-Z0-9]+>|<!here>|<!channel>)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleConfig(_Strict):
    enabled: bool = True
    severity: Severity = "warning"
    for_seconds: float = Field(0.0, ge=0, description="the condition must hold this long before firing")
    resolve_after_seconds: float = Field(
        0.0, ge=0, description="hysteresis: the condition must be clear this long before resolving"
    )


def _default_rule(name: str) -> RuleConfig:
    d = RULE_DEFAULTS[name]
    return RuleConfig(severity=d.severity, for_seconds=d.for_seconds, resolve_after_seconds=d.resolve_after_seconds)


class _RulesBase(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any) -> Any:
        # `latency: {for_seconds: 10}` keeps latency's default severity instead of RuleConfig's.
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, value in data.items():
            if name in RULE_DEFAULTS and isinstance(value, dict):
                merged[name] = {**_default_rule(name).model_dump(), **value}
        return merged

    def rule(self, name: str) -> RuleConfig:
        return getattr(self, name)


# One named field per rule (from the signal table), so a misspelt rule name is an error.
RulesConfig = create_model(
    "RulesConfig",
    __base__=_RulesBase,
    **{name: (RuleConfig, Field(default_factory=partial(_default_rule, name))) for name in RULE_DEFAULTS},
)


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


def _http_url(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name} must be an http(s) URL with a host, got {value!r}")
    return value.rstrip("/")


class AlertsConfig(_Strict):
    flower_url: str | None = Field(None, description="base URL of Flower, for task links")
    grafana_url: str | None = Field(None, description="base URL of Grafana, for dashboard links")
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
    rules: RulesConfig = Field(default_factory=RulesConfig)  # type: ignore[valid-type]

    @field_validator("flower_url")
    @classmethod
    def _flower_url(cls, value: str | None) -> str | None:
        return _http_url("flower_url", value)

    @field_validator("grafana_url")
    @classmethod
    def _grafana_url(cls, value: str | None) -> str | None:
        return _http_url("grafana_url", value)

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

"""Senders: one attempt to put a message somewhere, and a plain answer about how it went.

* `WebhookSender`: an incoming webhook (one fixed channel, no message ids, so no edits).
* `BotSender`: a bot token with chat.postMessage / chat.update, any channel.
* `ConsoleSender`: the log, when Slack is not configured.

A sender never retries and never sleeps: it returns `Sent`, `RateLimited` (with Slack's
Retry-After) or `Failed`, and the dispatcher decides when to try again. slack-sdk's retry
handlers are switched off so that every wait is the dispatcher's, visible and testable.
Each sender declares what it can do (a fixed channel or any, edits, threads, whether it
is rate limited); the dispatcher picks targets from that, never from the class.
Secrets never reach a log line or an error: every message from here is redacted.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.webhook import WebhookClient

from celery_sidecar.alerts.delivery.blocks import Message
from celery_sidecar.alerts.model import MessageRef

log = logging.getLogger(__name__)

WEBHOOK_CHANNEL = "webhook"
CONSOLE_CHANNEL = "console"
DEFAULT_RETRY_AFTER = 1.0
# chat.update cannot touch these; the resolution is posted in the thread instead.
_NOT_EDITABLE = {"message_not_found", "cant_update_message", "edit_window_closed", "channel_not_found"}


@dataclass(frozen=True)
class Sent:
    ref: MessageRef | None = None  # None when the transport does not say where the message went


@dataclass(frozen=True)
class RateLimited:
    retry_after: float


@dataclass(frozen=True)
class Failed:
    reason: str  # short and from a small set: it becomes a metric label
    detail: str = ""


Outcome = Sent | RateLimited | Failed


@dataclass(frozen=True)
class SlackSettings:
    """Where alerts go, from the environment: a bot token (with a default channel), a
    webhook, or neither (the console). Secrets are not shown in reprs."""

    webhook_url: str | None = field(default=None, repr=False)
    bot_token: str | None = field(default=None, repr=False)
    channel: str | None = None
    base_url: str | None = None  # a Slack-compatible API base, for tests and proxies


class Sender(Protocol):
    rate_limited: bool  # False: no per-channel pacing needed (the console)
    fixed_channel: str | None  # where every message goes ("webhook", "console"); None: any channel
    supports_edits: bool  # a resolution can edit its firing message
    supports_threads: bool  # ... or reply in its thread
    writes_log: bool  # the message itself is a log line: no "sent" line besides it

    def post(self, channel: str | None, message: Message, thread: MessageRef | None = None) -> Outcome: ...
    def edit(self, ref: MessageRef, message: Message) -> Outcome: ...
    def describe(self) -> str:
        """Where messages go, for the start-up log line: never a token or a webhook's path."""


class Redactor(logging.Filter):
    """Replaces secrets in text and in log records (slack-sdk logs the webhook URL at debug)."""

    def __init__(self, *secrets: str | None) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s]

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self(record.getMessage())
        record.args = None
        return True


class _OnlyDebug(logging.Filter):
    """slack-sdk logs a failed request at ERROR; the dispatcher logs every failed attempt
    itself, once, with its retry. So slack-sdk's own lines are debug detail, shown only when
    its logger is enabled for debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_ONLY_DEBUG = _OnlyDebug()


def _sdk_logger(redact: Redactor) -> logging.Logger:
    logger = logging.getLogger("alerts.slack.sdk")
    for wanted in (_ONLY_DEBUG, redact):
        if wanted not in logger.filters:
            logger.addFilter(wanted)
    return logger


class WebhookSender:
    rate_limited = True
    fixed_channel = WEBHOOK_CHANNEL
    supports_edits = False
    supports_threads = False
    writes_log = False

    # slack-sdk types timeouts as int, but urllib takes any float (tests use short ones).
    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self._redact = Redactor(url)
        self._host = _host(url)
        self._client = WebhookClient(url, timeout=timeout, logger=_sdk_logger(self._redact), retry_handlers=[])

    def post(self, channel: str | None, message: Message, thread: MessageRef | None = None) -> Outcome:
        try:
            response = self._client.send(text=message.text, blocks=message.blocks)
        except Exception as exc:  # noqa: BLE001 - any transport error is one failed attempt
            return _connection_failure(exc, self._redact)
        # WebhookClient returns HTTP errors, 429 included, instead of raising.
        if response.status_code == 200:
            return Sent()
        if response.status_code == 429:
            return RateLimited(_retry_after(response.headers))
        return Failed(f"http_{response.status_code}", self._redact(str(response.body)[:200]))

    def edit(self, ref: MessageRef, message: Message) -> Outcome:
        raise NotImplementedError("incoming webhooks cannot edit messages")

    def describe(self) -> str:
        return f"a Slack incoming webhook on {self._host}"


class BotSender:
    rate_limited = True
    fixed_channel = None
    supports_edits = True
    supports_threads = True
    writes_log = False

    def __init__(self, token: str, base_url: str | None = None, timeout: float = 10.0) -> None:
        self._redact = Redactor(token)
        options: dict[str, Any] = {}
        if base_url:
            options["base_url"] = base_url if base_url.endswith("/") else base_url + "/"
        self._host = _host(base_url) if base_url else "slack.com"
        self._client = WebClient(
            token=token, timeout=timeout, logger=_sdk_logger(self._redact), retry_handlers=[], **options
        )

    def post(self, channel: str | None, message: Message, thread: MessageRef | None = None) -> Outcome:
        if thread is not None:
            channel = thread.channel
        if not channel:
            return Failed("no_channel", "bot mode needs a channel for this severity")
        thread_args = {"thread_ts": thread.ts} if thread else {}
        return self._call(
            lambda: self._client.chat_postMessage(
                channel=channel, text=message.text, blocks=message.blocks, **thread_args
            )
        )

    def edit(self, ref: MessageRef, message: Message) -> Outcome:
        outcome = self._call(
            lambda: self._client.chat_update(channel=ref.channel, ts=ref.ts, text=message.text, blocks=message.blocks)
        )
        if isinstance(outcome, Failed) and outcome.reason in _NOT_EDITABLE:
            log.info(
                "cannot edit Slack message %s in %s (%s); replying in its thread",
                ref.ts,
                ref.channel,
                outcome.reason,
            )
            return self.post(None, message, thread=ref)
        return outcome

    def describe(self) -> str:
        return f"Slack's Web API on {self._host} with a bot token"

    def _call(self, request) -> Outcome:
        try:
            response = request()
        except SlackApiError as exc:
            if exc.response.status_code == 429:
                return RateLimited(_retry_after(exc.response.headers))
            error = exc.response.get("error") if isinstance(exc.response.data, dict) else None
            return Failed(str(error or f"http_{exc.response.status_code}"), self._redact(str(exc))[:300])
        except Exception as exc:  # noqa: BLE001 - any transport error is one failed attempt
            return _connection_failure(exc, self._redact)
        return Sent(MessageRef(channel=str(response["channel"]), ts=str(response["ts"])))


class ConsoleSender:
    """Writes the plain-text rendering to the log, at a level that matches the severity."""

    rate_limited = False
    fixed_channel = CONSOLE_CHANNEL
    supports_edits = False
    supports_threads = False
    writes_log = True
    # Firing alerts by severity. A resolution is good news: INFO whatever its severity, so that
    # whoever pages on ERROR lines is not paged when things recover.
    _LEVELS = {"critical": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO}

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("alerts.console")

    def post(self, channel: str | None, message: Message, thread: MessageRef | None = None) -> Outcome:
        level = logging.INFO if message.status == "resolved" else self._LEVELS[message.severity]
        self._log.log(level, "%s", message.plain)
        return Sent()

    def edit(self, ref: MessageRef, message: Message) -> Outcome:
        raise NotImplementedError("the console cannot edit")

    def describe(self) -> str:
        return f"the log (logger {self._log.name}): no Slack webhook or bot token is configured"


def _retry_after(headers: Any) -> float:
    for name, value in dict(headers or {}).items():
        if name.lower() == "retry-after":
            value = value[0] if isinstance(value, list) else value
            try:
                return max(0.0, float(value))
            except (TypeError, ValueError):
                break
    return DEFAULT_RETRY_AFTER


def _connection_failure(exc: Exception, redact: Redactor) -> Failed:
    reason = "timeout" if "timed out" in str(exc).lower() or isinstance(exc, TimeoutError) else "connection"
    return Failed(reason, redact(f"{type(exc).__name__}: {exc}")[:300])


def _host(url: str) -> str:
    """Host and port of a URL: where it goes, without the path (a webhook's path is its secret)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


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
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

"""Alert delivery: the engine's alerts, routed, persisted, and sent to Slack at least once.

The wiring calls::

    dispatcher = build_dispatcher(live_config, SlackSettings(...), open_outbox(broker_url, state_dir),
                                  registry=..., instance_id=f"{hostname}:{pid}")
    dispatcher.start()
    dispatcher.submit(alert)          # never blocks: an in-memory queue
    dispatcher.check(new_config)      # before a reload is swapped in: ValueError refuses it
    dispatcher.stop(timeout=5)        # sends what is due, leaves the rest in the outbox

It reads the alerts section of the config in force on every alert, so a reload needs
nothing from it beyond ``check``.

One background thread does the rest, one alert at a time: route (include/exclude, mute),
persist to the outbox, then send when due. Per Slack channel it paces sends
(`rate_limit_per_second`) and after a 429 waits Retry-After; other failures back off
exponentially. Before sending, it claims the alert's key in the outbox and re-checks the
key is not delivered yet; after Slack accepts, the key is marked delivered. So two
sidecars on one Redis post each key once, and a restarted sidecar resends what was
pending (at least once: a crash between Slack's answer and the mark resends it).
See docs/alerts-delivery.md.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from celery_sidecar.alerts.blocks import (
    Message,
    MessageRenderer,
    TemplateRenderError,
    check_templates,
    fallback_message,
)
from celery_sidecar.alerts.model import Alert, MessageRef
from celery_sidecar.alerts.outbox import Outbox
from celery_sidecar.alerts.routing import Router
from celery_sidecar.alerts.slack import (
    BotSender,
    ConsoleSender,
    Failed,
    Outcome,
    RateLimited,
    Sender,
    Sent,
    SlackSettings,
    WebhookSender,
    validate_webhook_url,
)
from celery_sidecar.monitor.alerts_config import AlertsConfig
from celery_sidecar.monitor.config import Config, LiveConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryTiming:
    """How long to wait for what. The defaults are for production; tests shorten them."""

    backoff_base: float = 1.0  # first retry after a failure; doubles per failure
    backoff_cap: float = 60.0
    http_timeout: float = 10.0
    lease_seconds: float = 60.0  # a claim outlives any single attempt (http_timeout and then some)
    claim_recheck_seconds: float = 5.0  # another sidecar holds the claim: look again this soon
    delivered_ttl: float = 24 * 3600.0  # dedup memory; older pending alerts are given up
    message_ttl: float = 7 * 24 * 3600.0  # how long a resolution can still find its firing message
    rescan_seconds: float = 30.0  # pick up alerts that other sidecars left in the shared outbox
    max_pending: int = 10_000


class DeliveryMetrics:
    def __init__(self, registry: CollectorRegistry, pending: Callable[[], int]) -> None:
        self.registry = registry
        self.sent = Counter(
            "celery_sidecar_alerts_sent",
            "Alerts Slack (or the console) accepted",
            ["channel"],
            registry=registry,
        )
        self.failed = Counter(
            "celery_sidecar_alerts_failed",
            "Failed delivery attempts (each is retried)",
            ["reason"],
            registry=registry,
        )
        self.dropped = Counter(
            "celery_sidecar_alerts_dropped",
            "Alerts not sent on purpose: muted, excluded, suppressed, expired or overflow",
            ["reason"],
            registry=registry,
        )
        registry.register(_PendingCollector(pending))


class _PendingCollector:
    def __init__(self, pending: Callable[[], int]) -> None:
        self._pending = pending

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "celery_sidecar_alerts_pending",
            "Alerts accepted and not yet delivered by this sidecar",
            value=self._pending(),
        )


@dataclass
class _Pending:
    alert: Alert
    seq: int  # submission order: breaks ties so a channel's alerts go out in order
    due: float
    attempts: int = 0
    persisted: bool = False
    sent_unrecorded: bool = False  # Slack took it but marking it delivered failed: only record it


@dataclass(frozen=True)
class _Target:
    label: str  # metric label: the configured channel, "webhook" or "console"
    channel: str | None  # where to post (bot mode)
    pace_key: str  # what the rate limit is per
    edit: MessageRef | None = None
    thread: MessageRef | None = None


@dataclass
class _Settings:
    cfg: AlertsConfig
    renderer: MessageRenderer = field(repr=False)


class Dispatcher:
    def __init__(
        self,
        config: LiveConfig,
        sender: Sender,
        outbox: Outbox,
        *,
        registry: CollectorRegistry,
        instance_id: str,
        default_channel: str | None = None,
        timing: DeliveryTiming | None = None,
    ) -> None:
        _check_channels(config.current.alerts, sender, default_channel)
        self._live = config
        self._settings_cache = _Settings(config.current.alerts, MessageRenderer(config.current.alerts.templates_dir))
        self._sender = sender
        self._outbox = outbox
        self._instance_id = instance_id
        self._default_channel = default_channel
        self._timing = timing or DeliveryTiming()
        self._intake: queue.Queue[Alert | None] = queue.Queue(maxsize=self._timing.max_pending)
        self._router = Router()
        self._items: dict[str, _Pending] = {}
        self._schedule: list[tuple[float, int, str]] = []  # heap; entries whose due changed are skipped
        self._firing_by_group: dict[str, str] = {}
        self._next_send: dict[str, float] = {}
        self._seq = itertools.count()
        self._next_rescan = 0.0
        self._stopping = threading.Event()
        self._stop_deadline = 0.0
        self._thread: threading.Thread | None = None
        self.metrics = DeliveryMetrics(registry, self.pending_count)

    # -- the API ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="alert-delivery", daemon=True)
        self._thread.start()

    def submit(self, alert: Alert) -> None:
        """Hand over an alert; returns at once. Only a full queue (max_pending) loses it."""
        try:
            self._intake.put_nowait(alert)
        except queue.Full:
            self.metrics.dropped.labels("overflow").inc()
            log.error("alert queue full (%d): dropping alert %s", self._timing.max_pending, alert.key)

    def check(self, config: Config) -> None:
        """Refuse (ValueError) a config this dispatcher cannot work with: a template that
        does not render, or bot mode without a channel for some severity."""
        check_templates(config.alerts)
        _check_channels(config.alerts, self._sender, self._default_channel)

    @property
    def _settings(self) -> _Settings:
        """The alerts config in force, with its renderer (rebuilt only when it changed)."""
        cfg = self._live.current.alerts
        if cfg is not self._settings_cache.cfg:
            self._settings_cache = _Settings(cfg, MessageRenderer(cfg.templates_dir))
        return self._settings_cache

    def stop(self, timeout: float = 5.0) -> None:
        """Persist everything submitted, send what is due until `timeout`, keep the rest for next start."""
        self._stop_deadline = time.monotonic() + max(0.0, timeout - 0.5)
        self._stopping.set()
        with contextlib.suppress(queue.Full):  # a full queue wakes the thread anyway
            self._intake.put_nowait(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("alert delivery still busy after %.1fs; pending alerts stay in the outbox", timeout)
                return
        self._outbox.close()

    def pending_count(self) -> int:
        return len(self._items) + self._intake.qsize()

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not (self._stopping.is_set() and self._intake.empty() and self._flushed()):
            try:
                self._step()
            except Exception:
                # A bug must not end delivery for good: log it, pause, carry on.
                log.exception("alert delivery loop error")
                time.sleep(1.0)

    def _step(self) -> None:
        self._take_intake(self._idle_seconds())
        if time.monotonic() >= self._next_rescan:
            self._rescan()
        item = self._pop_due()
        if item is not None:
            self._attempt(item)

    def _flushed(self) -> bool:
        return time.monotonic() >= self._stop_deadline or not self._has_due()

    def _idle_seconds(self) -> float:
        now = time.monotonic()
        if self._has_due():
            return 0.0
        wake = self._next_rescan
        if self._schedule:
            wake = min(wake, self._schedule[0][0])
        if self._stopping.is_set():
            wake = min(wake, self._stop_deadline)
        return min(max(0.0, wake - now), 1.0)

    def _take_intake(self, wait: float) -> None:
        try:
            alert = self._intake.get(timeout=wait) if wait > 0 else self._intake.get_nowait()
            while True:
                if alert is not None:
                    self._accept(alert)
                alert = self._intake.get_nowait()
        except queue.Empty:
            return

    def _accept(self, alert: Alert) -> None:
        verdict = self._router.route(alert, self._settings.cfg, time.time())
        if not verdict.send:
            self.metrics.dropped.labels(verdict.reason).inc()
            log.info("alert %s not sent: %s", alert.key, verdict.reason)
            return
        if alert.key in self._items:
            return
        if len(self._items) >= self._timing.max_pending:
            self.metrics.dropped.labels("overflow").inc()
            log.error("%d alerts pending: dropping alert %s", len(self._items), alert.key)
            return
        item = self._enqueue(alert, persisted=False)
        try:
            self._outbox.put(alert)
            item.persisted = True
        except Exception as exc:  # noqa: BLE001 - kept in memory; the attempt persists it again
            log.warning("could not persist alert %s to the outbox: %s", alert.key, exc)

    def _rescan(self) -> None:
        """Load pending alerts: at start, ours from before a restart; later, ones other sidecars left."""
        self._next_rescan = time.monotonic() + self._timing.rescan_seconds
        try:
            alerts = self._outbox.load()
        except Exception as exc:  # noqa: BLE001 - the broker may be down; try again next rescan
            log.warning("could not read the alert outbox: %s", exc)
            self._next_rescan = time.monotonic() + min(self._timing.rescan_seconds, self._timing.backoff_cap)
            return
        for alert in alerts:
            if alert.key not in self._items and len(self._items) < self._timing.max_pending:
                self._enqueue(alert, persisted=True)

    def _enqueue(self, alert: Alert, persisted: bool) -> _Pending:
        item = _Pending(alert, next(self._seq), due=time.monotonic(), persisted=persisted)
        self._items[alert.key] = item
        if alert.status == "firing":
            self._firing_by_group[alert.group] = alert.key
        heapq.heappush(self._schedule, (item.due, item.seq, alert.key))
        return item

    def _has_due(self) -> bool:
        return bool(self._schedule) and self._schedule[0][0] <= time.monotonic()

    def _pop_due(self) -> _Pending | None:
        while self._has_due():
            due, _, key = heapq.heappop(self._schedule)
            item = self._items.get(key)
            if item is not None and item.due == due:
                return item
        return None

    def _retry_at(self, item: _Pending, due: float) -> None:
        item.due = due
        heapq.heappush(self._schedule, (due, item.seq, item.alert.key))

    def _forget(self, item: _Pending) -> None:
        alert = item.alert
        self._items.pop(alert.key, None)
        if self._firing_by_group.get(alert.group) == alert.key:
            del self._firing_by_group[alert.group]

    # -- one attempt ----------------------------------------------------------------------------

    def _attempt(self, item: _Pending) -> None:
        alert, now = item.alert, time.monotonic()
        try:
            if item.sent_unrecorded:
                self._record_delivered(item)
                return
            if self._expired(alert):
                self._outbox.discard(alert.key)
                self._forget(item)
                self.metrics.dropped.labels("expired").inc()
                log.error("giving up on alert %s: older than %.0fs", alert.key, self._timing.delivered_ttl)
                return
            if not item.persisted:
                self._outbox.put(alert)
                item.persisted = True
            if self._outbox.is_delivered(alert.key):
                self._forget(item)
                return
            firing = self._firing_by_group.get(alert.group)
            if alert.status == "resolved" and firing in self._items:
                # Its firing message is not out yet: go after it, to edit or thread onto it.
                self._retry_at(item, max(now, self._items[firing].due))
                return
            target = self._target(alert)
            wait = self._next_send.get(target.pace_key, 0.0) - now
            if self._sender.rate_limited and wait > 0:
                self._retry_at(item, now + wait)
                return
            held_for = self._outbox.claim(alert.key, self._instance_id, self._timing.lease_seconds)
            if held_for:
                self._retry_at(item, now + min(held_for, self._timing.claim_recheck_seconds))
                return
            self._send_claimed(item, target)
        except Exception as exc:  # noqa: BLE001 - the outbox's Redis may be down: retry like a failed send
            log.warning("alert %s: delivery step failed: %s", alert.key, exc)
            self._failed(item, Failed("outbox_error", str(exc)))

    def _send_claimed(self, item: _Pending, target: _Target) -> None:
        alert = item.alert
        # The previous holder may have finished between our check and our claim.
        if self._outbox.is_delivered(alert.key):
            self._outbox.release(alert.key, self._instance_id)
            self._forget(item)
            return
        outcome = self._send(alert, target)
        if self._sender.rate_limited:
            self._next_send[target.pace_key] = time.monotonic() + 1.0 / self._settings.cfg.rate_limit_per_second
        if isinstance(outcome, Sent):
            self.metrics.sent.labels(target.label).inc()
            item.sent_unrecorded = True
            if outcome.ref is not None and alert.status == "firing":
                self._outbox.remember_message(alert.group, outcome.ref, self._timing.message_ttl)
            self._record_delivered(item)
            return
        self._outbox.release(alert.key, self._instance_id)
        if isinstance(outcome, RateLimited):
            self._rate_limited(item, target, outcome)
        else:
            self._failed(item, outcome)

    def _send(self, alert: Alert, target: _Target) -> Outcome:
        message = self._message(alert)
        if target.edit is not None:
            return self._sender.edit(target.edit, message)
        return self._sender.post(target.channel, message, thread=target.thread)

    def _record_delivered(self, item: _Pending) -> None:
        self._outbox.mark_delivered(item.alert.key, self._timing.delivered_ttl)
        self._outbox.release(item.alert.key, self._instance_id)
        self._forget(item)
        log.debug("alert %s delivered", item.alert.key)

    def _rate_limited(self, item: _Pending, target: _Target, outcome: RateLimited) -> None:
        # Not a failure of the alert: it waits with everything else for that channel, no backoff.
        now = time.monotonic()
        self._next_send[target.pace_key] = max(self._next_send.get(target.pace_key, 0.0), now + outcome.retry_after)
        self.metrics.failed.labels("rate_limited").inc()
        log.warning(
            "Slack rate limit on %s: waiting %.1fs (alert %s)",
            target.label,
            outcome.retry_after,
            item.alert.key,
        )
        self._retry_at(item, now + outcome.retry_after)

    def _failed(self, item: _Pending, outcome: Failed) -> None:
        item.attempts += 1
        delay = min(self._timing.backoff_cap, self._timing.backoff_base * 2 ** (item.attempts - 1))
        self.metrics.failed.labels(outcome.reason).inc()
        log.warning(
            "alert %s: attempt %d failed (%s%s); retrying in %.1fs",
            item.alert.key,
            item.attempts,
            outcome.reason,
            f": {outcome.detail}" if outcome.detail else "",
            delay,
        )
        self._retry_at(item, time.monotonic() + delay)

    def _expired(self, alert: Alert) -> bool:
        # Past the dedup TTL a resend could duplicate, and the news is stale anyway.
        return alert.created_at > 0 and time.time() - alert.created_at > self._timing.delivered_ttl

    def _target(self, alert: Alert) -> _Target:
        sender = self._sender
        if sender.fixed_channel is not None:
            return _Target(sender.fixed_channel, None, sender.fixed_channel)
        cfg = self._settings.cfg
        channel = cfg.channels.get(alert.severity, self._default_channel)
        label = channel or "none"
        can_follow_up = sender.supports_edits or sender.supports_threads
        ref = self._outbox.find_message(alert.group) if alert.status == "resolved" and can_follow_up else None
        if ref is None:
            return _Target(label, channel, channel or "none")
        if cfg.resolve_style == "update" and sender.supports_edits:
            return _Target(label, ref.channel, ref.channel, edit=ref)
        if sender.supports_threads:
            return _Target(label, ref.channel, ref.channel, thread=ref)
        return _Target(label, channel, channel or "none")

    def _message(self, alert: Alert) -> Message:
        settings = self._settings
        cfg = settings.cfg
        mention = cfg.mention if alert.severity == "critical" and alert.status == "firing" else None
        try:
            return settings.renderer.message(alert, mention)
        except TemplateRenderError as exc:
            log.error("%s; sending alert %s without the template", exc, alert.key)
            return fallback_message(alert, mention)


def _check_channels(cfg: AlertsConfig, sender: Sender, default_channel: str | None) -> None:
    if sender.fixed_channel is None and not default_channel:
        missing = [s for s in ("info", "warning", "critical") if s not in cfg.channels]
        if missing:
            raise ValueError(
                f"bot mode needs SLACK_CHANNEL or alerts.channels for every severity (missing: {', '.join(missing)})"
            )


def build_dispatcher(
    config: LiveConfig,
    slack: SlackSettings,
    outbox: Outbox,
    *,
    registry: CollectorRegistry,
    instance_id: str,
    timing: DeliveryTiming | None = None,
) -> Dispatcher:
    """A dispatcher for the configured Slack (bot token wins over webhook; neither: the console).

    `instance_id` must differ between sidecars sharing a broker (e.g. "hostname:pid").
    Raises ValueError on a bad webhook URL, missing channels or a broken template.
    """
    timing = timing or DeliveryTiming()
    sender: Sender
    if slack.bot_token:
        if slack.webhook_url:
            log.info("both SLACK_BOT_TOKEN and SLACK_WEBHOOK_URL are set: using the bot token")
        sender = BotSender(slack.bot_token, base_url=slack.base_url, timeout=timing.http_timeout)
    elif slack.webhook_url:
        sender = WebhookSender(validate_webhook_url(slack.webhook_url), timeout=timing.http_timeout)
    else:
        log.info("no Slack configured: alerts go to the log")
        sender = ConsoleSender()
    dispatcher = Dispatcher(config, sender, outbox, registry=registry, instance_id=instance_id,
                            default_channel=slack.channel, timing=timing)
    dispatcher.check(config.current)
    return dispatcher

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
persist to the outbox, then send when due (alerts/delivery/schedule.py keeps the due
times and paces each channel; alerts/delivery/targets.py says where each alert goes).
After a 429 a channel waits Retry-After; other failures back off exponentially. Before
sending, it claims the alert's key in the outbox and re-checks the key is not delivered
yet; after Slack accepts, the key is marked delivered. So two sidecars on one Redis post
each key once, and a restarted sidecar resends what was pending (at least once: a crash
between Slack's answer and the mark resends it). See docs/alerts-delivery.md.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from celery_sidecar.alerts.delivery.blocks import LiveMessages, check_templates
from celery_sidecar.alerts.delivery.metrics import DeliveryMetrics
from celery_sidecar.alerts.delivery.outbox import Outbox
from celery_sidecar.alerts.delivery.routing import Router
from celery_sidecar.alerts.delivery.schedule import Pacer, Pending, Schedule
from celery_sidecar.alerts.delivery.slack import Failed, Outcome, RateLimited, Sender, Sent, SlackSettings
from celery_sidecar.alerts.delivery.targets import Target, Targets, make_sender
from celery_sidecar.alerts.model import Alert
from celery_sidecar.monitor.config.settings import Config, LiveConfig

__all__ = ["DeliveryMetrics", "DeliveryTiming", "Dispatcher", "build_dispatcher"]

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
        self._targets = Targets(sender, outbox, default_channel)
        self._targets.check(config.current.alerts)
        self._live = config
        self._messages = LiveMessages(config)
        self._sender = sender
        self._outbox = outbox
        self._instance_id = instance_id
        self._timing = timing or DeliveryTiming()
        self._intake: queue.Queue[Alert | None] = queue.Queue(maxsize=self._timing.max_pending)
        self._router = Router()
        self._schedule = Schedule()
        self._pacer = Pacer()
        self._next_rescan = 0.0
        self._stopping = threading.Event()
        self._stop_deadline = 0.0
        self._thread: threading.Thread | None = None
        self.metrics = DeliveryMetrics(registry, self.pending_count)

    # -- the API ------------------------------------------------------------------------------

    def start(self) -> None:
        log.info("alerts go to %s", self._targets.describe(self._live.current.alerts))
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
        self._targets.check(config.alerts)

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
        return len(self._schedule) + self._intake.qsize()

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
        item = self._schedule.pop_due()
        if item is not None:
            self._attempt(item)

    def _flushed(self) -> bool:
        return time.monotonic() >= self._stop_deadline or not self._schedule.has_due()

    def _idle_seconds(self) -> float:
        if self._schedule.has_due():
            return 0.0
        wakes = [self._next_rescan, self._schedule.next_due()]
        if self._stopping.is_set():
            wakes.append(self._stop_deadline)
        wake = min(w for w in wakes if w is not None)
        return min(max(0.0, wake - time.monotonic()), 1.0)

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
        verdict = self._router.route(alert, self._messages.cfg, time.time())
        if not verdict.send:
            self.metrics.dropped.labels(verdict.reason).inc()
            log.info("alert %s not sent: %s", alert.key, verdict.reason)
            return
        if alert.key in self._schedule:
            return
        if len(self._schedule) >= self._timing.max_pending:
            self.metrics.dropped.labels("overflow").inc()
            log.error("%d alerts pending: dropping alert %s", len(self._schedule), alert.key)
            return
        item = self._schedule.add(alert, persisted=False)
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
            if alert.key not in self._schedule and len(self._schedule) < self._timing.max_pending:
                self._schedule.add(alert, persisted=True)

    # -- one attempt ----------------------------------------------------------------------------

    def _attempt(self, item: Pending) -> None:
        try:
            if self._settled(item):
                return
            target = self._targets.resolve(item.alert, self._messages.cfg)
            later = self._not_before(item, target)
            if later is not None:
                self._schedule.retry_at(item, later)
                return
            self._send_claimed(item, target)
        except Exception as exc:  # noqa: BLE001 - the outbox's Redis may be down: retry like a failed send
            self._failed(item, Failed("outbox_error", str(exc)))

    def _settled(self, item: Pending) -> bool:
        """Done with this item without sending: recorded now, given up on, or delivered already.
        Otherwise make sure it is in the outbox before anything is sent."""
        alert = item.alert
        if item.sent_unrecorded:
            self._record_delivered(item)
            return True
        if self._expired(alert):
            self._outbox.discard(alert.key)
            self._schedule.forget(item)
            self.metrics.dropped.labels("expired").inc()
            log.error("giving up on alert %s: older than %.0fs", alert.key, self._timing.delivered_ttl)
            return True
        if not item.persisted:
            self._outbox.put(alert)
            item.persisted = True
        if self._outbox.is_delivered(alert.key):
            self._schedule.forget(item)
            return True
        return False

    def _not_before(self, item: Pending, target: Target) -> float | None:
        """When to come back to this item instead of sending it now; None: send now (it is claimed)."""
        alert, now = item.alert, time.monotonic()
        firing_due = self._schedule.firing_due(alert) if alert.status == "resolved" else None
        if firing_due is not None:
            # Its firing message is not out yet: go after it, to edit or thread onto it.
            return max(now, firing_due)
        wait = self._pacer.wait(target.pace_key, now)
        if self._sender.rate_limited and wait > 0:
            return now + wait
        held_for = self._outbox.claim(alert.key, self._instance_id, self._timing.lease_seconds)
        if held_for:
            return now + min(held_for, self._timing.claim_recheck_seconds)
        return None

    def _send_claimed(self, item: Pending, target: Target) -> None:
        alert = item.alert
        # The previous holder may have finished between our check and our claim.
        if self._outbox.is_delivered(alert.key):
            self._outbox.release(alert.key, self._instance_id)
            self._schedule.forget(item)
            return
        outcome = self._send(alert, target)
        if self._sender.rate_limited:
            self._pacer.sent(target.pace_key, self._messages.cfg.rate_limit_per_second)
        if isinstance(outcome, Sent):
            self._accepted(item, target, outcome)
            return
        self._outbox.release(alert.key, self._instance_id)
        if isinstance(outcome, RateLimited):
            self._rate_limited(item, target, outcome)
        else:
            self._failed(item, outcome)

    def _send(self, alert: Alert, target: Target) -> Outcome:
        message = self._messages.message(alert)
        if target.edit is not None:
            return self._sender.edit(target.edit, message)
        return self._sender.post(target.channel, message, thread=target.thread)

    def _accepted(self, item: Pending, target: Target, outcome: Sent) -> None:
        alert = item.alert
        self.metrics.sent.labels(target.label).inc()
        if not self._sender.writes_log:
            how = "edited in" if target.edit else "posted to"
            log.info("alert %s %s: %s (%s)", how, target.label, alert.title, alert.status)
        item.sent_unrecorded = True
        if outcome.ref is not None and alert.status == "firing":
            self._outbox.remember_message(alert.group, outcome.ref, self._timing.message_ttl)
        self._record_delivered(item)

    def _record_delivered(self, item: Pending) -> None:
        self._outbox.mark_delivered(item.alert.key, self._timing.delivered_ttl)
        self._outbox.release(item.alert.key, self._instance_id)
        self._schedule.forget(item)
        log.debug("alert %s delivered", item.alert.key)

    def _rate_limited(self, item: Pending, target: Target, outcome: RateLimited) -> None:
        # Not a failure of the alert: it waits with everything else for that channel, no backoff.
        self._pacer.hold(target.pace_key, outcome.retry_after)
        self.metrics.failed.labels("rate_limited").inc()
        log.warning("Slack rate limit on %s: waiting %.1fs (alert %s)", target.label, outcome.retry_after,
                    item.alert.key)
        self._schedule.retry_at(item, time.monotonic() + outcome.retry_after)

    def _failed(self, item: Pending, outcome: Failed) -> None:
        """The one log line of a failed attempt, with its reason and when it is tried again."""
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
        self._schedule.retry_at(item, time.monotonic() + delay)

    def _expired(self, alert: Alert) -> bool:
        # Past the dedup TTL a resend could duplicate, and the news is stale anyway.
        return alert.created_at > 0 and time.time() - alert.created_at > self._timing.delivered_ttl


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
    sender = make_sender(slack, timing.http_timeout)
    dispatcher = Dispatcher(config, sender, outbox, registry=registry, instance_id=instance_id,
                            default_channel=slack.channel, timing=timing)
    dispatcher.check(config.current)
    return dispatcher

"""The stream is evidence, not truth: what each worker says of itself, held against the events.

Every ``worker-heartbeat`` carries ``processed``: the tasks that worker has accepted (started)
since it began (celery/worker/state.py ``all_total_count``); each accepted task also sends one
``task-started`` event, retries included. So between two heartbeats of one worker, the growth
of ``processed`` is how many task-started events the sidecar should have folded for it, and
the shortfall is an estimate of the task events it missed: lost in a reconnect, dropped by the
broker, or never published.

The comparison is made per heartbeat period, by the worker's own clock (heartbeats and task
events carry the same host's timestamps), and one heartbeat late: a worker sends its task
events in buffered groups, so a few of the events before a heartbeat may arrive after it. A
period is settled when the next heartbeat arrives; by then everything the worker sent before
it has arrived, or was lost.

What real fleets do, and how it is handled:

- a worker restarts (a new pid, or ``processed`` going backwards): a new baseline, nothing
  compared across the restart;
- the sidecar starts mid-stream: the first heartbeat that carries ``processed`` is the
  baseline; events from before it are not compared;
- heartbeats are lost too: the next one settles the whole longer period;
- a retry is accepted again and sends task-started again: both sides count it;
- a worker that sends no task events at all is not counted: that is the -E advice
  (monitor/advice.py), not a lossy stream.

Bounds: one tally per worker record (the worker fold's bound); per tally, the timestamps of
the task-started events of about one heartbeat period, at most ``MAX_PENDING``: past that the
tally starts over at the next heartbeat instead of guessing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

MAX_PENDING = 200_000  # task-started timestamps waiting for their period to settle, per worker
SETTLE_SECONDS = 5.0  # a heartbeat's period is compared this long after the heartbeat arrived


@dataclass(slots=True)
class Tally:
    """One worker's count of task-started events against its own ``processed``."""

    pid: int | None
    settled_ts: float  # the worker's timestamp up to which events have been compared
    settled_processed: int  # its ``processed`` at that moment
    last_processed: int  # the latest ``processed`` it sent (settled or not): a restart goes below
    # Heartbeats not compared yet: (timestamp, processed, received here).
    unsettled: deque[tuple[float, int, float]] = field(default_factory=deque)
    pending: list[float] = field(default_factory=list)  # started timestamps after settled_ts
    overflow: bool = False  # too many pending events: start over at the next heartbeat
    expected: int = 0  # task-started events the worker's heartbeats account for
    missed: int = 0  # ... and how many of them never arrived

    def settle(self, now: float) -> tuple[int, int]:
        """Compare every heartbeat period that has had time to arrive whole.
        Returns (expected, missed) newly counted."""
        expected = missed = 0
        unsettled = self.unsettled
        while unsettled and now - unsettled[0][2] >= SETTLE_SECONDS:
            until, count, _received = unsettled.popleft()
            pending = self.pending
            seen = sum(1 for t in pending if self.settled_ts < t <= until)
            self.pending = [t for t in pending if t > until]
            grew = count - self.settled_processed
            short = grew - seen if grew > seen else 0
            expected += grew
            missed += short
            self.settled_ts, self.settled_processed = until, count
        self.expected += expected
        self.missed += missed
        return expected, missed


class StreamCheck:
    """Tallies per worker, and the fleet's totals (which survive a worker being forgotten)."""

    def __init__(self) -> None:
        self.tallies: dict[str, Tally] = {}
        self.expected = 0
        self.missed = 0
        self.end_unseen = 0  # running tasks a worker no longer held, whose end event never came

    def started(self, hostname: str, ts: float) -> None:
        tally = self.tallies.get(hostname)
        if tally is not None:  # once per task: the tally's own method would be one more frame
            pending = tally.pending
            pending.append(ts)
            if len(pending) > MAX_PENDING:
                pending.clear()
                tally.overflow = True

    def heartbeat(self, hostname: str, ts: float, processed: int | None, pid: int | None,
                  counted: bool, received: float) -> None:
        """``counted``: the worker is known to send task events (else its work is not the
        stream's loss, but the -E advice's)."""
        if processed is None:
            return  # a reply to a heartbeat request carries no count: no evidence either way
        tally = self.tallies.get(hostname)
        restarted = tally is not None and (
            (pid is not None and tally.pid is not None and pid != tally.pid) or processed < tally.last_processed)
        if tally is None or restarted or tally.overflow or not counted:
            if tally is not None and not restarted and not tally.overflow:
                self._settle(tally, received)  # what it sent before stays compared
            self.tallies[hostname] = Tally(pid, ts, processed, processed)
            return
        tally.last_processed = processed
        tally.unsettled.append((ts, processed, received))
        self._settle(tally, received)

    def online(self, hostname: str, ts: float, pid: int | None) -> None:
        """A worker (re)started: it has accepted nothing yet, a baseline of 0 at its start."""
        self.tallies[hostname] = Tally(pid, ts, 0, 0)

    def tick(self, now: float) -> None:
        for tally in self.tallies.values():
            if tally.unsettled:
                self._settle(tally, now)

    def _settle(self, tally: Tally, now: float) -> None:
        expected, missed = tally.settle(now)
        self.expected += expected
        self.missed += missed

    def end_unseen_on(self, hostname: str, count: int) -> None:
        self.end_unseen += count
        tally = self.tallies.get(hostname)
        if tally is not None:
            tally.missed += count
        self.missed += count

    def forget(self, hostname: str) -> None:
        self.tallies.pop(hostname, None)


@dataclass(slots=True)
class StreamSample:
    at: float
    expected: int
    missed: int
    reconnects: int
    lag: float  # the consumer's lag behind the stream at that moment


class StreamWindow:
    """The fleet's expected and missed counts over a sliding window, sampled once a tick:
    the share the "event stream incomplete" alert is judged by. Bound: one sample a tick
    over the window."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.samples: deque[StreamSample] = deque()

    def add(self, sample: StreamSample) -> None:
        samples = self.samples
        samples.append(sample)
        while len(samples) > 1 and sample.at - samples[0].at > self.seconds:
            samples.popleft()

    def delta(self) -> tuple[int, int, int, float]:
        """(expected, missed, reconnects, the worst lag) over the window."""
        if len(self.samples) < 2:
            return 0, 0, 0, 0.0
        first, last = self.samples[0], self.samples[-1]
        return (last.expected - first.expected, last.missed - first.missed, last.reconnects - first.reconnects,
                max(s.lag for s in self.samples))

"""Running records held against the workers' own word: no phantom stuck or lost tasks.

A task whose end event was lost looks like it runs forever, and would page as stuck long
after it finished. The worker knows better: inspect ``active`` lists the tasks it runs now,
and each heartbeat's ``active`` says how many. So:

- a heartbeat whose ``active`` is below the records the sidecar holds on that worker (older
  than ``ACTIVE_GRACE``, so events still in flight do not count) asks the worker which;
- a running task nearing its stuck limit asks its worker, ``PRECHECK`` seconds ahead, and
  again every ``FRESH`` seconds while it stays over the limit;
- a task the worker does not hold is closed ``GONE_SETTLE`` seconds later, if its end event
  has not come by then: no page, counted as an end unseen, and as a missed event;
- a task past its limit pages only once confirmed: its worker said it runs it, or did not
  answer at all (a wedged worker is the classic stuck task). A task started too close to the
  question to be in the answer gets its worker asked again ``ASK_AGAIN`` seconds later.

The asking happens on the probes' thread (monitor/intake/probes.py ``Poller.verify``); the
fold only says whom to ask and folds the answers. Bounds: per running task at most one
entry in ``held_at`` and ``gone_at`` (pruned with the running set); per worker one ask time;
the last ``MAX_CLOSED`` closed ids.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery_sidecar.monitor.fold.tasks import TaskFold

ACTIVE_GRACE = 5.0  # records younger than this are not held against a heartbeat's ``active``
PRECHECK = 5.0  # a running task is checked this long before it reaches its stuck limit
FRESH = 30.0  # a stuck task's confirmation is renewed this often
ASK_EVERY = 10.0  # per worker, at most one question this often
GONE_SETTLE = 3.0  # a task its worker no longer holds is closed after this, unless it ended
ASKED_AHEAD = 1.0  # a task started this close to the question may not be in the answer yet
ASK_AGAIN = 2.0  # ... so its worker may be asked again this soon, not ASK_EVERY later
MAX_CHECKED = 1000  # stuck candidates looked at per tick
MAX_CLOSED = 1000  # closed ids remembered, to say why a stuck alert resolved

NEVER = float("-inf")


class HeldCheck:
    def __init__(self, tasks: TaskFold, end_unseen: Callable[[str], None]) -> None:
        self._tasks = tasks
        self._end_unseen = end_unseen  # the worker fold's: a missed end event on that worker
        self.wanted: set[str] = set()  # workers to ask which tasks they run
        self.asked: dict[str, float] = {}
        self.held_at: dict[str, float] = {}  # task id -> when its worker last said it runs it
        self.gone_at: dict[str, float] = {}  # task id -> when its worker said it does not
        self.unanswered: dict[str, float] = {}  # worker -> when it last did not answer
        self.closed: OrderedDict[str, None] = OrderedDict()

    def _want(self, host: str, now: float) -> None:
        if now - self.asked.get(host, NEVER) >= ASK_EVERY:
            self.wanted.add(host)

    def take(self, now: float) -> list[str]:
        """The workers to ask now; each is marked asked."""
        hosts = sorted(self.wanted)
        self.wanted.clear()
        for host in hosts:
            self.asked[host] = now
        return hosts

    def check_active(self, host: str, active: int, now: float) -> None:
        """A heartbeat's ``active``: fewer than the records we hold on it means some ended unseen."""
        running = self._tasks.running
        uuids = running.on_host(host)
        if len(uuids) <= active:
            return
        settled = sum(1 for uuid in uuids if (running.started_at(uuid) or now) <= now - ACTIVE_GRACE)
        if settled > active:
            self._want(host, now)

    def record(self, held: dict[str, set[str] | None], asked_at: float) -> None:
        """What the workers answered (None: no answer within the timeout)."""
        running = self._tasks.running
        for host, ids in held.items():
            if ids is None:
                self.unanswered[host] = asked_at
                continue
            self.unanswered.pop(host, None)
            for uuid in running.on_host(host):
                started = running.started_at(uuid)
                if started is None:
                    continue
                if started > asked_at - ASKED_AHEAD:
                    # Too fresh for the answer to say: a short limit would pass before the next
                    # regular question, so this worker may be asked again soon.
                    self.asked[host] = min(self.asked.get(host, asked_at), asked_at - ASK_EVERY + ASK_AGAIN)
                    continue
                if uuid in ids:
                    self.held_at[uuid] = asked_at
                    self.gone_at.pop(uuid, None)
                else:
                    self.gone_at.setdefault(uuid, asked_at)

    def tick(self, now: float, limit: Callable[[str], float]) -> None:
        self._close_gone(now)
        running = self._tasks.running
        for uuid, _name, host, _started in running.stuck(now + PRECHECK, limit, MAX_CHECKED):
            if now - self.held_at.get(uuid, NEVER) > FRESH:
                self._want(host, now)
        if len(self.held_at) > 2 * len(running) + 100:
            self.held_at = {u: at for u, at in self.held_at.items() if running.host_of(u) is not None}
        hosts = set(running.hosts())
        for host in [h for h in self.asked if h not in hosts]:
            del self.asked[host]
            self.unanswered.pop(host, None)

    def _close_gone(self, now: float) -> None:
        for uuid, at in list(self.gone_at.items()):
            if now - at < GONE_SETTLE:
                continue
            del self.gone_at[uuid]
            self.held_at.pop(uuid, None)
            ended = self._tasks.close_unseen(uuid)
            if ended is None:
                continue  # its end event came after all
            self._end_unseen(ended[2])
            self.closed[uuid] = None
            if len(self.closed) > MAX_CLOSED:
                self.closed.popitem(last=False)

    def confirmed(self, uuid: str, host: str, started: float, limit: float) -> str | None:
        """Why a task past its limit is stuck for sure, or None while that is unconfirmed."""
        if self.held_at.get(uuid, NEVER) >= started + limit - PRECHECK - ASK_EVERY:
            return "its worker says it is still running it"
        if self.unanswered.get(host, NEVER) >= started + limit - PRECHECK - ASK_EVERY:
            return "its worker did not answer when asked which tasks it runs"
        return None

"""The Lamport clock arithmetic of ``EventReceiver.event_from_message``, written once.

The fast paths keep their own clock instead of celery's ``LamportClock`` (whose mutex
costs more than the arithmetic on every event); this is the same rule, with celery's own
``CLIENT_CLOCK_SKEW``, so every path leaves the clock where EventReceiver would (but for a
hot body a fold error stops midway: ``advance`` has moved the clock over all of it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery.events.receiver import CLIENT_CLOCK_SKEW


def lamport(mine: int, etype: str, clock: int | None) -> tuple[int, int]:
    """(the clock stamped on the event, our clock after it), given our clock and the event's.

    ``clock`` None: the event carries none, and ours steps forward. A client's clock is
    ignored for task-sent: clients never sync theirs.
    """
    if etype == "task-sent":
        stamp = (mine or 1) + CLIENT_CLOCK_SKEW
    elif clock is None:
        return mine + 1, mine + 1
    else:
        stamp = clock
    return stamp, (mine if mine > stamp else stamp) + 1


def advance(mine: int, events: Iterable[tuple[str, Any, int | None]]) -> int:
    """Our clock after a message's events (type, anything, clock), in order: ``lamport``'s rule
    over them in one call, for the hot bodies whose stamps nothing reads (a call per event
    would cost more than the arithmetic). tests/test_typed.py holds the two to each other."""
    for etype, _, clock in events:
        if etype == "task-sent":
            stamp = (mine or 1) + CLIENT_CLOCK_SKEW
        elif clock is None:
            stamp = mine
        else:
            stamp = clock
        mine = (mine if mine > stamp else stamp) + 1
    return mine

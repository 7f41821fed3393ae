"""Periodic tasks: when each Beat schedule entry is due, whether its runs come, and when not.

An entry (from the app's ``beat_schedule``, or from sidecar.yml's ``beat:``) is a task name
and a celery schedule: an interval, a crontab or a solar event, in a timezone. The sidecar
cannot see Beat itself, only what Beat sends: a run is the first event of a task id of the
entry's task (task-sent when the app sends those, else task-received or task-started);
when several entries share a task, the run's args/kwargs tell them apart.

Each entry expects its next run at ``next_due``. A run seen by ``next_due + grace`` is on
time (``late`` says by how much it was late); none seen by then is a miss, counted, and the
next run resolves it. Due times come from celery's own schedule objects
(``remaining_estimate``), so they follow crontab, solar and timezone rules exactly as Beat.

Beat being down looks like every entry missing at once: once two different entries have
missed a due since the last run of any entry (with a single entry: two of its dues), ``down``
is set (one alert instead of one per entry), and the next run of any entry clears it. One
entry missing again and again while others run is that entry's problem, not Beat's.

Bounds: one record per configured entry, and the ids of the last 10,000 runs.
"""

from __future__ import annotations

import ast
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from celery_sidecar.monitor.config.beat_entries import Entry

MAX_RUNS = 10_000


@dataclass
class EntryState:
    entry: Entry
    next_due: float
    grace: float
    period: float
    last_run: float | None = None  # our clock
    late: float = 0.0  # seconds the last run came after its due time
    missed_total: int = 0
    missing_since: float | None = None  # due time of the first miss not yet followed by a run


@dataclass
class BeatTracker:
    entries: dict[str, EntryState] = field(default_factory=dict)
    by_task: dict[str, list[str]] = field(default_factory=dict)
    runs: OrderedDict[str, str] = field(default_factory=OrderedDict)  # task id -> entry
    missed_since_run: set[str] = field(default_factory=set)  # entries that missed since the last run
    missed_dues_since_run: int = 0
    down_since: float | None = None

    def configure(self, entries: list[Entry], now: float) -> None:
        """Follow these entries; one that did not change keeps what it knows."""
        kept: dict[str, EntryState] = {}
        for entry in entries:
            was = self.entries.get(entry.name)
            if was is not None and was.entry == entry:
                kept[entry.name] = was
                continue
            state = EntryState(entry, entry.next_due(now), entry.grace_at(now), entry.period(now))
            if was is not None:  # a changed schedule keeps its history
                state.last_run, state.late, state.missed_total = was.last_run, was.late, was.missed_total
            kept[entry.name] = state
        self.entries = kept
        self.by_task = {}
        for name, state in kept.items():
            self.by_task.setdefault(state.entry.task, []).append(name)

    def saw(self, uuid: str, task: str, args: str | None, kwargs: str | None, at: float) -> str | None:
        """A task event: the entry whose run it is (its first event), or None."""
        names = self.by_task.get(task)
        if names is None:
            return None
        if uuid in self.runs:
            return self.runs[uuid]
        name = names[0] if len(names) == 1 else _match(self.entries, names, args, kwargs)
        if name is None:
            return None
        self.runs[uuid] = name
        if len(self.runs) > MAX_RUNS:
            self.runs.popitem(last=False)
        self._ran(self.entries[name], at)
        return name

    def entry_of(self, uuid: str) -> str | None:
        return self.runs.get(uuid)

    def _ran(self, state: EntryState, at: float) -> None:
        state.late = max(0.0, at - state.next_due) if at >= state.next_due - state.grace else 0.0
        state.last_run = at
        state.next_due = state.entry.next_due(at)  # Beat schedules the next run from this one
        # From this run to the next due: an interval's period, a crontab's current gap (a
        # weekday-only crontab's weekend too), so last run + period + grace is when it is missed.
        state.period = max(1e-3, state.next_due - at)
        state.missing_since = None
        self.down_since = None
        self.missed_since_run.clear()
        self.missed_dues_since_run = 0

    def resume(self, now: float) -> None:
        """After the broker was unreachable: runs during the outage were invisible, so the
        dues that passed are not counted as missed; each entry expects its next one."""
        for state in self.entries.values():
            if now > state.next_due + state.grace:
                state.next_due = state.entry.next_due(now)

    def tick(self, now: float) -> None:
        """Count the dues that passed without a run (each once)."""
        for state in self.entries.values():
            # Bounded: a sidecar asleep for a year does not loop over a year of minutes.
            for _ in range(100):
                if now <= state.next_due + state.grace:
                    break
                state.missed_total += 1
                self.missed_since_run.add(state.entry.name)
                self.missed_dues_since_run += 1
                if state.missing_since is None:
                    state.missing_since = state.next_due
                state.next_due = state.entry.next_due(state.next_due)
            else:
                state.next_due = state.entry.next_due(now)
        if self.down_since is None and self._looks_down():
            self.down_since = now

    def _looks_down(self) -> bool:
        if len(self.entries) == 1:
            return self.missed_dues_since_run >= 2
        return len(self.missed_since_run) >= 2


def _match(entries: dict[str, EntryState], names: list[str], args: str | None, kwargs: str | None) -> str | None:
    """Of several entries sharing a task, the one whose args/kwargs the run carries.

    Task events carry them as celery's repr (``"(1, 'a')"``, ``"{'x': 2}"``); they are read
    back with ``ast.literal_eval``, so a list and a tuple of the same values match.
    """
    run_args, run_kwargs = _literal(args), _literal(kwargs)
    run_args = tuple(run_args) if isinstance(run_args, list | tuple) else run_args
    run_kwargs = tuple(sorted(run_kwargs.items())) if isinstance(run_kwargs, dict) else run_kwargs
    for name in names:
        entry = entries[name].entry
        if (entry.args is None or entry.args == run_args) and (entry.kwargs is None or entry.kwargs == run_kwargs):
            return name
    return None


def _literal(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None

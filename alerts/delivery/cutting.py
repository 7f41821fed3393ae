"""The one rule for cutting long text (tracebacks) down to a message: keep the end, cut the middle.

A Python traceback reads from the outside in: its first frames are the framework's (Celery's
``celery/app/trace.py`` for every task), its last frame is the line that raised, and its last
line is the exception. So the end is kept whole, then as much of the start as still fits, and
what is left out in between is replaced by one marker line that says how many lines went.
The console and Slack apply the same rule with their own budgets (``CONSOLE`` and ``SLACK``).
"""

from __future__ import annotations

from dataclasses import dataclass

ELLIPSIS = "…"


@dataclass(frozen=True)
class Budget:
    lines: int  # at most this many lines, the marker line included
    chars: int  # at most this many characters, newlines and the marker included


# The console: a log line someone reads in a terminal or a log viewer.
CONSOLE = Budget(lines=20, chars=2000)
# Slack: a section text holds 3000 characters. The code fence (6), a mention that may be put in
# front of the first section, and mrkdwn escaping done before the cut all fit in the margin.
SLACK = Budget(lines=40, chars=2700)

# Of the lines kept, at most this share goes to the start: the end is what on-call reads first.
_HEAD_SHARE = 0.25


def marker(count: int) -> str:
    return f"{ELLIPSIS} {count} line{'s' if count != 1 else ''} cut {ELLIPSIS}"


def cut_middle(text: str, budget: Budget) -> str:
    """``text`` within ``budget``: its end whole, its start if room allows, a marker between."""
    lines = [_clip(line, budget.chars // 2) for line in text.rstrip("\n").splitlines()]
    if len(lines) <= budget.lines and _size(lines) <= budget.chars:
        return "\n".join(lines)
    note = marker(len(lines))  # the longest the marker can be: the count only shrinks
    room_lines = max(budget.lines - 1, 1)
    room_chars = budget.chars - len(note) - 1
    head_quota = int(room_lines * _HEAD_SHARE)
    tail = _from_boundary(_take(reversed(lines), room_lines - head_quota, room_chars)[::-1])
    rest = lines[: len(lines) - len(tail)]
    head = _take(rest, room_lines - len(tail), room_chars - _size(tail) - 1)
    return "\n".join([*head, marker(len(rest) - len(head)), *tail])


def _take(lines, count: int, chars: int) -> list[str]:
    """Lines in the order given, while both the line count and the characters allow."""
    taken: list[str] = []
    used = -1  # n lines need n - 1 newlines
    for line in lines:
        if len(taken) >= count or used + 1 + len(line) > chars:
            break
        taken.append(line)
        used += 1 + len(line)
    return taken


def _from_boundary(tail: list[str]) -> list[str]:
    """The tail from its first whole frame: a frame's code line or caret line alone is noise.
    A boundary is a ``File "…"`` line or an unindented one (the exception, a chained
    traceback's header); text with none is left as it is."""
    for index, line in enumerate(tail):
        if line.startswith('  File "') or not line[:1].isspace():
            return tail[index:]
    return tail


def _size(lines: list[str]) -> int:
    return sum(len(line) for line in lines) + max(len(lines) - 1, 0)


def _clip(line: str, limit: int) -> str:
    # One huge line (an exception message with a payload in it) must not crowd out the rest.
    return line if len(line) <= limit else line[: limit - len(ELLIPSIS)] + ELLIPSIS

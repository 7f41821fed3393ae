"""PromQL, read just closely enough for two questions the HA tests ask of a query.

- Is each series taken once however many sidecars export it? Two sidecars export the same
  series, told apart only by the labels Prometheus adds for the target it scraped, so the first
  aggregation around a series must be ``max`` or ``min`` by the series' own labels (or fewer),
  never ``sum``/``count`` over the copies, never keeping a target's labels. ``undeduplicated``
  names every series that is not.
- What does the query give for one sidecar alone? ``restricted`` points every series selector
  at one scrape target.

Not a parser: enough for the expressions this repository writes (the generated dashboards,
alerts/prometheus/rules.yml), and tested on expressions that are wrong on purpose.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

AGGREGATORS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
               "topk", "quantile"}
DEDUPLICATING = {"max", "min"}  # both sidecars fold the same stream: either copy, never their sum
# A metric name of ours where a series is selected (not a function call, not a recording rule's
# celery:... name, not inside a label value: strings are blanked first).
SERIES = re.compile(r"(?<![\w:])(celery_[a-z0-9_]*[a-z0-9])\b(?!\s*\()")
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'")
_WORD_BEFORE = re.compile(r"([A-Za-z_]\w*)\s*$")
_GROUPING_BEFORE = re.compile(r"([A-Za-z_]\w*)\s+(by|without)\s*$")


@dataclass(frozen=True)
class Aggregation:
    operator: str
    grouping: str  # "by" (an aggregation without a clause aggregates by nothing) or "without"
    labels: tuple[str, ...]


def blank_strings(expr: str) -> str:
    """``expr`` with the inside of every string literal blanked, positions kept."""
    return _STRING.sub(lambda m: m.group(0)[0] + " " * (len(m.group(0)) - 2) + m.group(0)[-1], expr)


def _matching_open(text: str, close: int) -> int:
    depth = 0
    for i in range(close, -1, -1):
        depth += {")": 1, "(": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced parentheses in {text!r}")


def enclosing_aggregation(expr: str, position: int) -> Aggregation | None:
    """The innermost aggregation whose argument holds ``expr[position]``; function calls and
    parentheses around it are looked through."""
    text = blank_strings(expr)
    depth = 0
    for i in range(position - 1, -1, -1):
        if text[i] == ")":
            depth += 1
        elif text[i] == "(" and depth:
            depth -= 1
        elif text[i] == "(":
            before = text[:i].rstrip()
            if before.endswith(")"):  # `max by (a, b) (`
                opening = _matching_open(before, len(before) - 1)
                clause = _GROUPING_BEFORE.search(before[:opening])
                if clause and clause.group(1) in AGGREGATORS:
                    labels = tuple(x.strip() for x in before[opening + 1:-1].split(",") if x.strip())
                    return Aggregation(clause.group(1), clause.group(2), labels)
            word = _WORD_BEFORE.search(before)
            if word and word.group(1) in AGGREGATORS:  # `max(`
                return Aggregation(word.group(1), "by", ())
            # A function's argument or plain parentheses: look further out.
    return None


def undeduplicated(expr: str, own_labels: Callable[[str], tuple[str, ...]]) -> list[str]:
    """Each series of ``expr`` that two sidecars would count twice or show twice, and why."""
    problems = []
    for match in SERIES.finditer(blank_strings(expr)):
        series = match.group(1)
        aggregation = enclosing_aggregation(expr, match.start())
        own = set(own_labels(series))
        if aggregation is None:
            problems.append(f"{series}: not aggregated, so each sidecar's copy is its own series")
        elif aggregation.operator not in DEDUPLICATING:
            problems.append(f"{series}: first aggregated by {aggregation.operator}, which adds up the copies")
        elif aggregation.grouping != "by" or not set(aggregation.labels) <= own:
            problems.append(f"{series}: {aggregation.operator} {aggregation.grouping} {aggregation.labels} keeps "
                            f"labels other than its own {sorted(own)}")
    return problems


def restricted(expr: str, **matchers: str) -> str:
    """``expr`` with ``matchers`` (e.g. instance="a:9808") added to every series selector."""
    added = ", ".join(f'{name}="{value}"' for name, value in matchers.items())
    out, last = [], 0
    for match in SERIES.finditer(blank_strings(expr)):
        out.append(expr[last:match.end()])
        rest = expr[match.end():]
        if rest.lstrip().startswith("{"):
            brace = match.end() + rest.index("{") + 1
            empty = expr[brace:].lstrip().startswith("}")
            out.append(expr[match.end():brace] + added + ("" if empty else ", "))
            last = brace
        else:
            out.append("{" + added + "}")
            last = match.end()
    out.append(expr[last:])
    return "".join(out)

"""The storage of the task metrics: capped label values, histogram rows, and their kept text.

A series is keyed by its label values in the family's label order; a label the config drops
(``cardinality.drop_labels``) is None in the key and left out of the text, so its values are
summed under the labels that remain.

A series that an update or a first sight created is served at 0 once before its values
("unserved", then "born" once its 0 is rendered, until a scrape serves it): Prometheus's
``increase()`` and ``rate()`` count nothing for a series that appears at 1, so the first
failure of a task (or its first exception of a class) would never show.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from itertools import accumulate
from typing import Any

from prometheus_client.core import Metric

OTHER = "other"

Labels = tuple[str | None, ...]
LabelText = Callable[[tuple[str, ...], Labels], str]


class CappedLabel:
    """Maps values to themselves until ``cap`` distinct values were seen, then to 'other'.

    A lower cap from a config reload applies to new values: exported ones keep their label.
    """

    __slots__ = ("cap", "seen")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        seen = self.seen
        if value in seen:
            return value
        if len(seen) < self.cap:
            seen.add(value)
            return value
        return OTHER


class Histogram:
    """Per-label-set bucket counts (non-cumulative) and sums, and their rendered text."""

    __slots__ = ("_born", "_dirty", "_text", "_unserved", "bounds", "series")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.series: dict[Labels, list[float]] = {}  # [b0..bn, +Inf, sum]
        self._text: dict[Labels, bytes] = {}
        self._dirty: set[Labels] = set()  # series whose text is out of date
        self._unserved: set[Labels] = set()  # new series: rendered at 0 until served so
        self._born: set[Labels] = set()  # unserved series whose 0 is rendered

    def observe(self, labels: Labels, value: float) -> None:
        row = self.series.get(labels)
        if row is None:
            row = self.series[labels] = [0] * (len(self.bounds) + 1) + [0.0]  # counts..., sum
            self._unserved.add(labels)
        row[bisect.bisect_left(self.bounds, value)] += 1
        row[-1] += value
        self._dirty.add(labels)

    def touch(self, labels: Labels) -> None:
        """Create the series with every bucket at 0, unless it exists."""
        if labels not in self.series:
            self.series[labels] = [0] * (len(self.bounds) + 1) + [0.0]
            self._unserved.add(labels)
            self._dirty.add(labels)

    def served(self) -> None:
        """A scrape served the rendered text: series it served at 0 show their values from now."""
        born = self._born
        if born:
            self._unserved.difference_update(born)
            self._dirty.update(born)
            born.clear()

    def add(self, labels: Labels, row: list[float]) -> None:
        """Add a row of the same bounds to the series (creating it): merging series."""
        mine = self.series.get(labels)
        if mine is None:
            self.series[labels] = list(row)
        else:
            for i, value in enumerate(row):
                mine[i] += value
        self._dirty.add(labels)

    def replace(self, bounds: tuple[float, ...], series: dict[Labels, list[float]]) -> None:
        """Take new bounds and series wholesale; every text is rendered again."""
        self.bounds = bounds
        self.series = series
        self._text = {}
        self._dirty = set(series)
        self._unserved, self._born = set(), set()

    @property
    def pending(self) -> int:
        """Series whose text is out of date."""
        return len(self._dirty)

    def forget(self, labels: Labels) -> None:
        del self.series[labels]
        self._text.pop(labels, None)
        self._unserved.discard(labels)
        self._born.discard(labels)

    def render(self, name: str, label_names: tuple[str, ...], label_text: LabelText) -> int:
        """Bring the text of every changed series up to date; returns how many could not be.

        A render fills the label text and the values into a list of line fragments shared
        by all series and joins it: C-level slice assignment and join, about twice as fast
        as ``str.format`` on a 21-field template. A series whose labels cannot be rendered
        (the schema should have refused them) is dropped, never the whole exposition.
        """
        failed = 0
        dirty, series, text, unserved = self._dirty, self.series, self._text, self._unserved
        if not dirty:
            return failed
        parts: list[str] = []
        for edge in [*map(fmt, self.bounds), "+Inf"]:
            parts += [f"{name}_bucket{{", "", f',le="{edge}"}} ', "", "\n"]
        parts += [f"{name}_count{{", "", "} ", "", "\n", f"{name}_sum{{", "", "} ", "", "\n"]
        lines = len(parts) // 5
        while dirty:
            labels = dirty.pop()  # atomic: an update from now on marks the series again
            row = series.get(labels)
            if row is None:
                continue
            if labels in unserved:
                self._born.add(labels)
                row = [0] * len(row)
            values = list(accumulate(row[:-1]))
            values += (values[-1], float(row[-1]))
            try:
                parts[1::5] = [label_text(label_names, labels)] * lines
                parts[3::5] = map(str, values)
                text[labels] = "".join(parts).encode()
            except (AttributeError, TypeError, UnicodeError):
                failed += 1  # no text: the series is left out of every exposition
        return failed

    def exposition(self, out: list[bytes], name: str, doc: str) -> None:
        out.append(f"# HELP {name} {doc}\n# TYPE {name} histogram\n".encode())
        append_text(out, self.series, self._text)

    def family(self, name: str, doc: str, label_names: tuple[str, ...], static: dict[str, str]) -> Metric:
        """The prometheus_client family of these series (the reference rendering)."""
        fam = Metric(name, doc, "histogram")
        edges = [*(fmt(b) for b in self.bounds), "+Inf"]
        for labels, row in list(self.series.items()):
            row = list(row)
            shown = {**present(label_names, labels), **static}
            cumulative = 0.0
            for edge, count in zip(edges, row[:-1], strict=True):
                cumulative += count
                fam.add_sample(f"{name}_bucket", {**shown, "le": edge}, cumulative)
            fam.add_sample(f"{name}_count", shown, cumulative)
            fam.add_sample(f"{name}_sum", shown, row[-1])
        return fam


def present(names: tuple[str, ...], values: Labels) -> dict[str, str]:
    """The labels of a key that are exported (a dropped label is None)."""
    return {n: v for n, v in zip(names, values, strict=True) if v is not None}


def append_text(out: list[bytes], series: dict[Labels, Any], text: dict[Labels, bytes]) -> None:
    """Append the text of ``series`` in their order; text of forgotten series is dropped.

    A series created after the last render has no text yet and is left to the next scrape.
    """
    out += filter(None, map(text.get, list(series)))
    if len(text) > len(series):  # a render raced with forget_hostname
        for labels in [k for k in text if k not in series]:
            del text[labels]


def fmt(bound: float) -> str:
    return repr(float(bound))

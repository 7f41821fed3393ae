"""Fixed-memory sliding windows for the retry ratio and the latency percentile."""

from __future__ import annotations

import math
from collections import deque

_BUCKETS = 30


class RatioWindow:
    """hits / total over the last ``seconds``, in 30 time buckets (fixed memory)."""

    __slots__ = ("_hits", "_span", "_stamp", "_totals")

    def __init__(self, seconds: float) -> None:
        self._span = seconds / _BUCKETS
        self._stamp = [-1] * _BUCKETS
        self._hits = [0] * _BUCKETS
        self._totals = [0] * _BUCKETS

    def add(self, ts: float, hit: bool) -> None:
        slot = int(ts // self._span)
        i = slot % _BUCKETS
        if self._stamp[i] > slot:
            return  # older than the window this bucket now holds: a late event must not wipe it
        if self._stamp[i] != slot:
            self._stamp[i], self._hits[i], self._totals[i] = slot, 0, 0
        self._totals[i] += 1
        if hit:
            self._hits[i] += 1

    def counts(self, now: float) -> tuple[int, int]:
        """(hits, total) inside the window ending at ``now``."""
        newest = int(now // self._span)
        hits = total = 0
        for i in range(_BUCKETS):
            if newest - _BUCKETS < self._stamp[i] <= newest:
                hits += self._hits[i]
                total += self._totals[i]
        return hits, total

    def ratio(self, now: float) -> float | None:
        hits, total = self.counts(now)
        return hits / total if total else None


class SampleWindow:
    """The most recent samples (at most ``maxlen``) younger than ``seconds``; for p95."""

    __slots__ = ("_samples", "_seconds")

    def __init__(self, seconds: float, maxlen: int = 2048) -> None:
        self._seconds = seconds
        self._samples: deque[tuple[float, float]] = deque(maxlen=maxlen)

    def add(self, ts: float, value: float) -> None:
        self._samples.append((ts, value))

    def quantile(self, q: float, now: float) -> float | None:
        cutoff = now - self._seconds
        values = sorted(v for ts, v in list(self._samples) if ts >= cutoff)
        if not values:
            return None
        # Nearest rank: with 20 samples, p95 is the 19th, so one outlier in 20 is not the p95.
        return values[max(0, math.ceil(q * len(values)) - 1)]

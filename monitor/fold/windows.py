"""Fixed-memory sliding windows: the retry ratio, arrival counts, latency and runtime quantiles."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

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


class CountWindow:
    """Events over the last ``seconds``, in 30 time buckets (fixed memory)."""

    __slots__ = ("_counts", "_span", "_stamp")

    def __init__(self, seconds: float) -> None:
        self._span = seconds / _BUCKETS
        self._stamp = [-1] * _BUCKETS
        self._counts = [0] * _BUCKETS

    def add(self, ts: float) -> None:
        slot = int(ts // self._span)
        i = slot % _BUCKETS
        if self._stamp[i] > slot:
            return  # older than the window this bucket now holds
        if self._stamp[i] != slot:
            self._stamp[i], self._counts[i] = slot, 0
        self._counts[i] += 1

    def count(self, now: float) -> int:
        newest = int(now // self._span)
        return sum(self._counts[i] for i in range(_BUCKETS) if newest - _BUCKETS < self._stamp[i] <= newest)


class SampleWindow:
    """The most recent samples (at most ``maxlen``) younger than ``seconds``; for p95."""

    __slots__ = ("_samples", "_seconds", "push")

    def __init__(self, seconds: float, maxlen: int = 2048) -> None:
        self._seconds = seconds
        self._samples: deque[tuple[float, float]] = deque(maxlen=maxlen)
        # push((ts, value)): the deque's own append, so a sample costs no Python call
        self.push: Callable[[tuple[float, float]], None] = self._samples.append

    def empty(self, now: float) -> bool:
        """No sample younger than the window (samples arrive in time order)."""
        samples = self._samples
        return not samples or samples[-1][0] < now - self._seconds

    def quantile(self, q: float, now: float) -> float | None:
        cutoff = now - self._seconds
        values = sorted(v for ts, v in list(self._samples) if ts >= cutoff)
        if not values:
            return None
        # Nearest rank: with 20 samples, p95 is the 19th, so one outlier in 20 is not the p95.
        return values[max(0, math.ceil(q * len(values)) - 1)]

"""How the task series follow the cardinality controls: the route of a label set, the series
held re-keyed when a reload changes the controls, and producers gone quiet.

A key is (name, hostname, queue[, exception]) in the family's label order, with None for
a label the config drops (exporters/series.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from celery_sidecar.exporters.controls import COUNTERS, LATENCY, QUEUE_WAIT, RUNTIME, Controls
from celery_sidecar.exporters.series import OTHER, Labels
from celery_sidecar.monitor.sinks import TASK_KINDS

GENERIC_HOST = "generic"


class Route:
    """Where the updates of one label set go: each family's series key, None where the family
    is off or the task left out; ``queue`` keys the per-queue latency (None: that family is off)."""

    __slots__ = ("counters", "queue", "queue_wait", "runtime", "zeroed")

    def __init__(self, counters: dict[str, Labels | None], runtime: Labels | None, queue_wait: Labels | None,
                 queue: str | None) -> None:
        self.counters = counters
        self.runtime = runtime
        self.queue_wait = queue_wait
        self.queue = queue
        self.zeroed = False  # its series were created at 0

    @classmethod
    def build(cls, labels: Labels, controls: Controls, generic_host: str) -> Route:
        """The route of capped (name, hostname, queue) ``labels`` under ``controls``."""
        name, host, queue = labels
        if controls.generic_hostname:
            host = generic_host
        shared: dict[Labels, Labels] = {}  # families with the same key share one tuple

        def key(family: str) -> Labels | None:
            if not controls.is_on(family):
                return None
            drop = controls.dropped(family)
            k = (name, None if "hostname" in drop else host, None if "queue_name" in drop else queue)
            return shared.setdefault(k, k)

        return cls({kind: key(COUNTERS[kind]) for kind in TASK_KINDS}, key(RUNTIME), key(QUEUE_WAIT),
                   queue if controls.is_on(LATENCY) else None)


def rekey(key: Labels, drop: frozenset[str], controls: Controls, was_generic: bool) -> Labels | None:
    """``key`` under ``controls``; None when its series cannot be kept (its task is left out,
    or a label it lacks is no longer dropped)."""
    name, host, queue = key[0], key[1], key[2]
    if name is None or not controls.exported(name):
        return None
    if "hostname" in drop:
        host = None
    elif host is None or (was_generic and not controls.generic_hostname and host == GENERIC_HOST):
        return None
    elif controls.generic_hostname:
        host = GENERIC_HOST
    if "queue_name" in drop:
        queue = None
    elif queue is None:
        return None
    if len(key) == 3:
        return (name, host, queue)
    exception = key[3]
    if "exception" in drop:
        exception = None
    elif exception is None:
        return None
    return (name, host, queue, exception)


def regroup(series: dict, family: str, controls: Controls, was_generic: bool) -> dict:
    """``series`` of ``family`` re-keyed under ``controls``; series that meet under one key are
    summed (a histogram's rows bucket by bucket)."""
    drop = controls.dropped(family)
    out: dict = {}
    interned: dict[Labels, Labels] = {}
    for key, value in list(series.items()):
        new = rekey(key, drop, controls, was_generic)
        if new is None:
            continue
        new = interned.setdefault(new, new)
        held = out.get(new)
        if held is None:
            out[new] = list(value) if isinstance(value, list) else value
        elif isinstance(held, list):
            for i, v in enumerate(value):
                held[i] += v
        else:
            out[new] = held + value
    return out


def idle_producers(sent: dict[Labels, float], workers: set, seen: dict[str, tuple[float, float]], now: float,
                   limit: float) -> Iterable[str]:
    """Hostnames only ever seen on task-sent (producers: web pods, Beat) whose sent counts have
    not moved for ``limit`` seconds. The fold forgets a worker gone for that long; a producer
    never says it went, so its series would stay until the hostname cap fills. ``seen`` holds
    each producer's total and since when, from one call to the next."""
    totals: dict[str, float] = {}
    for key, value in list(sent.items()):
        host = key[1]
        if host is not None and host not in workers and host not in (GENERIC_HOST, OTHER):
            totals[host] = totals.get(host, 0) + value
    for host in [h for h in seen if h not in totals]:
        del seen[host]
    idle = []
    for host, total in totals.items():
        was = seen.get(host)
        if was is None or was[0] != total:
            seen[host] = (total, now)
        elif now - was[1] >= limit:
            idle.append(host)
    return idle

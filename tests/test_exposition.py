"""The fast text exposition of task metrics says exactly what prometheus_client would."""

from __future__ import annotations

import random
import sys
import threading

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from celery_sidecar.exporters.event_metrics import EventMetrics
from celery_sidecar.monitor.config.settings import Config, LiveConfig
from celery_sidecar.monitor.fold.records import TASK_KINDS, TaskUpdate


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def feed(metrics: EventMetrics, count: int, seed: int = 7, hosts: int = 3) -> None:
    rng = random.Random(seed)
    names = ["app.ok", 'quote"d', "back\\slash", "new\nline", "ünïcode.task"]
    for i in range(count):
        kind = rng.choice(TASK_KINDS)
        update = TaskUpdate(kind=kind, uuid=str(i), name=rng.choice(names), hostname=f"w{i % hosts}@h",
                            queue=rng.choice(["celery", "heavy"]), timestamp=0.0,
                            exception="ValueError" if kind == "failed" else None)
        if kind == "succeeded":
            update.runtime = rng.expovariate(2)
        if kind == "started":
            update.latency, update.task_class = rng.expovariate(0.5), rng.choice(["normal", "heavy"])
        metrics.on_update(update)


def settled(metrics: EventMetrics) -> str:
    """/metrics once every series was served: a new series is served at 0 first (exporters/series.py)."""
    metrics.exposition()
    return metrics.exposition().decode()


def reference(metrics: EventMetrics) -> dict[tuple[str, frozenset], float]:
    registry = CollectorRegistry()
    registry.register(metrics)
    return samples(generate_latest(registry).decode())


def test_fast_exposition_equals_the_prometheus_client_rendering():
    metrics = EventMetrics(LiveConfig(Config()))
    feed(metrics, 3000)
    registry = CollectorRegistry()
    registry.register(metrics)
    fast = samples(settled(metrics))
    assert len(fast) > 500
    assert fast == reference(metrics)

    # Series keep their rendered text between scrapes; updates must replace it.
    feed(metrics, 500, seed=8, hosts=4)
    assert samples(settled(metrics)) == reference(metrics)

    metrics.forget_hostname("w1@h")  # the label cache must not resurrect forgotten series
    registry_text = generate_latest(registry).decode()
    assert samples(metrics.exposition().decode()) == samples(registry_text)
    assert "w1@h" not in metrics.exposition().decode()


def test_prerender_only_runs_for_a_scraper_and_a_backlog():
    metrics = EventMetrics(LiveConfig(Config()))
    feed(metrics, 2000)
    assert not metrics.prerender(warm_for=600, backlog=0), "nobody has scraped yet"
    metrics.exposition()
    feed(metrics, 2000, seed=9)
    assert not metrics.prerender(warm_for=600, backlog=10_000), "small backlogs are left to the scrape"
    assert metrics.prerender(warm_for=600, backlog=0)
    assert not metrics.prerender(warm_for=600, backlog=0), "nothing changed since"
    assert samples(settled(metrics)) == reference(metrics)


def test_scrapes_racing_the_event_thread_lose_no_update():
    """Scrapes and prerenders run while events arrive; the last scrape must show them all."""
    metrics = EventMetrics(LiveConfig(Config()))
    done = threading.Event()

    def events() -> None:
        for seed in range(20):
            feed(metrics, 2000, seed=seed, hosts=5)
        done.set()

    thread = threading.Thread(target=events)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: in the middle of renders
    try:
        thread.start()
        scrapes = 0
        while not done.is_set():
            metrics.exposition()
            metrics.prerender(warm_for=600, backlog=0)
            scrapes += 1
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert scrapes > 3
    assert samples(settled(metrics)) == reference(metrics)

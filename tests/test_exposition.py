"""The fast text exposition of task metrics says exactly what prometheus_client would."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporters.event_metrics import EventMetrics
from monitor.config import Config
from monitor.state import TASK_KINDS, TaskUpdate


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_fast_exposition_equals_the_prometheus_client_rendering():
    metrics = EventMetrics(Config())
    rng = random.Random(7)
    names = ["app.ok", 'quote"d', "back\\slash", "new\nline", "ünïcode.task"]
    for i in range(3000):
        kind = rng.choice(TASK_KINDS)
        update = TaskUpdate(kind=kind, uuid=str(i), name=rng.choice(names), hostname=f"w{i % 3}@h",
                            queue=rng.choice(["celery", "heavy"]), timestamp=0.0,
                            exception="ValueError" if kind == "failed" else None)
        if kind == "succeeded":
            update.runtime = rng.expovariate(2)
        if kind == "started":
            update.latency, update.task_class = rng.expovariate(0.5), rng.choice(["normal", "heavy"])
        metrics.on_update(update)

    registry = CollectorRegistry()
    registry.register(metrics)
    reference = samples(generate_latest(registry).decode())
    fast = samples(metrics.exposition().decode())
    assert len(reference) > 500
    assert fast == reference

    metrics.forget_hostname("w1@h")  # the label cache must not resurrect forgotten series
    registry_text = generate_latest(registry).decode()
    assert samples(metrics.exposition().decode()) == samples(registry_text)
    assert "w1@h" not in metrics.exposition().decode()

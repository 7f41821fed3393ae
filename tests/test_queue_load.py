"""The queue-pressure formula (monitor/load.py) on its edges: no capacity, no runtime yet,
nothing demanded, running tasks that must not be scaled in under, and one slow task."""

from __future__ import annotations

import math

import pytest

from celery_sidecar.monitor.load import QueueLoad


def load(**kw) -> QueueLoad:
    values = dict(waiting=0, reserved=0, scheduled=0, running=0, workers=2, capacity=4, pool_size=2,
                  arrival_rate=0.0, runtime_median=1.0, latency_limit=5.0)
    return QueueLoad(**{**values, **kw})


def test_pressure_is_demand_over_capacity_and_infinite_with_no_capacity():
    assert load(waiting=2, reserved=4, running=4).pressure == 2.5
    assert load(waiting=3, workers=0, capacity=0).pressure == math.inf
    assert load(workers=0, capacity=0).pressure == 0.0


def test_desired_keeps_up_with_arrivals_and_starts_the_backlog_within_the_threshold():
    # 3 tasks/s of 1 s each need 3 slots; 20 waiting need 20 x 1 / 5 = 4 more: 7 slots, 4 workers of 2.
    assert load(arrival_rate=3.0, waiting=12, reserved=8).workers_desired == 4


def test_desired_never_drops_below_what_runs_now():
    assert load(running=7, arrival_rate=0.1).workers_desired == 4


def test_no_runtime_yet_holds_the_current_workers_and_nothing_demanded_is_zero():
    assert load(runtime_median=None, waiting=50, workers=3).workers_desired == 3
    assert load(runtime_median=None, waiting=1, workers=0).workers_desired == 1
    assert load(runtime_median=None).workers_desired == 0
    assert load().workers_desired == 0


@pytest.mark.parametrize("slots", [2.0, 4.0, 6.0])
def test_a_whole_number_of_slots_needs_exactly_that_many_workers(slots):
    assert load(running=int(slots)).workers_desired == int(slots) // 2


def test_one_slow_task_does_not_swing_the_median():
    from celery_sidecar.monitor.fold.pressure import QueueRates

    rates = QueueRates(60.0)
    for i in range(20):
        rates.of("celery").runtimes.push((100.0 + i, 0.5))
    rates.of("celery").runtimes.push((121.0, 3600.0))
    [(queue, _rate, median)] = list(rates.rates(125.0))
    assert (queue, median) == ("celery", 0.5)


def test_queues_past_the_cap_are_not_kept():
    from celery_sidecar.monitor.fold.pressure import QueueRates
    from celery_sidecar.monitor.fold.queues import MAX_QUEUES

    rates = QueueRates(60.0)
    for i in range(MAX_QUEUES):
        rates.of(f"q{i}").arrivals.add(100.0)
    rates.of("late").arrivals.add(100.0)
    rates.of("q0").arrivals.add(100.0)
    rows = {queue: rate for queue, rate, _ in rates.rates(101.0)}
    assert len(rows) == MAX_QUEUES and "late" not in rows and rows["q0"] == 2 / 60
    # Past the window they are idle and leave at the next tick: room for new ones.
    rates.tidy(200.0)
    rates.of("late").arrivals.add(200.0)
    assert [queue for queue, _, _ in rates.rates(201.0)] == ["late"]

"""The boundary's quick parses (monitor/schema.py) are its careful parses, only faster.

The four hot task events each have a straight-line twin that accepts only the shape real
workers send and hands anything else to the careful parse. The property: on any input,
a twin returns exactly what the careful parse returns, or is refused for the same reason.
Inputs start from a real event and then break it, so that both sides of the twin's one
condition are explored; what the fold makes of anything at all is tests/test_hostile_input.py.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_sidecar.monitor import schema
from tests.hostile import NOW, json_values, plausible

TWINS = {
    "task-sent": (schema.quick_task_sent, "task_sent"),
    "task-received": (schema.quick_task_received, "task_received"),
    "task-started": (schema.quick_task_progress, "task_progress"),
    "task-rejected": (schema.quick_task_progress, "task_progress"),
    "task-revoked": (schema.quick_task_progress, "task_progress"),
    "task-succeeded": (schema.quick_task_succeeded, "task_succeeded"),
}
HOST, PRODUCER, NAME, QUEUE = "celery@worker-1", "producer@web-1", "proj.tasks.add", "celery"


def real(kind: str) -> dict[str, Any]:
    """An event as celery 5's EventDispatcher sends it (every field, as the wire has it)."""
    event: dict[str, Any] = {"hostname": HOST, "utcoffset": 0, "pid": 17, "clock": 42,
                             "uuid": "0b9f1c7e-8f55-4f4e-9a43-3c1f2f3c6a01", "timestamp": NOW - 0.25,
                             "type": kind, "local_received": NOW}
    if kind == "task-sent":
        event.update(hostname=PRODUCER, root_id=event["uuid"], parent_id=None, name=NAME, args="(1, 2)",
                     kwargs="{}", retries=0, eta=None, expires=None, queue=QUEUE, exchange="",
                     routing_key=QUEUE)
    elif kind == "task-received":
        event.update(name=NAME, args="(1, 2)", kwargs="{}", root_id=event["uuid"], parent_id=None, retries=0,
                     eta=None, expires=None)
    elif kind == "task-succeeded":
        event.update(result="3", runtime=0.0123)
    return event


def outcome(parse, event: dict[str, Any]) -> tuple:
    try:
        return "parsed", parse(event)
    except schema.Refused as refused:
        return "refused", refused.reason


@pytest.mark.parametrize("kind", sorted(TWINS))
def test_a_real_event_takes_the_quick_path(kind, monkeypatch):
    """Not a formality: if the twin fell through on what workers send, it would buy nothing."""
    quick, careful = TWINS[kind]
    event = real(kind)
    expected = getattr(schema, careful)(event)  # also teaches the labels to schema._known

    def no_careful_parse(_event):
        raise AssertionError(f"{kind}: a real event fell through to the careful parse")

    monkeypatch.setattr(schema, careful, no_careful_parse)
    assert quick(event) == expected


# The fields a twin reads, and values near each bound the careful parse checks.
READ = ("uuid", "timestamp", "clock", "hostname", "name", "queue", "routing_key", "retries", "eta", "args",
        "kwargs", "runtime")
EDGE_VALUES = [
    -1, -1.0, -0.0, 0, 0.0, 1e-300, schema.MAX_SECONDS, schema.MAX_SECONDS * 2, schema.MAX_COUNT,
    schema.MAX_COUNT + 1, True, False, None, "", " ", "é", "\ud800", "x" * schema.MAX_LABEL,
    "x" * (schema.MAX_LABEL + 1), "x" * (schema.MAX_TEXT + 1), "2030-01-01T00:00:00+00:00", "2030-01-01",
    NOW - schema.MAX_SKEW - 1, NOW + schema.MAX_SKEW - 1, int(NOW), float("nan"), float("inf"), [], {},
    # orjson reads ints from -2**63 to 2**64 - 1 as ints, beyond as floats; the typed clock stops at 2**63 - 1.
    -(2**63) - 1, 2**63, 2**64,
]
EDGES = st.sampled_from(EDGE_VALUES)
_ABSENT = object()


def learn_real_labels() -> None:
    schema._known.clear()
    for value in (HOST, PRODUCER, NAME, QUEUE):
        schema.label(value)


@pytest.mark.parametrize("kind", sorted(TWINS))
def test_every_field_at_every_edge_is_parsed_alike(kind):
    """Every field a twin reads, absent or at each edge value, one at a time: the whole grid."""
    quick, careful = TWINS[kind]
    learn_real_labels()
    for field in READ:
        for value in [_ABSENT, *EDGE_VALUES]:
            event = real(kind)
            if value is _ABSENT:
                event.pop(field, None)
            else:
                event[field] = value
            assert outcome(quick, event) == outcome(getattr(schema, careful), event), (field, value)


@st.composite
def broken(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    """A real event, then one or two of the fields the twin reads dropped, or set to a value
    near a bound, a plausible one or anything at all."""
    event = real(kind)
    for field in draw(st.lists(st.sampled_from(READ), min_size=1, max_size=2, unique=True)):
        how = draw(st.integers(0, 3))
        if how == 0:
            event.pop(field, None)
        else:
            event[field] = draw((EDGES, plausible(field, NOW), json_values)[how - 1])
    # The pipeline sets the receipt time whenever an intake did not: always a number here.
    event["local_received"] = draw(st.just(NOW) | st.floats(allow_nan=True, allow_infinity=True))
    return event


@pytest.mark.parametrize("kind", sorted(TWINS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_each_quick_parse_agrees_with_its_careful_parse(kind, data):
    event = data.draw(broken(kind))
    # What label() has accepted before is in the quick path's set: mostly the real labels
    # (or the quick path is never taken), else some of them.
    schema._known.clear()
    labels = [HOST, PRODUCER, NAME, QUEUE]
    if data.draw(st.integers(0, 3)) == 0:
        labels = data.draw(st.lists(st.sampled_from([*labels, "é", "", "x" * 300])))
    for value in labels:
        with contextlib.suppress(schema.Refused):
            schema.label(value)
    quick, careful = TWINS[kind]
    assert outcome(quick, event) == outcome(getattr(schema, careful), event)


def test_the_set_of_known_labels_is_bounded():
    for n in range(schema.MAX_KNOWN + 10):
        schema.label(f"host-{n}")
    assert len(schema._known) <= schema.MAX_KNOWN
    assert "host-0" not in schema._known and f"host-{schema.MAX_KNOWN + 9}" in schema._known
    schema.label("")
    assert "" not in schema._known, "an empty label must not pass as a present one"

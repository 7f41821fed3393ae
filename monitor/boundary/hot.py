"""The hot task events decoded straight into checked fields, in C (msgspec), on every path.

Nearly all traffic is task-sent, -received, -started and -succeeded (plus -failed and
-retried in the same batches). For a message body made only of those, in the shape
Celery's workers send (every field present, labels non-empty, no eta), one msgspec decode
parses the JSON *and* checks every type and bound of monitor/boundary/parse.py while it does: no
dict is built, and no Python runs per field. That makes the boundary cheaper than reading
the same fields from an unchecked dict (docs/performance.md, "Where the time goes"). The fast
paths call it on each body (monitor/intake/decoder.py), the stock path on each raw message
before kombu decodes it (monitor/intake/event_receiver.py).

It is a fast path, never a second rule. Each struct below is at least as strict as the
careful parse of its type in parse.py, and what it does not accept (any other type in
the body, a missing or null field, an eta, an over-long text, a timestamp outside the
skew bound) makes ``decode`` return None: the caller then decodes the body the ordinary
way and parse.py decides, with its reasons. tests/test_typed.py holds the two equal on
random breakage of real bodies.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from celery_sidecar.monitor.boundary.parse import MAX_COUNT, MAX_ID, MAX_LABEL, MAX_SECONDS, MAX_SKEW, MAX_TEXT

# msgspec rejects lone surrogates in JSON strings, and counts length in characters as
# schema.label does; min_length=1 because schema maps "" to None where a label is optional.
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_LABEL)]
TaskId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]  # longer: schema.text cuts it
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]  # msgspec refuses bools for int
Seconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)]
Offset = float | msgspec.UnsetType  # absent: no adjustment; null: not a number (refused)
# orjson reads an int beyond 64 bits as a float, which the ordinary path refuses as a clock;
# msgspec would read it as an int and fold it (found by test_typed's property). msgspec
# takes int64 bounds only, so uint64 clocks past them go the ordinary way, which decides.
Clock = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _Event(msgspec.Struct, tag_field="type", kw_only=True, frozen=True, gc=False):
    # Required fields (no defaults): an absent one fails the decode, as the shape requires.
    uuid: TaskId
    timestamp: float
    hostname: Label
    clock: Clock
    utcoffset: Offset = msgspec.UNSET


class TaskSent(_Event, tag="task-sent"):
    name: Label
    queue: Label
    retries: Count
    eta: None
    args: Text
    kwargs: Text

    def fields(self, ts: float) -> tuple:
        return self.uuid, ts, self.hostname, self.name, self.queue, self.retries, None, self.args, self.kwargs


class TaskReceived(_Event, tag="task-received"):
    name: Label
    retries: Count
    eta: None
    args: Text
    kwargs: Text

    def fields(self, ts: float) -> tuple:
        return self.uuid, ts, self.hostname, self.name, self.retries, None, self.args, self.kwargs


class TaskStarted(_Event, tag="task-started"):
    def fields(self, ts: float) -> tuple:
        return self.uuid, ts, self.hostname


class TaskRejected(TaskStarted, tag="task-rejected"):
    pass


class TaskRevoked(TaskStarted, tag="task-revoked"):
    pass


class TaskSucceeded(_Event, tag="task-succeeded"):
    runtime: Seconds

    def fields(self, ts: float) -> tuple:
        return self.uuid, ts, self.hostname, self.runtime


class TaskFailed(_Event, tag="task-failed"):
    exception: Text
    traceback: Text

    def fields(self, ts: float) -> tuple:
        return self.uuid, ts, self.hostname, self.exception, self.traceback


class TaskRetried(TaskFailed, tag="task-retried"):
    pass


Hot = TaskSent | TaskReceived | TaskStarted | TaskRejected | TaskRevoked | TaskSucceeded | TaskFailed | TaskRetried
_decode = msgspec.json.Decoder(list[Hot] | Hot).decode


def decode(body: bytes | memoryview | str, received: float, here: float) -> list[tuple[str, tuple, int]] | None:
    """(type, fields, clock) per event of a body made only of hot events in their usual shape,
    or None: then the body goes the ordinary way (orjson, EventDecoder._emit, schema.PARSERS).

    ``here`` is the local UTC offset in hours; timestamps are adjusted with it as
    EventReceiver does, then held to the skew bound against ``received``. Nothing is
    returned unless every event in the body passes, so the caller changes nothing (its
    Lamport clock included) before it knows which way the body goes.
    """
    try:
        decoded = _decode(body)
    except (msgspec.MsgspecError, RecursionError):  # malformed JSON, another type, a field absent or out of
        # bounds; or nested past Python's recursion limit, which orjson (1,024 levels) may still read
        return None
    low, high = received - MAX_SKEW, received + MAX_SKEW
    out = []
    for event in decoded if type(decoded) is list else (decoded,):
        ts = event.timestamp
        offset = event.utcoffset
        if offset is not msgspec.UNSET:
            ts = ts - (offset - here) * 3600
        if not low <= ts <= high:  # false for NaN and infinities too
            return None
        out.append((_TAGS[type(event)], event.fields(ts), event.clock))
    return out


_TAGS = {cls: cls.__struct_config__.tag for cls in Hot.__args__}

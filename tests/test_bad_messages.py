"""One bad message never costs a reconnect, on any of the four event paths.

In-process property tests: each path's own per-message code gets JSON nested up to 100,000
levels (in the event body, in an event, in the kombu envelope), envelope fields of every JSON
type, and bodies of several MB. The paths: the Redis fast path's decoder, the AMQP fast path's
frame reader (tests/support/amqp_frames.py), and the stock path's kombu and celery code for
Redis and for RabbitMQ (tests/support/stock_inproc.py). Each message is folded or skipped with a
reason, nothing raises (on a real connection, a raise is a reconnect), and the next good
message is folded. Both Redis paths count every envelope alike. The same against real brokers,
with real tasks in between: tests/test_bad_messages_e2e.py.
"""

from __future__ import annotations

import base64
import functools
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kombu.utils.json import dumps

from celery_sidecar.monitor.boundary import parse
from celery_sidecar.monitor.intake.decoder import EventDecoder, base64_decode
from celery_sidecar.monitor.intake.message_errors import decode_reason
from tests.hostile import _DROP, envelope, valid_event
from tests.support.amqp_frames import AmqpFrames
from tests.support.inproc import DataPath
from tests.support.stock_inproc import StockPath

# orjson reads 1,024 levels; the stdlib json kombu uses reads up to Python's recursion limit
# less the stack in use: ~1,000 in the sidecar, ~2,000 under Hypothesis, which raises the limit.
# Up to SHALLOW every decoder reads it; from DEEP none does.
SHALLOW, DEEP, MAX_DEPTH = 400, 3_000, 100_000
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


# -- the four paths, in-process ------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one message did: events folded, skips by reason."""

    events: int
    skips: tuple[tuple[str, int], ...]

    @property
    def reasons(self) -> set[str]:
        return {reason for reason, _ in self.skips}


@dataclass
class Path:
    name: str
    data: DataPath
    feed: Callable[..., None]

    def counts(self) -> tuple[int, dict[str, int]]:
        counters = self.data.state.counters
        return sum(counters.events_by_type.values()), dict(counters.skipped_by_reason)

    def take(self, *message: Any, **properties: Any) -> Outcome:
        """Feed one message (must not raise); what it did."""
        events, skips = self.counts()
        self.feed(*message, **properties)
        events_after, skips_after = self.counts()
        delta = {r: n - skips.get(r, 0) for r, n in skips_after.items() if n != skips.get(r, 0)}
        return Outcome(events_after - events, tuple(sorted(delta.items())))


@dataclass
class Paths:
    redis_fast: Path
    redis_stock: Path
    amqp_fast: Path
    amqp_stock: Path
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def redis(self) -> list[Path]:
        return [self.redis_fast, self.redis_stock]

    @property
    def amqp(self) -> list[Path]:
        return [self.amqp_fast, self.amqp_stock]

    @property
    def all(self) -> list[Path]:
        return [*self.redis, *self.amqp]


def _decoder(data: DataPath) -> EventDecoder:
    pipeline = data.pipeline
    return EventDecoder(pipeline.handle, pipeline.skip, on_checked=pipeline.fold_checked)


@functools.cache
def paths() -> Paths:
    """Built once for the module: each test reads what a message changed, not the totals."""
    redis_fast, redis_stock, amqp_fast, amqp_stock = (DataPath.build(now=None) for _ in range(4))
    stock_redis, stock_amqp = StockPath(redis_stock.pipeline), StockPath(amqp_stock.pipeline)
    frames = AmqpFrames(_decoder(amqp_fast), amqp_fast.pipeline.skip)
    return Paths(
        Path("redis-fast", redis_fast, _decoder(redis_fast).feed),
        Path("redis-stock", redis_stock, stock_redis.feed_redis),
        Path("amqp-fast", amqp_fast, frames.deliver),
        Path("amqp-stock", amqp_stock, stock_amqp.feed_amqp),
        [stock_redis.close, stock_amqp.close, frames.close],
    )


@pytest.fixture(scope="module", autouse=True)
def _close_paths() -> Iterator[None]:
    yield
    for close in paths().closers:
        close()


def good_event() -> dict[str, Any]:
    return {**valid_event("task-started", 1), "uuid": f"good-{uuid.uuid4()}"}


def body_on(path: Path, body: bytes) -> tuple[Any, ...]:
    """A JSON body as ``path`` reads a message: a kombu envelope on Redis, a delivery on RabbitMQ."""
    if path.name.startswith("redis"):
        return (envelope(None, raw=body),)
    return (body,)


def then_a_good_message_is_folded(path: Path) -> None:
    event = good_event()
    outcome = path.take(*body_on(path, dumps(event).encode()))
    assert outcome == Outcome(1, ()), f"{path.name}: the good message after the bad one: {outcome}"


def nested(depth: int, kind: str, leaf: bytes = b"1") -> bytes:
    """JSON ``depth`` levels deep (built as text: no recursion here)."""
    if kind == "array":
        return b"[" * depth + leaf + b"]" * depth
    return b'{"a":' * depth + leaf + b"}" * depth


depths = st.integers(1, 50) | st.integers(SHALLOW - 50, SHALLOW) | st.integers(DEEP, MAX_DEPTH) | st.just(MAX_DEPTH)
kinds = st.sampled_from(["array", "object"])


# -- nesting ---------------------------------------------------------------------------------------


def deep_body(depth: int, kind: str, where: str) -> bytes:
    """A message body with ``depth`` levels of nesting: the body itself, a field of a good event,
    or the second item of a list body whose first is a good event."""
    if where == "body":
        return nested(depth, kind)
    event = dumps(good_event()).encode()
    if where == "field":
        return event[:-1] + b', "extra": ' + nested(depth, kind) + b"}"
    return b"[" + event + b", " + nested(depth, kind) + b"]"


@FUZZ
@given(depth=depths, kind=kinds, where=st.sampled_from(["body", "field", "list item"]))
@example(depth=MAX_DEPTH, kind="array", where="body")
@example(depth=MAX_DEPTH, kind="object", where="field")
def test_nesting_up_to_100k_levels_is_one_skip_on_every_path_and_the_stream_goes_on(depth, kind, where):
    outcomes = {}
    for path in paths().all:
        outcomes[path.name] = path.take(*body_on(path, deep_body(depth, kind, where)))
        then_a_good_message_is_folded(path)
    if depth >= DEEP:
        assert set(outcomes.values()) == {Outcome(0, (("too_deep", 1),))}, outcomes
    elif depth <= SHALLOW:
        assert len(set(outcomes.values())) == 1, f"the paths disagree: {outcomes}"
        if where != "body":
            assert all(o.events == 1 for o in outcomes.values()), "the good event next to the nesting is lost"


envelope_spots = st.sampled_from(["headers", "properties", "extra", "content-type", "content-encoding",
                                  "body_encoding", "delivery_info"])


def deep_envelope(depth: int, kind: str, spot: str) -> bytes:
    value = orjson.Fragment(nested(depth, kind))
    env = orjson.loads(envelope(good_event()))
    if spot == "body_encoding":
        env["properties"]["body_encoding"] = value
    elif spot == "delivery_info":
        env["properties"]["delivery_info"] = value
    elif spot == "properties":
        env["properties"]["extra"] = value
    else:
        env[spot] = value
    return orjson.dumps(env)


@FUZZ
@given(depth=depths, kind=kinds, spot=envelope_spots)
@example(depth=MAX_DEPTH, kind="array", spot="headers")
def test_nesting_in_the_kombu_envelope_is_one_skip_on_both_redis_paths(depth, kind, spot):
    payload = deep_envelope(depth, kind, spot)
    outcomes = {path.name: path.take(payload) for path in paths().redis}
    for path in paths().redis:
        then_a_good_message_is_folded(path)
    if depth >= DEEP:
        assert set(outcomes.values()) == {Outcome(0, (("too_deep", 1),))}, outcomes
    elif depth <= SHALLOW:
        assert len(set(outcomes.values())) == 1, f"the Redis paths disagree: {outcomes}"


# -- envelope fields of every JSON type ------------------------------------------------------------

_WORDS = ["", "base64", "utf-8", "UTF-8", "BASE64", "binary", "ascii-8bit", "latin-1", "application/json",
          "application/data", "application/text", "application/x-python-serialize", "zlib", "gzip",
          "application/x-gzip", "bzip2", "\ud800", "ø"]
json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(_WORDS) | st.text(max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["compression", "a", "delivery_tag"])
                                                                | st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
bodies = st.sampled_from([
    base64.b64encode(dumps(valid_event("task-started", 5)).encode()).decode(),
    dumps(valid_event("task-started", 6)),  # the JSON text itself, for an envelope without base64
    base64.b64encode(b"[]").decode(), "", "====", "%%%",
]) | json_values
FIELDS = {"body": bodies, "headers": json_values, "properties": json_values, "content-type": json_values,
          "content-encoding": json_values, "body_encoding": json_values, "delivery_tag": json_values,
          "delivery_info": json_values}


def kombu_base64(text: str) -> bytes | str:
    """What kombu's base64 codec makes of a Redis envelope's body (the text encoded, then the
    stdlib's lenient decode), or the error's name."""
    try:
        return base64.b64decode(text.encode())
    except ValueError as exc:
        return type(exc).__name__


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=48).map(lambda raw: base64.b64encode(raw).decode()).flatmap(
    lambda valid: st.just(valid) | st.builds(lambda at, junk: valid[:at] + junk + valid[at:],
                                             st.integers(0, len(valid)), st.text(max_size=3)))
       | st.text(alphabet="ABCab01+/=_-\n é", max_size=16))
@example("QQ==QQ==")  # padding mid-way: the lenient decoder stops at the first
@example("QR==")  # bits past the last byte
@example("QUJD\u00e9")  # non-ASCII: kombu encodes the text first
@example("QUJD\ud800")  # a lone surrogate (the stdlib json lets one through): it cannot be encoded
def test_a_base64_body_decodes_to_the_bytes_kombu_gets_fast_or_not(text):
    try:
        ours: bytes | str = base64_decode(text)
    except ValueError as exc:
        ours = type(exc).__name__
    assert ours == kombu_base64(text)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), min_size=1, max_size=3).flatmap(
    lambda keys: st.fixed_dictionaries({k: FIELDS[k] | st.just(_DROP) for k in keys})))
@example(changes={"body": []})
@example(changes={"headers": [1]})
@example(changes={"headers": {"compression": "zlib"}})
@example(changes={"body_encoding": "gzip"})
@example(changes={"content-type": None})
@example(changes={"content-encoding": ["utf-8"]})
@example(changes={"content-encoding": "\ud800"})  # a lone surrogate: orjson refuses it, the stdlib json takes it
def test_envelope_fields_of_every_json_type_are_taken_or_refused_alike_on_both_redis_paths(changes):
    env = orjson.loads(envelope(good_event()))
    inner = ("body_encoding", "delivery_tag", "delivery_info")
    for key, value in sorted(changes.items(), key=lambda kv: kv[0] in inner):  # the envelope's own keys first
        target = env.get("properties") if key in inner else env
        if not isinstance(target, dict):
            continue  # properties replaced by something that is not an object
        if value is _DROP:
            target.pop(key, None)
        else:
            target[key] = value
    payload = dumps(env).encode()
    outcomes = {path.name: path.take(payload) for path in paths().redis}
    for path in paths().redis:
        then_a_good_message_is_folded(path)
    fast, stock = outcomes.values()
    assert fast == stock, f"the Redis paths disagree on {changes}: {outcomes}"
    assert fast.reasons <= set(parse.REASONS)


# -- bodies of several MB -------------------------------------------------------------------------


def big_body(kind: str, size: int) -> tuple[bytes, Outcome]:
    """A body of about ``size`` bytes, and what every path must make of it."""
    if kind == "traceback":  # an event with a huge traceback: folded, the text cut
        event = {**valid_event("task-failed", 1), "exception": "E()", "traceback": "t" * size}
        return dumps(event).encode(), Outcome(1, ())
    if kind == "events":  # one body of many events, as no worker sends but anyone could
        events = [{**valid_event("task-started", n), "uuid": f"big-{n}-{uuid.uuid4()}"} for n in range(size // 300)]
        return dumps(events).encode(), Outcome(len(events), ())
    if kind == "label":
        return dumps({**valid_event("task-started", 1), "hostname": "h" * size}).encode(), Outcome(
            0, (("out_of_bounds", 1),))
    if kind == "string":
        return dumps("s" * size).encode(), Outcome(0, (("not_an_event", 1),))
    if kind == "numbers":
        count = size // 8
        return orjson.dumps(list(range(10**6, 10**6 + count))), Outcome(0, (("not_an_event", count),))
    return b"{" + b"x" * size, Outcome(0, (("undecodable", 1),))  # not JSON


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["traceback", "events", "label", "string", "numbers", "garbage"]),
       size=st.integers(1 << 20, 6 << 20))
def test_bodies_of_several_mb_are_folded_or_skipped_alike_on_every_path(kind, size):
    body, expected = big_body(kind, size)
    for path in paths().all:
        assert path.take(*body_on(path, body)) == expected, path.name
        then_a_good_message_is_folded(path)


# -- RabbitMQ: any body under any content type ---------------------------------------------------


@FUZZ
@given(body=st.binary(max_size=64) | json_values.map(lambda v: dumps(v).encode()) | st.builds(nested, depths, kinds),
       content_type=st.none() | st.sampled_from(_WORDS[1:16]) | st.text(max_size=10),
       content_encoding=st.none() | st.sampled_from(_WORDS[1:16]))
def test_any_delivery_is_taken_or_refused_alike_on_both_rabbitmq_paths(body, content_type, content_encoding):
    outcomes = {path.name: path.take(body, content_type=content_type, content_encoding=content_encoding)
                for path in paths().amqp}
    for path in paths().amqp:
        then_a_good_message_is_folded(path)
    fast, stock = outcomes.values()
    assert fast.reasons <= set(parse.REASONS)
    assert fast == stock, f"the RabbitMQ paths disagree: {outcomes}"  # ``depths`` skips SHALLOW..DEEP


def test_a_compression_header_kombu_cannot_undo_is_skipped_on_the_rabbitmq_stock_path():
    stock = paths().amqp_stock
    body = dumps(good_event()).encode()
    for compression in ("zlib", "no-such-codec", "application/x-gzip"):
        outcome = stock.take(body, content_type="application/json", application_headers={"compression": compression})
        assert outcome == Outcome(0, (("undecodable", 1),)), compression
        then_a_good_message_is_folded(stock)


# -- errors past the boundary, and what still reconnects -------------------------------------------


def test_a_fold_error_is_one_internal_error_logged_once_a_minute_and_the_stream_goes_on(monkeypatch, caplog):
    bad = f"explodes-{uuid.uuid4()}"
    for path in paths().all:
        handlers = path.data.state.handlers

        def exploding(fields: tuple, received: float, started=handlers["task-started"]) -> Any:
            if fields[0].startswith("explodes-"):
                raise ZeroDivisionError("a bug in the fold")
            return started(fields, received)

        monkeypatch.setitem(handlers, "task-started", exploding)
    caplog.set_level(logging.ERROR, "celery_sidecar.monitor.intake.message_errors")
    for path in paths().all:
        for _ in range(3):  # the hot way and the ordinary way, every path
            for event in ({**valid_event("task-started", 1), "uuid": bad},
                          {**valid_event("task-started", 1), "uuid": bad, "unknown_field": [1]}):
                assert path.take(*body_on(path, dumps(event).encode())) == Outcome(0, (("internal_error", 1),))
        then_a_good_message_is_folded(path)
    tracebacks = [r for r in caplog.records if "internal_error" in r.getMessage()]
    # One decoder or receiver per path, each saying it once a minute: four lines for 24 errors.
    assert len(tracebacks) == 4 and all(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in tracebacks)


class _BrokenSocket:
    def parse_response(self) -> Any:
        raise ConnectionError("Connection reset by peer")


def test_a_socket_error_still_leaves_the_stock_redis_path_to_reconnect():
    stock = StockPath(DataPath.build(now=None).pipeline)
    try:
        with pytest.raises(ConnectionError):
            stock._redis_channel._receive_one(_BrokenSocket())
    finally:
        stock.close()


def test_what_a_decoder_raises_names_the_reason():
    from kombu.exceptions import DecodeError
    from kombu.utils.json import loads

    deep = nested(MAX_DEPTH, "array")
    with pytest.raises(orjson.JSONDecodeError) as orjson_error:
        orjson.loads(deep)
    with pytest.raises(RecursionError) as stdlib_error:
        loads(deep)
    assert decode_reason(orjson_error.value) == decode_reason(stdlib_error.value) == "too_deep"
    wrapped = DecodeError(stdlib_error.value)  # as kombu's loads wraps what its decoder raises
    assert decode_reason(wrapped) == "too_deep"
    assert decode_reason(orjson.JSONDecodeError("unexpected character", "x", 0)) == "undecodable"
    assert decode_reason(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid")) == "undecodable"


def test_the_good_message_helper_fails_on_a_lost_event():
    """The check every test above ends with can fail: a path that drops the event is caught."""
    path = paths().redis_fast
    lossy = Path("lossy", path.data, lambda payload: None)
    with pytest.raises(AssertionError, match="the good message after the bad one"):
        then_a_good_message_is_folded(lossy)

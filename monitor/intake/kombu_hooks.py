"""The private kombu attributes the stock path replaces, checked before it replaces them.

The stock path (monitor/intake/event_receiver.py) puts each message kombu reads inside a
``try`` of its own, which kombu offers no public hook for, so it replaces two private methods
on its own transport and channel objects (never on the classes):

- ``kombu.transport.virtual.Transport._deliver(message, queue)``: every message of a
  virtual transport (Redis among them) passes here, raw, before kombu builds a Message;
- ``kombu.transport.redis.Channel._receive_one(c)``: reads one pub/sub reply and parses the
  envelope's JSON, before ``_deliver``.

A kombu release may rename either or change its parameters. Then the stock path replaces
neither (never one without the other) and runs as celery's EventReceiver does: it still
works, but an envelope kombu trips over costs a reconnect again. It says so at start, in one
line, and on /health (``broker.intake_reason``). tests/test_kombu_hooks.py fails first, on the
upgrade that changes them; pyproject.toml pins kombu to the releases checked.

On Redis it also wraps redis-py's ``PubSub.parse_response(block, timeout)`` on its channel's own
subscriber, to see the server confirm the subscription before it says it is consuming. That
one is checked on its own (``PARSE_RESPONSE``): a redis-py that changed it leaves the message
guards in place, and the stock path says it is consuming as soon as kombu is ready, as
celery's EventReceiver would.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import kombu
from kombu.transport import virtual

try:  # the Redis transport needs redis-py, which the sidecar always installs
    from kombu.transport import redis as kombu_redis
    from redis.client import PubSub
except ImportError:  # pragma: no cover - only without redis-py
    kombu_redis = PubSub = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class Hook:
    """A method of a kombu class, and the parameters (after ``self``) the stock path calls it with."""

    owner: type
    name: str
    params: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}({', '.join(self.params)})"

    def problem(self) -> str | None:
        """None when the hook is there as expected; else what is wrong with it."""
        method = inspect.getattr_static(self.owner, self.name, None)
        if method is None or not callable(method):
            return f"lacks {self}"
        try:
            params = tuple(inspect.signature(method).parameters)
        except (TypeError, ValueError):
            return f"cannot show the signature of {self}"
        if params[1:] != self.params:
            return f"changed {self} to ({', '.join(params[1:])})"
        return None


DELIVER = Hook(virtual.Transport, "_deliver", ("message", "queue"))
RECEIVE_ONE = Hook(kombu_redis.Channel, "_receive_one", ("c",)) if kombu_redis is not None else None
PARSE_RESPONSE = Hook(PubSub, "parse_response", ("block", "timeout")) if PubSub is not None else None


def needed_by(transport: Any) -> list[Hook]:
    """The hooks the stock path replaces on ``transport`` (a kombu Transport instance)."""
    hooks: list[Hook] = []
    if isinstance(transport, virtual.Transport):
        hooks.append(DELIVER)
        if RECEIVE_ONE is not None and issubclass(getattr(transport, "Channel", object), kombu_redis.Channel):
            hooks.append(RECEIVE_ONE)
    return hooks


def confirms_subscription(transport: Any) -> bool:
    """Whether the stock path can wait for Redis to confirm its subscription on ``transport``:
    kombu's Redis channel, and redis-py's ``PubSub.parse_response`` as expected."""
    return RECEIVE_ONE in needed_by(transport) and PARSE_RESPONSE is not None and PARSE_RESPONSE.problem() is None


def unpatched_reason(transport: Any) -> str | None:
    """None when every hook ``transport`` needs is as expected; else one line saying why not."""
    problems = [p for hook in needed_by(transport) if (p := hook.problem()) is not None]
    if not problems:
        return None
    return (f"stock path unpatched: kombu {kombu.__version__} {'; '.join(problems)}: it runs as celery's "
            "EventReceiver does, and an envelope kombu cannot read costs a reconnect")

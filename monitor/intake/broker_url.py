"""Broker URLs: which ones the sidecar can read, the one redaction for logs and /health, and
what a failed connection means in plain words.

``check`` runs once at start, before anything connects: a URL the sidecar cannot read is
one line saying what to write instead, not a transport's traceback (or, for a URL without
a scheme, kombu's guess that it is AMQP). ``explain`` turns a connection failure, whichever
event path raised it, into its cause (authentication refused, connection refused, name not
found ...), so the log's first line about a wrong URL says what is wrong.
"""

from __future__ import annotations

import errno
import socket
import ssl
from urllib.parse import urlsplit

__all__ = ["SCHEMES", "BrokerUrlError", "check", "explain", "normalize", "redact", "scrub"]

# The schemes whose event stream the sidecar reads: Redis (a unix socket as redis+socket:// or
# socket://, kombu's two names for it) and RabbitMQ, each through its fast path or kombu's.
SCHEMES = ("redis", "rediss", "redis+socket", "socket", "sentinel", "amqp", "amqps", "pyamqp")

# Why a scheme kombu knows is still no broker to watch: said in the refusal.
_WHY_NOT = {
    "sqs": "Celery sends no events over SQS, which has no broadcast exchange",
    "memory": "memory:// lives inside one process; the sidecar cannot share it",
    "filesystem": "Celery sends no events over the filesystem transport",
}

_DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "sentinel": 26379, "amqp": 5672, "amqps": 5671, "pyamqp": 5672}


class BrokerUrlError(ValueError):
    """A broker URL the sidecar cannot use; the message is one line and says what to do."""


def normalize(url: str) -> str:
    """``url`` as kombu's Connection takes it: ``socket:///path`` (celery's name for a Redis unix
    socket, which kombu reads only inside its Redis transport) as ``redis+socket:///path``."""
    return "redis+" + url if url.startswith("socket://") else url


def redact(url: str) -> str:
    """``url`` with every password masked (each URL of a ``;`` failover list), for logs and
    /health. Masks too much rather than too little: whatever precedes the last ``@`` of a
    URL's authority is user information."""
    return ";".join(_redact_one(part) for part in url.split(";"))


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    # The last "@" anywhere: a password may hold an unescaped "/" (kombu accepts some), and
    # an "@" in a path is rare enough that hiding the host then is the cheaper mistake.
    at = rest.rfind("@")
    if at == -1:
        return url
    user, colon, _ = rest[:at].partition(":")
    masked = f"{user}:***" if colon else "***"
    return f"{scheme}{sep}{masked}{rest[at:]}"


def scrub(text: str, url: str) -> str:
    """``text`` (an error message) with the URL's passwords masked, should a library quote them."""
    for part in url.split(";"):
        try:
            password = urlsplit(part).password
        except ValueError:
            continue
        if password:
            text = text.replace(password, "***")
    return text


def check(url: str) -> None:
    """Refuse, in one line, a broker URL the sidecar cannot read."""
    if not url.strip():
        raise BrokerUrlError("the broker URL is empty: give --broker-url (or CELERY_BROKER_URL), "
                             "e.g. redis://HOST:6379/0 or amqp://USER:PASSWORD@HOST:5672//")
    for part in (p.strip() for p in url.split(";")):
        shown = redact(part)
        scheme, sep, _ = part.partition("://")
        if not sep or not scheme:
            redis_url = f"redis://{shown}" + ("" if "/" in shown else "/0")
            amqp_url = "amqp://" + ("" if "@" in shown else "USER:PASSWORD@") + shown.split("/")[0] + "//"
            raise BrokerUrlError(f"the broker URL {shown!r} has no scheme: write {redis_url} for Redis "
                                 f"or {amqp_url} for RabbitMQ")
        if scheme.lower() not in SCHEMES:
            why = _WHY_NOT.get(scheme.lower())
            raise BrokerUrlError(
                f"the broker URL scheme {scheme + '://'!r} is not supported"
                + (f"; {why}" if why else "")
                + ". The sidecar reads Celery events from Redis (redis://, rediss://, redis+socket://, "
                  "sentinel://) and RabbitMQ (amqp://, amqps://, pyamqp://): give the URL of the app's "
                  "Redis or RabbitMQ broker")
        try:
            urlsplit(part).port  # noqa: B018 - parsing the port is the check
        except ValueError:
            raise BrokerUrlError(f"the broker URL {shown!r} has an invalid port: "
                                 "the port must be a number from 0 to 65535") from None


def endpoint(url: str) -> str:
    """HOST:PORT of the first URL, for messages."""
    first = url.split(";")[0]
    try:
        parts = urlsplit(first)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "the broker's address"
    if parts.scheme in ("redis+socket", "socket"):
        return first.partition("://")[2] or "the socket"
    port = port or _DEFAULT_PORTS.get(parts.scheme)
    return f"{host or 'localhost'}:{port}" if port else host or "localhost"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


# (words in the error text, the cause). Each event path words its failures its own way (the
# Redis fast path in redis_pubsub.py, py-amqp, kombu), so the text is what they share.
_AUTH_WORDS = ("noauth", "wrongpass", "invalid password", "invalid username-password", "access_refused",
               "authentication required", "authentication failed", "login was refused", "auth failed")
_TEXT_CAUSES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("without any password configured",),
     "authentication refused: the broker has no password, but the URL gives one (remove it from the URL)"),
    (_AUTH_WORDS, "authentication refused: check the user name and password in the broker URL"),
    (("not_allowed", "access to vhost"),
     "the broker refused the virtual host: it does not exist, or the user may not use it"),
    (("name or service not known", "nodename nor servname", "temporary failure in name resolution",
      "no address associated", "cannot resolve", "getaddrinfo failed"),
     "name not found: the broker's host name does not resolve (check the host in the URL)"),
    (("connection refused",), "connection refused: nothing listens at {where} (wrong host or port, or the "
                              "broker is down)"),
    (("no route to host", "network is unreachable", "host is unreachable"),
     "host unreachable: there is no route to {where}"),
    (("timed out", "timeout"), "no answer from {where}: the connection timed out (a firewall, or the host is down)"),
    (("certificate", "ssl", "tls"), "the TLS handshake with {where} failed (certificates, or TLS on a plain port)"),
)
_ERRNO_CAUSES = {
    errno.ECONNREFUSED: "connection refused",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network is unreachable",
    errno.ETIMEDOUT: "timed out",
}


def explain(exc: BaseException, url: str) -> str | None:
    """The cause of a failed connection in plain words, or None when it is none of the
    usual ones (the caller then shows the error itself)."""
    words = []
    for link in _chain(exc):
        words.append(f"{type(link).__name__}: {link}".lower())
        if isinstance(link, socket.gaierror):
            words.append("name or service not known")
        elif isinstance(link, ssl.SSLError):
            words.append("ssl")
        elif isinstance(link, TimeoutError):
            words.append("timed out")
        elif isinstance(link, OSError) and link.errno in _ERRNO_CAUSES:
            words.append(_ERRNO_CAUSES[link.errno])
    text = " | ".join(words)
    for needles, cause in _TEXT_CAUSES:
        if any(needle in text for needle in needles):
            return cause.format(where=endpoint(url))
    return None

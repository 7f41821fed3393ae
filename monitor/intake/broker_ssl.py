"""The broker's TLS options (celery's ``broker_use_ssl``), read once and used by every connection.

They come from the app's ``broker_use_ssl`` or ``--broker-use-ssl`` (JSON), with the keys the
broker's client library takes: for Redis ``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile`` (redis-py's), for RabbitMQ ``cert_reqs``, ``ca_certs``, ``certfile``, ``keyfile``
(py-amqp's). kombu gets them as they are, for the stock path and the sidecar's own connections
(worker inspection, the AMQP fast path's handshake); the Redis fast path builds its TLS context
from them here, as redis-py's ``SSLConnection`` does, so both paths accept and refuse the same
certificates. In JSON a ``cert_reqs`` is a name: ``"required"``, ``"optional"`` or ``"none"``,
and ``ssl_min_version`` one of ``ssl.TLSVersion``'s (``"TLSv1_2"``).
"""

from __future__ import annotations

import inspect
import ssl
from typing import Any

from redis.connection import SSLConnection

__all__ = ["FAST_PATH_KEYS", "normalize", "redis_context", "unsupported"]

_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
# What redis-py's SSLConnection does by default, so that both Redis paths check the same things.
_CHECK_HOSTNAME = inspect.signature(SSLConnection.__init__).parameters["ssl_check_hostname"].default
# The redis-py TLS options the Redis fast path builds its context from; any other (OCSP, verify
# flags) leaves the broker to the stock path, which hands them to redis-py.
FAST_PATH_KEYS = frozenset({"ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_data", "ssl_ca_path", "ssl_certfile",
                            "ssl_keyfile", "ssl_password", "ssl_check_hostname", "ssl_min_version", "ssl_ciphers"})


def normalize(options: Any) -> Any:
    """``options`` with a ``cert_reqs`` or ``ssl_cert_reqs`` named in words (``"required"``,
    ``"CERT_REQUIRED"``) as the ``ssl.VerifyMode`` both libraries take. Raises ValueError for a
    name that is none of them; anything but a dict is returned as it is."""
    if not isinstance(options, dict):
        return options
    out = dict(options)
    for key in ("cert_reqs", "ssl_cert_reqs"):
        value = out.get(key)
        if isinstance(value, str):
            word = value.lower().removeprefix("cert_")
            if word not in _CERT_REQS:
                raise ValueError(f"{key} must be one of required, optional, none (got {value!r})")
            out[key] = _CERT_REQS[word]
        elif isinstance(value, int) and not isinstance(value, bool) and value in _CERT_REQS.values():
            out[key] = ssl.VerifyMode(value)
    version = out.get("ssl_min_version")
    if isinstance(version, str):  # "TLSv1_2", as ssl.TLSVersion names it
        try:
            out["ssl_min_version"] = ssl.TLSVersion[version]
        except KeyError:
            raise ValueError(f"ssl_min_version must be one of {', '.join(ssl.TLSVersion.__members__)}") from None
    return out


def unsupported(options: dict[str, Any]) -> list[str]:
    """The TLS options the Redis fast path does not build a context from."""
    return sorted(set(options) - FAST_PATH_KEYS)


def redis_context(options: dict[str, Any]) -> ssl.SSLContext:
    """The client TLS context redis-py's ``SSLConnection`` builds from these options."""
    reqs = options.get("ssl_cert_reqs", ssl.CERT_REQUIRED)
    if reqs is None:
        reqs = ssl.CERT_NONE
    elif isinstance(reqs, str):
        reqs = normalize({"ssl_cert_reqs": reqs})["ssl_cert_reqs"]
    context = ssl.create_default_context()
    context.check_hostname = bool(options.get("ssl_check_hostname", _CHECK_HOSTNAME)) and reqs != ssl.CERT_NONE
    context.verify_mode = reqs
    if options.get("ssl_certfile") or options.get("ssl_keyfile"):
        context.load_cert_chain(certfile=options.get("ssl_certfile"), keyfile=options.get("ssl_keyfile"),
                                password=options.get("ssl_password"))
    cafile, capath, cadata = options.get("ssl_ca_certs"), options.get("ssl_ca_path"), options.get("ssl_ca_data")
    if cafile is not None or capath is not None or cadata is not None:
        context.load_verify_locations(cafile=cafile, capath=capath, cadata=cadata)
    if options.get("ssl_min_version") is not None:
        context.minimum_version = options["ssl_min_version"]
    if options.get("ssl_ciphers"):
        context.set_ciphers(options["ssl_ciphers"])
    return context

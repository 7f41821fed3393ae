"""Durable state of alert delivery: pending alerts, delivered keys, claims, message refs.

Two stores with one interface:

* `RedisOutbox` in the broker's Redis (broker URL redis:// or rediss://). Sidecars on the
  same broker share it: a key is claimed with SET NX + expiry (a lease) before it is sent,
  and marked delivered (with a TTL) before the claim is released, so two sidecars never
  both post it; if the holder dies, its lease runs out and another sidecar sends.
* `SqliteOutbox`, a file in the state dir, for any other broker. It is local to one
  sidecar: running two sidecars against it is not supported (each would post).

Keys in Redis, under ``celery_sidecar:alerts:``: ``pending`` (hash key -> alert JSON),
``delivered:<key>``, ``claim:<key>``, ``message:<group>`` (the Slack channel and ts of a
firing message, so its resolution can edit or thread onto it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import redis

from celery_sidecar.alerts.model import Alert, MessageRef

log = logging.getLogger(__name__)

REDIS_PREFIX = "celery_sidecar:alerts:"
SQLITE_FILENAME = "alerts-outbox.sqlite3"
_ALERT_FIELDS = {f.name for f in dataclasses.fields(Alert)}


class Outbox(Protocol):
    def put(self, alert: Alert) -> None: ...
    def load(self) -> list[Alert]: ...
    def is_delivered(self, key: str) -> bool: ...
    def mark_delivered(self, key: str, ttl_seconds: float) -> None:
        """Record the key as delivered and drop it from pending, in one step."""

    def discard(self, key: str) -> None:
        """Drop from pending without marking delivered (given up on)."""

    def claim(self, key: str, owner: str, lease_seconds: float) -> float:
        """0.0 if `owner` now holds the key; else the seconds until the holder's lease ends."""

    def release(self, key: str, owner: str) -> None: ...
    def remember_message(self, group: str, ref: MessageRef, ttl_seconds: float) -> None: ...
    def find_message(self, group: str) -> MessageRef | None: ...
    def close(self) -> None: ...


def open_outbox(broker_url: str, state_dir: Path, client: redis.Redis | None = None) -> Outbox:
    """The broker's Redis when the broker is Redis, else a sqlite file in `state_dir`. ``client``:
    a client to the broker's Redis built with its TLS, Sentinel and socket settings (the URL alone
    may not say them)."""
    if client is not None:
        return RedisOutbox(client)
    if urlsplit(broker_url).scheme in ("redis", "rediss"):
        return RedisOutbox(redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5))
    return SqliteOutbox(state_dir / SQLITE_FILENAME)


def encode_alert(alert: Alert) -> str:
    return json.dumps(dataclasses.asdict(alert), separators=(",", ":"))


def decode_alert(raw: str | bytes) -> Alert:
    data = json.loads(raw)
    # Tolerate entries written by a newer version with fields this one lacks.
    return Alert(**{k: v for k, v in data.items() if k in _ALERT_FIELDS})


class RedisOutbox:
    # Release only our own claim: the lease may have run out and been taken by another sidecar.
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    def __init__(self, client: redis.Redis, prefix: str = REDIS_PREFIX) -> None:
        self._redis = client
        self._prefix = prefix
        self._release = client.register_script(self._RELEASE)

    def put(self, alert: Alert) -> None:
        self._redis.hset(self._prefix + "pending", alert.key, encode_alert(alert))

    def load(self) -> list[Alert]:
        alerts = []
        for key, raw in self._redis.hgetall(self._prefix + "pending").items():
            try:
                alerts.append(decode_alert(raw))
            except (ValueError, TypeError) as exc:
                log.error("dropping unreadable outbox entry %r: %s", key, exc)
                self._redis.hdel(self._prefix + "pending", key)
        return alerts

    def is_delivered(self, key: str) -> bool:
        return bool(self._redis.exists(self._prefix + "delivered:" + key))

    def mark_delivered(self, key: str, ttl_seconds: float) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._prefix + "delivered:" + key, "1", px=_ms(ttl_seconds))
        pipe.hdel(self._prefix + "pending", key)
        pipe.execute()

    def discard(self, key: str) -> None:
        self._redis.hdel(self._prefix + "pending", key)

    def claim(self, key: str, owner: str, lease_seconds: float) -> float:
        name = self._prefix + "claim:" + key
        if self._redis.set(name, owner, nx=True, px=_ms(lease_seconds)):
            return 0.0
        if self._redis.get(name) == owner.encode():
            return 0.0  # ours already, from an attempt that did not finish
        remaining_ms = self._redis.pttl(name)
        return max(remaining_ms, 1) / 1000 if remaining_ms != -2 else 0.001

    def release(self, key: str, owner: str) -> None:
        self._release(keys=[self._prefix + "claim:" + key], args=[owner])

    def remember_message(self, group: str, ref: MessageRef, ttl_seconds: float) -> None:
        value = json.dumps({"channel": ref.channel, "ts": ref.ts})
        self._redis.set(self._prefix + "message:" + group, value, px=_ms(ttl_seconds))

    def find_message(self, group: str) -> MessageRef | None:
        raw = self._redis.get(self._prefix + "message:" + group)
        return MessageRef(**json.loads(raw)) if raw else None

    def close(self) -> None:
        self._redis.close()


class SqliteOutbox:
    """One sidecar's outbox in a sqlite file; every write is its own transaction."""

    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS pending (key TEXT PRIMARY KEY, alert TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS delivered (key TEXT PRIMARY KEY, expires REAL NOT NULL);
        CREATE TABLE IF NOT EXISTS messages (grp TEXT PRIMARY KEY, channel TEXT, ts TEXT, expires REAL);
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The dispatcher's thread does the work, but start/stop run elsewhere: one lock, one connection.
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.executescript(self._SCHEMA)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._expire(time.time())

    def put(self, alert: Alert) -> None:
        self._write("INSERT OR REPLACE INTO pending VALUES (?, ?)", (alert.key, encode_alert(alert)))

    def load(self) -> list[Alert]:
        with self._lock:
            rows = self._db.execute("SELECT key, alert FROM pending ORDER BY rowid").fetchall()
        alerts = []
        for key, raw in rows:
            try:
                alerts.append(decode_alert(raw))
            except (ValueError, TypeError) as exc:
                log.error("dropping unreadable outbox entry %r: %s", key, exc)
                self.discard(key)
        return alerts

    def is_delivered(self, key: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT expires FROM delivered WHERE key = ?", (key,)).fetchone()
        return row is not None and row[0] > time.time()

    def mark_delivered(self, key: str, ttl_seconds: float) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO delivered VALUES (?, ?)", (key, time.time() + ttl_seconds))
            self._db.execute("DELETE FROM pending WHERE key = ?", (key,))

    def discard(self, key: str) -> None:
        self._write("DELETE FROM pending WHERE key = ?", (key,))

    def claim(self, key: str, owner: str, lease_seconds: float) -> float:
        return 0.0  # one sidecar per file: nobody to share with

    def release(self, key: str, owner: str) -> None:
        return None

    def remember_message(self, group: str, ref: MessageRef, ttl_seconds: float) -> None:
        self._write(
            "INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?)",
            (group, ref.channel, ref.ts, time.time() + ttl_seconds),
        )

    def find_message(self, group: str) -> MessageRef | None:
        with self._lock:
            row = self._db.execute("SELECT channel, ts, expires FROM messages WHERE grp = ?", (group,)).fetchone()
        return MessageRef(row[0], row[1]) if row and row[2] > time.time() else None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, params: tuple) -> None:
        with self._lock:
            self._db.execute(sql, params)

    def _expire(self, now: float) -> None:
        # Called at open: expired rows only cost space, so once per start is enough.
        self._db.execute("DELETE FROM delivered WHERE expires <= ?", (now,))
        self._db.execute("DELETE FROM messages WHERE expires <= ?", (now,))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))

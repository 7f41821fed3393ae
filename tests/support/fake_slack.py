"""A Slack stand-in on loopback: incoming webhooks and the chat.postMessage/chat.update/auth.test Web API.

Every request is recorded. Tests script trouble ahead of time: the next N requests answer
429 with Retry-After, or 500, or hang before answering; or the whole server goes down
(the port refuses connections) and comes back on the same port.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs

from tests.support.servers import free_port, wait_for

WEBHOOK_PATH = "/services/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX"
TOKEN = "fake-bot-token"  # not xox*-shaped, so secret scanners stay quiet


@dataclass
class Request:
    path: str
    body: dict[str, Any]
    at: float  # time.monotonic()
    status: int  # what we answered
    accepted: bool  # Slack would have posted/edited a message
    reply: dict[str, Any]

    @property
    def method(self) -> str:
        return self.path.rsplit("/", 1)[-1] if self.path.startswith("/api/") else "webhook"

    @property
    def headline(self) -> str:
        """The first line of the message's text: "[SEVERITY] title"."""
        text = self.body.get("text") or ""
        return text.splitlines()[0] if text else ""


class _Logged(Protocol):
    """What sent the messages (a SidecarProcess): its log explains a message that did not come."""

    def log(self) -> str: ...


@dataclass
class _Trouble:
    status: int = 0  # 429 or 500; 0: answer normally
    retry_after: float | None = None
    hang: float = 0.0


@dataclass
class FakeSlack:
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    token: str = TOKEN
    requests: list[Request] = field(default_factory=list)
    _trouble: deque[_Trouble] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _ts: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def webhook_url(self) -> str:
        return self.base + WEBHOOK_PATH

    @property
    def api_url(self) -> str:
        return self.base + "/api/"

    # -- scripting ----------------------------------------------------------------------------

    def rate_limit(self, times: int, retry_after: float = 1) -> None:
        self._script(times, _Trouble(429, retry_after))

    def fail(self, times: int, status: int = 500) -> None:
        self._script(times, _Trouble(status))

    def hang(self, times: int, seconds: float) -> None:
        self._script(times, _Trouble(hang=seconds))

    def _script(self, times: int, trouble: _Trouble) -> None:
        with self._lock:
            self._trouble.extend([trouble] * times)

    # -- what arrived -------------------------------------------------------------------------

    def accepted(self, method: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.accepted and (method is None or r.method == method)]

    def texts(self) -> list[str]:
        return [r.body.get("text", "") for r in self.accepted()]

    def headlines(self) -> list[str]:
        return [r.headline for r in self.accepted()]

    def messages(self, title: str = "") -> list[Request]:
        """The accepted messages with ``title`` in their headline, in arrival order."""
        return [r for r in self.accepted() if title in r.headline]

    def mentioning(self, text: str) -> list[Request]:
        """The accepted messages with ``text`` anywhere in their body (text, blocks, fields)."""
        return [r for r in self.accepted() if text in json.dumps(r.body)]

    def wait_messages(self, title: str = "", count: int = 1, timeout: float = 30,
                      side: _Logged | None = None) -> list[Request]:
        """Wait until ``count`` accepted messages have ``title`` in their headline (no title: any
        message); return all of them. If they do not come, the AssertionError lists what did,
        and the end of ``side``'s log."""
        try:
            wait_for(lambda: len(self.messages(title)) >= count, timeout=timeout,
                     what=f"{count} Slack message(s) titled {title!r}")
        except TimeoutError:
            log = f"\n--- sidecar log ---\n{side.log()[-4000:]}" if side is not None else ""
            raise AssertionError(f"no {count}x {title!r} in Slack after {timeout}s; got {self.headlines()}{log}") \
                from None
        return self.messages(title)

    def wait_message(self, title: str, timeout: float = 30, side: _Logged | None = None) -> Request:
        """The first accepted message with ``title`` in its headline, once one has come."""
        return self.wait_messages(title, 1, timeout, side)[0]

    # -- lifecycle ----------------------------------------------------------------------------

    def up(self) -> None:
        handler = type("Handler", (_Handler,), {"slack": self})
        self._server = ThreadingHTTPServer((self.host, self.port), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-slack", daemon=True).start()

    def down(self) -> None:
        """Stop listening: connections are refused until up()."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- answering ----------------------------------------------------------------------------

    def _answer(self, path: str, headers: Any, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            trouble = self._trouble.popleft() if self._trouble else _Trouble()
        if trouble.hang:
            time.sleep(trouble.hang)
        is_api = path.startswith("/api/")
        if trouble.status == 429:
            extra = {"Retry-After": _seconds(trouble.retry_after)} if trouble.retry_after is not None else {}
            return self._record(path, body, 429, False, extra, {"ok": False, "error": "ratelimited"}, is_api)
        if trouble.status:
            return self._record(path, body, trouble.status, False, {}, {"ok": False, "error": "fatal_error"}, is_api)
        if not is_api:
            if not path.startswith("/services/"):
                return self._record(path, body, 404, False, {}, {"ok": False, "error": "no_service"}, False)
            if not body.get("text") and not body.get("blocks"):
                return self._record(path, body, 400, False, {}, {"ok": False, "error": "no_text"}, False)
            return self._record(path, body, 200, True, {}, {"ok": True}, False)
        if headers.get("Authorization") != f"Bearer {self.token}":
            return self._record(path, body, 200, False, {}, {"ok": False, "error": "invalid_auth"}, True)
        method = path.rsplit("/", 1)[-1]
        if method == "chat.postMessage":
            ts = f"{1700000000 + next(self._ts)}.000100"
            reply = {
                "ok": True,
                "channel": _channel_id(body["channel"]),
                "ts": ts,
                "message": {"text": body.get("text")},
            }
            return self._record(path, body, 200, True, {}, reply, True)
        if method == "chat.update":
            if not self._posted(body.get("channel"), body.get("ts")):
                return self._record(path, body, 200, False, {}, {"ok": False, "error": "message_not_found"}, True)
            reply = {"ok": True, "channel": body["channel"], "ts": body["ts"], "text": body.get("text")}
            return self._record(path, body, 200, True, {}, reply, True)
        if method == "auth.test":
            # Slack's documented answer for a bot token; it posts nothing, so it is never "accepted".
            reply = {"ok": True, "url": "https://fake-workspace.slack.com/", "team": "Fake Workspace",
                     "user": "celery-sidecar", "team_id": "T000", "user_id": "U000", "bot_id": "B000",
                     "is_enterprise_install": False}
            return self._record(path, body, 200, False, {}, reply, True)
        return self._record(path, body, 200, False, {}, {"ok": False, "error": "unknown_method"}, True)

    def _posted(self, channel: str | None, ts: str | None) -> bool:
        with self._lock:
            return any(
                r.method == "chat.postMessage" and r.accepted and (r.reply["channel"], r.reply["ts"]) == (channel, ts)
                for r in self.requests
            )

    def _record(
        self,
        path: str,
        body: dict[str, Any],
        status: int,
        accepted: bool,
        headers: dict[str, str],
        reply: dict[str, Any],
        is_api: bool,
    ) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.requests.append(Request(path, body, time.monotonic(), status, accepted, reply))
        if is_api:
            return status, {"Content-Type": "application/json", **headers}, json.dumps(reply).encode()
        # Webhooks answer in plain text: "ok", or the error code.
        text = "ok" if reply.get("ok") else str(reply.get("error"))
        return status, {"Content-Type": "text/plain", **headers}, text.encode()


def _channel_id(channel: str) -> str:
    # Slack answers with the channel id even when given a name.
    return channel if channel.startswith("C") else "C" + channel.lstrip("#").upper().replace("-", "")


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class _Handler(BaseHTTPRequestHandler):
    slack: FakeSlack
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode()
        if "json" in (self.headers.get("Content-Type") or ""):
            body = json.loads(raw or "{}")
        else:
            body = {k: v[0] for k, v in parse_qs(raw).items()}
            if isinstance(body.get("blocks"), str):
                body["blocks"] = json.loads(body["blocks"])
        status, headers, payload = self.slack._answer(self.path, self.headers, body)
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): its request is still recorded

    def log_message(self, format: str, *args: Any) -> None:
        return


@contextmanager
def fake_slack(token: str = TOKEN) -> Iterator[FakeSlack]:
    slack = FakeSlack(token=token)
    slack.up()
    try:
        yield slack
    finally:
        slack.down()

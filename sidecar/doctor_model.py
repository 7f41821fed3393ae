"""What `celery-sidecar doctor` works with: its settings, a check's result, masking, HTTP.

A check is a function of `DoctorSettings` returning one `Result` per line it prints. It
never raises for a problem it found: a `CheckError` (or any exception) is turned into a
failed line by the runner (doctor.py), so one check going wrong never stops the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import httpx

Status = Literal["ok", "fail", "skip"]


@dataclass(frozen=True)
class Result:
    check: str
    status: Status
    detail: str
    fix: str = ""  # one line, only for a failure


def ok(check: str, detail: str) -> Result:
    return Result(check, "ok", detail)


def fail(check: str, detail: str, fix: str) -> Result:
    return Result(check, "fail", detail, fix)


def skip(check: str, detail: str) -> Result:
    return Result(check, "skip", detail)


class CheckError(Exception):
    """A check cannot go on: the runner reports ``detail`` as the check's failure, with ``fix``."""

    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


@dataclass(frozen=True)
class DoctorSettings:
    """Where the stack's parts answer and how to log in; ``None``: not given, so not checked.

    Secrets are kept out of the repr: a traceback or a debug print must not show them."""

    nginx_url: str
    flower_user: str | None = None
    flower_password: str | None = field(default=None, repr=False)
    sidecar_url: str | None = None
    prometheus_url: str | None = None  # the base, path prefix included (the stack's is /prometheus)
    prometheus_via_nginx: bool = False  # behind nginx's /prometheus/ route: send the Flower login
    grafana_url: str | None = None
    grafana_user: str = "admin"
    grafana_password: str | None = field(default=None, repr=False)
    grafana_token: str | None = field(default=None, repr=False)
    slack_webhook_url: str | None = field(default=None, repr=False)
    slack_bot_token: str | None = field(default=None, repr=False)
    slack_api_url: str | None = None
    timeout: float = 5.0
    max_event_age: float = 30.0

    @property
    def flower_auth(self) -> tuple[str, str] | None:
        if self.flower_user and self.flower_password:
            return self.flower_user, self.flower_password
        return None

    @property
    def secrets(self) -> tuple[str, ...]:
        try:
            webhook_path = urlsplit(self.slack_webhook_url).path if self.slack_webhook_url else None
        except ValueError:  # a malformed URL: its webhook check says so; the whole URL is still masked
            webhook_path = None
        candidates = (self.flower_password, self.grafana_password, self.grafana_token, self.slack_bot_token,
                      self.slack_webhook_url, webhook_path if webhook_path not in ("", "/") else None)
        return tuple(s for s in candidates if s)

    def client(self, auth: tuple[str, str] | None = None) -> httpx.Client:
        # Redirects are answers to judge (nginx's /flower -> /flower/), not to follow.
        return httpx.Client(timeout=self.timeout, auth=auth, follow_redirects=False)


# user:password@ in any URL a message quotes (a URL flag given with its credentials).
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


class Masker:
    """Replaces every secret, and the credentials of any URL, in text about to be printed."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first: a secret containing another is masked whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = _USERINFO.sub("***@", text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def describe(exc: httpx.HTTPError, timeout: float) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({exc})"
    return f"{type(exc).__name__}: {exc}"


def request(settings: DoctorSettings, method: str, url: str, *, fix: str,
            auth: tuple[str, str] | None = None, client: httpx.Client | None = None,
            **kw: object) -> httpx.Response:
    """One request with the settings' timeout; a transport error is the check's failure."""
    try:
        if client is not None:
            return client.request(method, url, **kw)  # type: ignore[arg-type]
        with settings.client(auth) as own:
            return own.request(method, url, **kw)  # type: ignore[arg-type]
    except httpx.HTTPError as exc:
        raise CheckError(f"{url}: {describe(exc, settings.timeout)}", fix) from None


def json_body(response: httpx.Response, what: str, fix: str) -> object:
    try:
        return response.json()
    except ValueError:
        raise CheckError(f"{response.request.url} answered {response.status_code} with no JSON: "
                         f"not {what}", fix) from None


Check = Callable[[DoctorSettings], list[Result]]

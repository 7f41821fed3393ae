"""The doctor's checks of what the stack logs in to: Grafana and Slack.

Grafana: its documented search API (`GET /api/search?type=dash-db`) must refuse an
anonymous caller and list both provisioned dashboards (the uids of
monitor/config/dashboard_links.py) to a logged-in one. The stack turns Grafana's HTTP basic
auth off, so the login is a service account token (Bearer, which nginx passes through) or
the admin's session cookie from Grafana's own login form.

Slack: a bot token is checked with `auth.test`, which posts nothing. An incoming webhook has
no such method: the only test is a post, so it is reported as not checked, never posted to.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import httpx
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from celery_sidecar.alerts.delivery.slack import validate_webhook_url
from celery_sidecar.doctor_model import DoctorSettings, Result, describe, fail, json_body, ok, request, skip
from celery_sidecar.monitor.config.dashboard_links import OVERVIEW_UID, TASK_UID

DASHBOARD_UIDS = (OVERVIEW_UID, TASK_UID)
GRAFANA_LOGIN = "Grafana accepts the credentials"
GRAFANA_DASHBOARDS = "Grafana dashboards provisioned"
GRAFANA_URL_FIX = "point --grafana-url (GRAFANA_ROOT_URL) at Grafana as users open it, e.g. https://host/grafana"
DASHBOARDS_FIX = ("render writes both dashboards into the grafana-dashboards volume and their provider into "
                  "grafana-provisioning: run `docker compose -f docker-compose.monitoring.yml up -d` again and "
                  "read Grafana's log for provisioning errors")

# slack-sdk logs a failed call at ERROR on its own logger; the checklist says it once, masked.
_slack_log = logging.getLogger("celery_sidecar.doctor.slack")
_slack_log.addHandler(logging.NullHandler())
_slack_log.propagate = False


# -- Grafana -------------------------------------------------------------------------------------

def grafana_anonymous(s: DoctorSettings) -> list[Result]:
    name = "Grafana refuses requests without credentials"
    if not s.grafana_url:
        return [skip(name, "no --grafana-url (GRAFANA_ROOT_URL)")]
    url = f"{s.grafana_url}/api/search"
    code = request(s, "GET", url, fix=GRAFANA_URL_FIX, params={"type": "dash-db"}).status_code
    if code in (401, 403):
        return [ok(name, f"{url} answered {code} without credentials")]
    if code == 200:
        return [fail(name, f"{url} answered 200 without credentials: anyone allowed through nginx can read "
                           "the dashboards", "set GF_AUTH_ANONYMOUS_ENABLED=false (the compose file does) and "
                                             "restart Grafana")]
    if code in (502, 503, 504):
        return [fail(name, f"{url} answered {code}: nginx cannot reach Grafana",
                     "start Grafana (`docker compose ps grafana`; its log says why it stopped)")]
    return [fail(name, f"{url} answered {code}", GRAFANA_URL_FIX)]


def grafana_dashboards(s: DoctorSettings) -> list[Result]:
    if not s.grafana_url:
        return [skip(GRAFANA_LOGIN, "no --grafana-url (GRAFANA_ROOT_URL)"),
                skip(GRAFANA_DASHBOARDS, "no --grafana-url (GRAFANA_ROOT_URL)")]
    if not (s.grafana_token or s.grafana_password):
        why = "no GRAFANA_ADMIN_PASSWORD or --grafana-token (GRAFANA_TOKEN) given"
        return [skip(GRAFANA_LOGIN, why), skip(GRAFANA_DASHBOARDS, why)]
    with s.client() as client:
        login = _grafana_login(s, client)
        if login.status != "ok":
            return [login, skip(GRAFANA_DASHBOARDS, "needs a Grafana login")]
        headers = {"Authorization": f"Bearer {s.grafana_token}"} if s.grafana_token else {}
        r = request(s, "GET", f"{s.grafana_url}/api/search", fix=GRAFANA_URL_FIX, client=client,
                    params={"type": "dash-db"}, headers=headers)
    if r.status_code in (401, 403):
        return [fail(GRAFANA_LOGIN, f"{r.request.url} answered {r.status_code} to the {_credential(s)}",
                     _login_fix(s)), skip(GRAFANA_DASHBOARDS, "needs a Grafana login")]
    found = json_body(r, "Grafana's search API", GRAFANA_URL_FIX)
    if r.status_code != 200 or not isinstance(found, list):
        return [login, fail(GRAFANA_DASHBOARDS, f"{r.request.url} answered {r.status_code}", GRAFANA_URL_FIX)]
    return [login, _dashboards(found)]


def _grafana_login(s: DoctorSettings, client: httpx.Client) -> Result:
    if s.grafana_token:
        # A token is judged by the search itself: nothing to log in to.
        return ok(GRAFANA_LOGIN, "service account token given")
    url = f"{s.grafana_url}/login"
    r = request(s, "POST", url, fix=GRAFANA_URL_FIX, client=client,
                json={"user": s.grafana_user, "password": s.grafana_password})
    if r.status_code == 200:
        return ok(GRAFANA_LOGIN, f"logged in as {s.grafana_user}")
    if r.status_code in (401, 403):
        return fail(GRAFANA_LOGIN, f"{url} refused user {s.grafana_user} ({r.status_code})", _login_fix(s))
    return fail(GRAFANA_LOGIN, f"{url} answered {r.status_code}", GRAFANA_URL_FIX)


def _credential(s: DoctorSettings) -> str:
    return "service account token" if s.grafana_token else f"session of {s.grafana_user}"


def _login_fix(s: DoctorSettings) -> str:
    if s.grafana_token:
        return "create a service account token (Administration > Service accounts) and give it as GRAFANA_TOKEN"
    # GF_SECURITY_ADMIN_PASSWORD only sets the password of a fresh Grafana database.
    return ("use the GRAFANA_ADMIN_USER and GRAFANA_ADMIN_PASSWORD Grafana first started with (it keeps the "
            "password in its volume), or reset it: `docker compose exec grafana grafana cli admin "
            "reset-admin-password ...`")


def _dashboards(found: list[Any]) -> Result:
    titles = {d.get("uid"): d.get("title") for d in found if isinstance(d, dict)}
    missing = [uid for uid in DASHBOARD_UIDS if uid not in titles]
    if missing:
        present = ", ".join(f"{uid}" for uid in titles) or "none"
        return fail(GRAFANA_DASHBOARDS, f"missing: {', '.join(missing)} (dashboards found: {present})",
                    DASHBOARDS_FIX)
    return ok(GRAFANA_DASHBOARDS, ", ".join(f"{titles[uid]} ({uid})" for uid in DASHBOARD_UIDS))


# -- Slack ---------------------------------------------------------------------------------------

TOKEN_FIX = ("copy the bot token (xoxb-...) of the Slack app installed in your workspace into SLACK_BOT_TOKEN; "
             "reinstalling the app issues a new one")


def slack(s: DoctorSettings) -> list[Result]:
    return [_bot_token(s), _webhook(s)]


def _bot_token(s: DoctorSettings) -> Result:
    name = "Slack bot token"
    if not s.slack_bot_token:
        return skip(name, "no SLACK_BOT_TOKEN given")
    base = s.slack_api_url or "https://slack.com/api/"
    client = WebClient(token=s.slack_bot_token, base_url=base if base.endswith("/") else base + "/",
                       timeout=s.timeout, retry_handlers=[], logger=_slack_log)  # type: ignore[arg-type]
    host = urlsplit(base).netloc
    try:
        answer = client.auth_test()
    except SlackApiError as exc:
        error = exc.response.get("error") if isinstance(exc.response.data, dict) else None
        detail = f"auth.test on {host} refused the token: {error or f'HTTP {exc.response.status_code}'}"
        return fail(name, detail, TOKEN_FIX)
    except Exception as exc:  # noqa: BLE001 - urllib's errors, whatever the transport says
        reason = describe(exc, s.timeout) if isinstance(exc, httpx.HTTPError) else f"{type(exc).__name__}: {exc}"
        return fail(name, f"cannot reach Slack's API on {host}: {reason}",
                    "allow HTTPS from this machine to Slack (or to SLACK_API_URL, if set)")
    return ok(name, f"valid (auth.test on {host}): team {answer.get('team')}, user {answer.get('user')}")


def _webhook(s: DoctorSettings) -> Result:
    name = "Slack webhook"
    if not s.slack_webhook_url:
        return skip(name, "no SLACK_WEBHOOK_URL given")
    try:
        validate_webhook_url(s.slack_webhook_url)
    except ValueError as exc:
        return fail(name, str(exc), "copy the URL from the Slack app's Incoming Webhooks page")
    host = urlsplit(s.slack_webhook_url).netloc
    return skip(name, f"not checked: a webhook can only be tested by posting (on {host})")

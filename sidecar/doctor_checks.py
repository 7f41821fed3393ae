"""The doctor's checks of the stack's own parts: nginx in front, the sidecar, Prometheus.

Each is judged the way an operator would from outside: what nginx answers with and
without the Flower login, what the sidecar's /health says, and what Prometheus's HTTP API
(`/api/v1/targets`, `/api/v1/rules`) reports. What Prometheus should have is read from the
package's own data: the scrape jobs of the prometheus.yml template render fills in, and
the rule groups of the shipped rules file.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import yaml

from celery_sidecar import resources
from celery_sidecar.doctor_model import CheckError, DoctorSettings, Result, fail, json_body, ok, request, skip

RENDER_AGAIN = ("run `docker compose -f docker-compose.monitoring.yml up -d` again (render writes nginx's config "
                "from the package) and restart nginx; do not edit the rendered nginx.conf")
UNREACHABLE_NGINX = ("start the stack (`docker compose -f docker-compose.monitoring.yml up -d`), or point "
                     "--nginx-url (NGINX_URL) at its published port")
# Refused without credentials: asked for them, the allow-list said no, or not served at all.
REFUSED = (401, 403, 404)
# Served only on the internal network: each must be refused through nginx without credentials.
INTERNAL_PATHS = ("/metrics", "/health", "/flower/metrics", "/prometheus/api/v1/status/buildinfo")


# -- nginx ---------------------------------------------------------------------------------------

def nginx_answers(s: DoctorSettings) -> list[Result]:
    name = "nginx answers"
    r = request(s, "GET", f"{s.nginx_url}/", fix=UNREACHABLE_NGINX)
    if r.status_code == 403:
        return [fail(name, f"{s.nginx_url}/ answered 403: nginx's allow-list refuses this machine",
                     "add this machine's network to ALLOW_CIDRS and run `docker compose ... up -d` again")]
    if r.status_code != 200:
        return [fail(name, f"{s.nginx_url}/ answered {r.status_code}, not the stack's index page",
                     "point --nginx-url (NGINX_URL) at the stack's published nginx port")]
    return [ok(name, f"{s.nginx_url}/ answered 200")]


def flower_login(s: DoctorSettings) -> list[Result]:
    url = f"{s.nginx_url}/flower/"
    without = request(s, "GET", url, fix=UNREACHABLE_NGINX)
    results = [_refused("Flower refuses requests without credentials", url, without.status_code, "Flower")]
    name = "Flower accepts the credentials"
    if s.flower_auth is None:
        return [*results, skip(name, "no FLOWER_USER and FLOWER_PASSWORD given")]
    code = request(s, "GET", url, fix=UNREACHABLE_NGINX, auth=s.flower_auth).status_code
    if code == 200:
        results.append(ok(name, f"{url} answered 200 for user {s.flower_user}"))
    elif code == 401:
        results.append(fail(name, f"{url} refused user {s.flower_user} (401)",
                            "use the FLOWER_USER and FLOWER_PASSWORD render was given (the htpasswd is "
                            "rendered from them), or change them and run `docker compose ... up -d` again"))
    else:
        results.append(fail(name, f"{url} answered {code} with the credentials", _upstream_fix(code, "flower")))
    return results


def _refused(name: str, url: str, code: int, service: str) -> Result:
    if code in (401, 403):
        return ok(name, f"{url} answered {code} without credentials")
    if code == 200:
        return fail(name, f"{url} answered 200 without credentials: {service} is open to anyone allowed "
                          "through nginx", RENDER_AGAIN)
    return fail(name, f"{url} answered {code} without credentials", _upstream_fix(code, service.lower()))


def _upstream_fix(code: int, service: str) -> str:
    if code in (502, 503, 504):
        return (f"nginx cannot reach {service}: start it (`docker compose ps {service}`; its log says why it "
                f"stopped) and check {service.upper()}_ADDR if render was given one")
    return "point --nginx-url (NGINX_URL) at the stack's nginx"


def internals_hidden(s: DoctorSettings) -> list[Result]:
    name = "nothing internal through nginx without credentials"
    answers = {path: request(s, "GET", s.nginx_url + path, fix=UNREACHABLE_NGINX).status_code
               for path in INTERNAL_PATHS}
    served = {path: code for path, code in answers.items() if code not in REFUSED}
    if served:
        listed = ", ".join(f"{path} answered {code}" for path, code in served.items())
        return [fail(name, f"{listed} without credentials", RENDER_AGAIN)]
    listed = ", ".join(f"{path} {code}" for path, code in answers.items())
    return [ok(name, listed)]


# -- the sidecar ---------------------------------------------------------------------------------

SIDECAR_CHECKS = ("sidecar /health", "sidecar config", "sidecar event stream")
BROKER_FIX = ("the sidecar cannot reach CELERY_BROKER_URL: check that the broker is up and reachable from the "
              "sidecar (its log names the cause); it reconnects by itself")
NO_EVENTS_FIX = ("start a worker on this broker (the same URL, database or vhost); workers send heartbeats "
                 "every 2 s even without -E, unless started with --without-heartbeat")


def sidecar(s: DoctorSettings) -> list[Result]:
    if not s.sidecar_url:
        why = "no --sidecar-url (SIDECAR_URL): the stack does not publish the sidecar; give its address"
        return [skip(name, why) for name in SIDECAR_CHECKS]
    url = f"{s.sidecar_url}/health"
    fix = "start the sidecar, or point --sidecar-url (SIDECAR_URL) at its address (SIDECAR_BIND, SIDECAR_PORT)"
    try:
        r = request(s, "GET", url, fix=fix)
        body = json_body(r, "the sidecar's /health", fix)
        if not isinstance(body, dict) or "broker" not in body:
            raise CheckError(f"{url} answered {r.status_code} without a broker status: not the sidecar's /health",
                             fix)
    except CheckError as exc:
        return [fail(SIDECAR_CHECKS[0], exc.detail, exc.fix),
                *(skip(name, "needs the sidecar's /health") for name in SIDECAR_CHECKS[1:])]
    return [_health(url, r.status_code, body), _config(body), _stream(body, s.max_event_age)]


def _health(url: str, code: int, body: dict[str, Any]) -> Result:
    name = SIDECAR_CHECKS[0]
    broker = body.get("broker") or {}
    status = str(body.get("status"))
    if code == 200:
        return ok(name, f"{status}: broker {broker.get('url')} connected ({broker.get('intake')})")
    detail = f"{url} answered {code}: {status}"
    if broker.get("last_error"):
        detail += f" ({broker.get('attempts')} attempts; last error: {broker['last_error']})"
    if status == "config reloader stopped":
        return fail(name, detail, "restart the sidecar; its log says why the config reloader stopped")
    return fail(name, detail, BROKER_FIX)


def _config(body: dict[str, Any]) -> Result:
    name = SIDECAR_CHECKS[1]
    config = body.get("config") or {}
    where = config.get("path") or "the documented defaults"
    if config.get("valid") is False:
        return fail(name, f"{where}: the last edit was refused ({config.get('error')}); the previous "
                          "thresholds stay live",
                    f"fix the file: `celery-sidecar config check {config.get('path') or 'FILE'}` names the key")
    return ok(name, f"valid ({where})")


def _stream(body: dict[str, Any], max_age: float) -> Result:
    name = SIDECAR_CHECKS[2]
    broker = body.get("broker") or {}
    age = body.get("last_event_age_seconds")
    consumed = (body.get("events") or {}).get("consumed")
    if not broker.get("connected"):
        return fail(name, "broker disconnected: no event can arrive", BROKER_FIX)
    if age is None:
        return fail(name, "no events yet: the broker is connected, but no worker has sent an event", NO_EVENTS_FIX)
    if age > max_age:
        return fail(name, f"the last event came {age:.0f} s ago (more than --max-event-age {max_age:g} s)",
                    NO_EVENTS_FIX)
    return ok(name, f"live: last event {age:.1f} s ago, {consumed} consumed")


def sidecar_exposure(s: DoctorSettings) -> list[Result]:
    name = "sidecar not on a public address"
    if not s.sidecar_url:
        return [skip(name, "no --sidecar-url (SIDECAR_URL)")]
    parts = urlsplit(s.sidecar_url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    fix = "check --sidecar-url (SIDECAR_URL)"
    try:
        given = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError as exc:
        raise CheckError(f"cannot resolve {host}: {exc}", fix) from None
    # From the machine it runs on, a sidecar bound to 0.0.0.0 also answers on the machine's
    # other addresses: those are what the rest of the network reaches.
    others = _own_addresses() - given if all(ipaddress.ip_address(a).is_loopback for a in given) else set()
    also = sorted(a for a in others if _accepts(a, port, s.timeout))
    scopes = {a: address_scope(a) for a in [*sorted(given), *also]}
    listed = ", ".join(f"{a} ({scopes[a]})" for a in sorted(given))
    if also:
        listed += f"; port {port} also answers on " + ", ".join(f"{a} ({scopes[a]})" for a in also)
    where = listed if given == {host} else f"{host} is {listed}"
    if "public" in scopes.values():
        return [fail(name, f"{where}: /metrics and /health are open to the internet",
                     "bind the sidecar to a loopback or private address (SIDECAR_BIND), or firewall the port; "
                     "the compose stack publishes no port for it")]
    return [ok(name, where)]


def address_scope(address: str) -> str:
    """'loopback', 'private' or 'public': who can reach a server listening there."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.is_loopback:
        return "loopback"
    if ip.is_global:
        return "public"
    return "private"  # RFC 1918, link-local, ULA, CGNAT: not routed on the internet


def _own_addresses() -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)
                if not ipaddress.ip_address(info[4][0].split("%", 1)[0]).is_loopback}
    except OSError:
        return set()


def _accepts(address: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=min(timeout, 2.0)):
            return True
    except OSError:
        return False


# -- Prometheus ----------------------------------------------------------------------------------

NO_PROMETHEUS = ("no --prometheus-url (PROMETHEUS_URL), and nginx does not route /prometheus/ "
                 "(ENABLE_PROMETHEUS_UI is off): Prometheus is internal")
TARGET_FIX = {
    "celery-sidecar": "start the sidecar (`docker compose ps sidecar`) and check that Prometheus reaches it "
                      "(SIDECAR_BIND=0.0.0.0 in its container; SIDECAR_ADDR for render)",
    "flower": "start Flower (`docker compose ps flower`; its log says why it stopped) and check that Prometheus "
              "reaches it (FLOWER_ADDR for render)",
}
RULES_FIX = ("render writes the rules to prometheus/rules/ next to prometheus.yml: check rule_files there "
             "(render --rules-path, PROMETHEUS_RULES_PATH) and that the file exists, then reload Prometheus")


@cache
def expected_jobs() -> tuple[str, ...]:
    """The scrape jobs of the prometheus.yml that render writes."""
    return tuple(re.findall(r"job_name:\s*([\w.-]+)", resources.read_text(resources.PROMETHEUS_TEMPLATE)))


@cache
def expected_rule_groups() -> tuple[str, ...]:
    """The groups of the shipped rules file that render copies next to prometheus.yml."""
    return tuple(g["name"] for g in yaml.safe_load(resources.read_text(resources.RULES))["groups"])


def _prometheus_api(s: DoctorSettings, path: str) -> dict[str, Any]:
    assert s.prometheus_url is not None
    fix = "point --prometheus-url (PROMETHEUS_URL) at Prometheus, with its path prefix (the stack's is /prometheus)"
    auth = s.flower_auth if s.prometheus_via_nginx else None
    r = request(s, "GET", f"{s.prometheus_url}/api/v1/{path}", fix=fix, auth=auth)
    if r.status_code == 401:
        raise CheckError(f"{r.request.url} answered 401", "give the Flower login (FLOWER_USER, FLOWER_PASSWORD): "
                                                          "nginx's /prometheus/ route asks for it")
    body = json_body(r, "Prometheus's API", fix)
    if not isinstance(body, dict) or body.get("status") != "success":
        raise CheckError(f"{r.request.url} answered {r.status_code}: not Prometheus's API", fix)
    return body["data"]


def prometheus_targets(s: DoctorSettings) -> list[Result]:
    if not s.prometheus_url:
        return [skip("Prometheus targets", NO_PROMETHEUS)]
    targets = _prometheus_api(s, "targets?state=active")["activeTargets"]
    by_job: dict[str, list[dict[str, Any]]] = {}
    for target in targets:
        by_job.setdefault(target.get("scrapePool") or target["labels"].get("job", "?"), []).append(target)
    jobs = [*expected_jobs(), *sorted(set(by_job) - set(expected_jobs()))]
    return [_target(job, by_job.get(job, [])) for job in jobs]


def _target(job: str, targets: list[dict[str, Any]]) -> Result:
    name = f"Prometheus target {job}"
    if not targets:
        return fail(name, f"Prometheus has no {job} job: it does not run the prometheus.yml render writes",
                    "start Prometheus with the rendered prometheus.yml (--config.file) and restart it")
    down = [t for t in targets if t.get("health") != "up"]
    if not down:
        return ok(name, "up: " + ", ".join(t["scrapeUrl"] for t in targets))
    t = down[0]
    if t.get("health") == "unknown":
        return fail(name, f"not scraped yet: {t['scrapeUrl']}", "wait one scrape interval (SCRAPE_INTERVAL), "
                                                                 "then run doctor again")
    return fail(name, f"{t.get('health')}: {t['scrapeUrl']}: {t.get('lastError') or 'no error given'}",
                TARGET_FIX.get(job, f"check that {job} runs and that Prometheus reaches {t['scrapeUrl']}"))


def prometheus_rules(s: DoctorSettings) -> list[Result]:
    name = "Prometheus rules"
    if not s.prometheus_url:
        return [skip(name, NO_PROMETHEUS)]
    groups = _prometheus_api(s, "rules")["groups"]
    loaded = {g["name"]: g for g in groups}
    missing = [g for g in expected_rule_groups() if g not in loaded]
    if missing:
        return [fail(name, f"not loaded: {', '.join(missing)} (loaded: {', '.join(loaded) or 'none'})", RULES_FIX)]
    broken = [(r.get("name"), r.get("lastError")) for g in expected_rule_groups()
              for r in loaded[g]["rules"] if r.get("health") == "err"]
    if broken:
        listed = "; ".join(f"{rule}: {error}" for rule, error in broken)
        return [fail(name, f"{len(broken)} rule(s) fail to evaluate: {listed}",
                     "check the rendered rules with `promtool check rules` and that the sidecar is scraped")]
    count = sum(len(loaded[g]["rules"]) for g in expected_rule_groups())
    return [ok(name, f"{', '.join(expected_rule_groups())} loaded ({count} rules)")]

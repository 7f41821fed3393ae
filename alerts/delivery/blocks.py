"""Alert -> Slack message (Block Kit + text fallback) and the console's plain text.

Messages come from jinja2 templates in alerts/delivery/templates/: ``<kind>.json.j2`` renders a JSON
list of blocks (``default.json.j2`` when the kind has none) and ``<kind>.txt.j2`` /
``default.txt.j2`` the plain text used as Slack's ``text`` fallback and by the console.
A file of the same name in the configured templates dir wins over the shipped one.

Templates get ``alert``, ``icon`` and ``status_label``, the filters ``mrkdwn`` (escape for
Slack), ``json`` (encode a JSON string), ``cut_middle("slack"|"console")`` (a traceback cut to
that budget by alerts/delivery/cutting.py: its end kept, its middle cut) and ``head_lines(n)``,
and ``link(url, label)``.
Whatever they produce is then cut to Block Kit's limits here, so an operator's template
cannot push a message over them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from celery_sidecar.alerts.delivery.cutting import CONSOLE, SLACK, cut_middle
from celery_sidecar.alerts.model import Alert, Severity, Status
from celery_sidecar.monitor.config.alert_rules import AlertsConfig
from celery_sidecar.monitor.config.settings import LiveConfig

log = logging.getLogger(__name__)

KNOWN_KINDS = (
    "task_failed",
    "failure_summary",
    "worker_offline",
    "worker_online",
    "worker_shutdown",
    "threshold",
    "task_stuck",
    "tasks_lost",
    "task_redelivered",
    "beat_missed",
    "beat_down",
)

MAX_BLOCKS = 50
MAX_SECTION_TEXT = 3000
MAX_HEADER_TEXT = 150
MAX_FIELD_TEXT = 2000
MAX_FIELDS = 10
MAX_CONTEXT_ELEMENTS = 10
MAX_FALLBACK_TEXT = 3000
ELLIPSIS = "…"

_ICONS = {
    ("firing", "critical"): ":rotating_light:",
    ("firing", "warning"): ":warning:",
    ("firing", "info"): ":information_source:",
    ("info", "critical"): ":rotating_light:",
    ("info", "warning"): ":warning:",
    ("info", "info"): ":information_source:",
}
_RESOLVED_ICON = ":white_check_mark:"


class TemplateRenderError(ValueError):
    """A template that fails to render or renders something that is not a block list."""


@dataclass(frozen=True)
class Message:
    text: str  # Slack's top-level text: notifications, screen readers, and where mentions go
    blocks: list[dict[str, Any]]
    plain: str  # unescaped plain text, for the console
    severity: Severity
    status: Status = "firing"


def mrkdwn_escape(value: object) -> str:
    # Slack's mrkdwn treats these three as control characters; everything else is literal.
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def head_lines(value: object, count: int = 10) -> str:
    lines = str(value).rstrip("\n").splitlines()
    if len(lines) <= count:
        return "\n".join(lines)
    return "\n".join([*lines[:count], ELLIPSIS])


_BUDGETS = {"slack": SLACK, "console": CONSOLE}


def cut_middle_filter(value: object, budget: str = "slack") -> str:
    """The template filter: ``alert.traceback | mrkdwn | cut_middle("slack")``."""
    if budget not in _BUDGETS:
        raise jinja2.FilterArgumentError(f"cut_middle: budget must be one of {sorted(_BUDGETS)}, got {budget!r}")
    return cut_middle(str(value), _BUDGETS[budget])


def slack_link(url: str, label: str) -> str:
    return f"<{url.replace('|', '%7C').replace('>', '%3E')}|{mrkdwn_escape(label)}>"


def trim(text: str, limit: int) -> str:
    """Cut to `limit` characters with an ellipsis, closing a ``` code block the cut left open."""
    if len(text) <= limit:
        return text
    cut = text[: limit - len(ELLIPSIS)]
    if cut.count("```") % 2 == 1:
        cut = text[: limit - len(ELLIPSIS) - 4] + ELLIPSIS + "\n```"
        return cut
    return cut + ELLIPSIS


def sample_alert(kind: str, status: str = "firing") -> Alert:
    """An alert with every field set, to prove a template renders."""
    return Alert(
        key=f"sample:{kind}:{status}",
        group=f"sample:{kind}",
        kind=kind,
        status=status,  # type: ignore[arg-type]
        severity="critical",
        title="Sample <alert> & title",
        text="Something happened to *sample* task `app.tasks.sample`",
        fields={"task": "app.tasks.sample", "worker": "celery@host", "args": "(1, 'a<b>')"},
        task_name="app.tasks.sample",
        traceback='Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom',
        link="https://flower.example.com/task/00000000-0000-0000-0000-000000000000",
        created_at=0.0,
        dashboard="https://grafana.example.com/d/celery-sidecar-task?var-task=app.tasks.sample",
    )


class MessageRenderer:
    """Renders alerts with the shipped templates, overridden by files in `templates_dir`."""

    def __init__(self, templates_dir: Path | None = None) -> None:
        # The shipped templates are package data: read through the import system, so they are
        # found wherever the package is installed (a wheel, a zip, an editable checkout).
        loaders: list[jinja2.BaseLoader] = [jinja2.PackageLoader("celery_sidecar.alerts.delivery", "templates")]
        if templates_dir is not None:
            loaders.insert(0, jinja2.FileSystemLoader(str(templates_dir)))
        self._templates_dir = templates_dir
        self._env = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._env.filters.update(mrkdwn=mrkdwn_escape, json=_json_string, head_lines=head_lines,
                                 cut_middle=cut_middle_filter)
        self._env.globals["link"] = slack_link

    def message(self, alert: Alert, mention: str | None = None) -> Message:
        """The Slack message; `mention` goes first in the text and in the first section."""
        plain = self.plain(alert)
        blocks = self._blocks(alert)
        text = trim(mrkdwn_escape(plain), MAX_FALLBACK_TEXT)
        if mention:
            text = f"{mention} {text}"
            blocks = _with_mention(blocks, mention)
        return Message(text=text, blocks=fit_blocks(blocks), plain=plain, severity=alert.severity,
                       status=alert.status)

    def plain(self, alert: Alert) -> str:
        """Plain text: the console's words and Slack's fallback text."""
        template = self._select(alert.kind, "txt")
        try:
            return template.render(self._context(alert)).strip()
        except jinja2.TemplateError as exc:
            raise _template_error(template.name, exc) from exc

    def check(self) -> None:
        """Render every template (shipped, and the operator's) for a firing and a resolved sample."""
        kinds = set(KNOWN_KINDS)
        if self._templates_dir is not None:
            kinds.update(p.name.split(".", 1)[0] for p in self._templates_dir.glob("*.j2"))
        kinds.discard("default")
        for kind in [*sorted(kinds), "default"]:
            for status in ("firing", "resolved"):
                self.message(sample_alert(kind, status), mention="<!here>")

    def _blocks(self, alert: Alert) -> list[dict[str, Any]]:
        template = self._select(alert.kind, "json")
        try:
            rendered = template.render(self._context(alert))
        except jinja2.TemplateError as exc:
            raise _template_error(template.name, exc) from exc
        try:
            blocks = json.loads(rendered)
        except json.JSONDecodeError as exc:
            raise TemplateRenderError(
                f"template {template.name!r} did not render valid JSON ({exc.msg} at line {exc.lineno}, "
                f"column {exc.colno}); use the |json filter for values"
            ) from None
        _check_block_list(blocks, template.name or "?")
        return blocks

    def _select(self, kind: str, suffix: str) -> jinja2.Template:
        try:
            return self._env.select_template([f"{kind}.{suffix}.j2", f"default.{suffix}.j2"])
        except jinja2.TemplateSyntaxError as exc:
            raise _template_error(None, exc) from exc

    @staticmethod
    def _context(alert: Alert) -> dict[str, Any]:
        icon = _RESOLVED_ICON if alert.status == "resolved" else _ICONS[(alert.status, alert.severity)]
        return {"alert": alert, "icon": icon, "status_label": alert.status.upper()}


class LiveMessages:
    """Messages rendered with the alerts config in force: its templates dir and its mention.
    The renderer is rebuilt only when a reload swapped the config."""

    def __init__(self, config: LiveConfig) -> None:
        self._live = config
        self._cfg = config.current.alerts
        self._renderer = MessageRenderer(self._cfg.templates_dir)

    @property
    def cfg(self) -> AlertsConfig:
        cfg = self._live.current.alerts
        if cfg is not self._cfg:
            self._cfg, self._renderer = cfg, MessageRenderer(cfg.templates_dir)
        return cfg

    def message(self, alert: Alert) -> Message:
        cfg = self.cfg
        mention = cfg.mention if alert.severity == "critical" and alert.status == "firing" else None
        try:
            return self._renderer.message(alert, mention)
        except TemplateRenderError as exc:
            # Reloads refuse a template that does not render, so this is one alert's data
            # tripping a template: it still goes out, in plain words.
            log.warning("%s; sending alert %s without the template", exc, alert.key)
            return fallback_message(alert, mention)


def check_templates(cfg: AlertsConfig) -> None:
    """Render every template with a sample alert; raise ValueError naming a broken one."""
    MessageRenderer(cfg.templates_dir).check()


def fallback_message(alert: Alert, mention: str | None = None) -> Message:
    """A message built without templates, for when an operator's template breaks at runtime."""
    plain = f"[{alert.severity.upper()}] {alert.status}: {alert.title}\n{alert.text}"
    text = trim(mrkdwn_escape(plain), MAX_SECTION_TEXT - 200)
    if mention:
        text = f"{mention} {text}"
    section = {"type": "section", "text": {"type": "mrkdwn", "text": text}}
    return Message(text=text, blocks=[section], plain=plain, severity=alert.severity, status=alert.status)


def fit_blocks(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cut blocks to Block Kit's limits: text lengths, fields per section, blocks per message."""
    fitted: list[dict[str, Any]] = []
    for block in blocks:
        fitted.extend(_fit_block(block))
    if len(fitted) > MAX_BLOCKS:
        omitted = len(fitted) - (MAX_BLOCKS - 1)
        note = {
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": f"{ELLIPSIS} {omitted} more blocks"}],
        }
        fitted = [*fitted[: MAX_BLOCKS - 1], note]
    return fitted


def _fit_block(block: dict[str, Any]) -> list[dict[str, Any]]:
    kind = block["type"]
    if kind == "header":
        text = block.get("text", {}).get("text", "")
        if not text.strip():
            return []
        return [{**block, "text": {**block["text"], "text": trim(text, MAX_HEADER_TEXT)}}]
    if kind == "section":
        return _fit_section(block)
    if kind == "context":
        elements = [_trim_text_object(e, MAX_SECTION_TEXT) for e in block.get("elements", [])][:MAX_CONTEXT_ELEMENTS]
        return [{**block, "elements": elements}] if elements else []
    return [block]


def _fit_section(block: dict[str, Any]) -> list[dict[str, Any]]:
    text = block.get("text")
    fields = [_trim_text_object(f, MAX_FIELD_TEXT) for f in block.get("fields", []) if f.get("text")]
    if text is not None and not text.get("text", "").strip():
        text = None  # Slack refuses an empty text object
    if text is None and not fields:
        return []
    first = {k: v for k, v in block.items() if k not in ("text", "fields")}
    if text is not None:
        first["text"] = _trim_text_object(text, MAX_SECTION_TEXT)
    if fields:
        first["fields"] = fields[:MAX_FIELDS]
    # More than ten fields: carry on in further sections rather than lose them.
    rest = [
        {"type": "section", "fields": fields[i : i + MAX_FIELDS]} for i in range(MAX_FIELDS, len(fields), MAX_FIELDS)
    ]
    return [first, *rest]


def _trim_text_object(obj: dict[str, Any], limit: int) -> dict[str, Any]:
    if isinstance(obj.get("text"), str):
        return {**obj, "text": trim(obj["text"], limit)}
    return obj


def _with_mention(blocks: list[dict[str, Any]], mention: str) -> list[dict[str, Any]]:
    for index, block in enumerate(blocks):
        text = block.get("text") if block.get("type") == "section" else None
        if text and text.get("type") == "mrkdwn":
            updated = {**block, "text": {**text, "text": f"{mention} {text['text']}"}}
            return [*blocks[:index], updated, *blocks[index + 1 :]]
    position = 1 if blocks and blocks[0].get("type") == "header" else 0
    mention_block = {"type": "section", "text": {"type": "mrkdwn", "text": mention}}
    return [*blocks[:position], mention_block, *blocks[position:]]


def _check_block_list(blocks: Any, name: str) -> None:
    if not isinstance(blocks, list) or not blocks:
        raise TemplateRenderError(f"template {name!r} must render a non-empty JSON list of blocks")
    for index, block in enumerate(blocks):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise TemplateRenderError(f"template {name!r}: block {index} is not an object with a 'type'")
        if "text" in block and not isinstance(block["text"], dict):
            raise TemplateRenderError(f"template {name!r}: block {index} 'text' must be a text object")


def _template_error(name: str | None, exc: jinja2.TemplateError) -> TemplateRenderError:
    if isinstance(exc, jinja2.TemplateSyntaxError):
        # The broken file may be a parent that `name` extends: name both.
        via = f" (used by {name!r})" if name and name != exc.name else ""
        return TemplateRenderError(f"template {exc.name!r}{via} has a syntax error at line {exc.lineno}: {exc.message}")
    return TemplateRenderError(f"template {name!r} failed to render: {exc}")


def _json_string(value: object) -> str:
    return json.dumps(str(value), ensure_ascii=False)

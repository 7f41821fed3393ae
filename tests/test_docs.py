"""The docs describe the code as it is: generated tables are current, reference tables match the
constants they restate, and every link and named file exists.

The metrics and alert tables are written by scripts/generate (tests/support/doc_tables.py);
the README's threshold table is checked in tests/test_signals.py.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

from celery_sidecar.monitor.boundary import parse
from celery_sidecar.monitor.config.settings import Config
from celery_sidecar.monitor.intake.event_queue import EventQueue
from tests.support import doc_tables
from tests.support.paths import SOURCE, package_file

DOCS = sorted((SOURCE / "docs").glob("*.md"))
PAGES = [SOURCE / "README.md", *DOCS]
RULES = package_file("alerts/prometheus/rules.yml").read_text()


def page_id(path: Path) -> str:
    return str(path.relative_to(SOURCE))


def table_names(block: str) -> list[str]:
    """The first column of every row of the markdown tables in ``block``, without backticks."""
    return [m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", block, re.MULTILINE)]


# -- generated tables ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_doc() -> str:
    return (SOURCE / "docs" / "metrics.md").read_text()


def test_the_metrics_table_is_what_the_exporters_serve(metrics_doc):
    block = doc_tables.between(metrics_doc, doc_tables.METRICS_START, doc_tables.METRICS_END)
    assert block == doc_tables.metrics_markdown(), "docs/metrics.md is stale: run scripts/generate"


def test_every_family_the_exporters_define_is_in_the_metrics_table(metrics_doc):
    """Also the families the example state of the generator might not make appear: every
    metric name the exporters and the alert delivery define, read from their source."""
    listed = set(table_names(doc_tables.between(metrics_doc, doc_tables.METRICS_START, doc_tables.METRICS_END)))
    served = {f.name for f in doc_tables.served_families(doc_tables.COMPAT)}
    assert served - listed == set(), f"served by /metrics, missing from docs/metrics.md: {served - listed}"
    defined = set()
    for package in ("celery_sidecar.exporters", "celery_sidecar.alerts"):
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.origin
        for path in Path(spec.origin).parent.rglob("*.py"):
            defined |= metric_names(path)
    assert len(defined) > 40, defined
    missing = {name for name in defined if name not in listed and f"{name}_total" not in listed}
    assert missing == set(), f"defined in the exporters, missing from docs/metrics.md: {missing}"


def metric_names(path: Path) -> set[str]:
    """String constants that are whole metric names (parts of f-strings are not)."""
    tree = ast.parse(path.read_text(), str(path))
    in_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in in_fstrings
            and re.fullmatch(r"celery_[a-z][a-z0-9_]*[a-z0-9]", node.value)}


def test_the_alert_table_is_generated_from_the_rules():
    doc = (SOURCE / "docs" / "alert-rules.md").read_text()
    block = doc_tables.between(doc, doc_tables.ALERTS_START, doc_tables.ALERTS_END)
    assert block == doc_tables.alerts_markdown(RULES), "docs/alert-rules.md is stale: run scripts/generate"


def test_the_alert_rules_page_explains_every_rule_of_the_file():
    doc = (SOURCE / "docs" / "alert-rules.md").read_text()
    explained = re.findall(r"^- \*\*(\w+)\*\*:", doc, re.MULTILINE)
    alerts = [rule["alert"] for rule in doc_tables.alerting_rules(RULES)]
    assert explained == alerts, "docs/alert-rules.md's list of what fires each alert differs from rules.yml"
    recording = doc.split("## Recording rules", 1)[1].split("\n## ", 1)[0]
    assert table_names(recording) == doc_tables.recording_rules(RULES)


# -- hand-written tables that restate constants ----------------------------------------------


def test_the_bad_input_table_matches_the_boundary():
    doc = (SOURCE / "docs" / "bad-input.md").read_text()
    rows = re.findall(r"^\| (`[^|]+`) \|", doc, re.MULTILINE)
    reasons = [r for row in rows for r in re.findall(r"`(\w+)`", row)]
    assert sorted(reasons) == sorted(parse.REASONS)
    assert f"a label over {parse.MAX_LABEL} characters" in doc
    assert f"more than {parse.MAX_SKEW / 86400:g} days from its receipt" in doc
    assert f"cut to {parse.MAX_TEXT // 1024} KB" in doc


def test_the_burst_buffer_defaults_are_the_event_queues():
    doc = (SOURCE / "docs" / "rabbitmq.md").read_text()
    defaults = EventQueue()
    row = {flag: line for line in doc.splitlines() for flag in ("ttl", "max-bytes", "expires")
           if f"`--event-queue-{flag}`" in line}
    assert row["ttl"].split("|")[-2].strip() == f"{defaults.ttl_seconds:g} s"
    assert row["max-bytes"].split("|")[-2].strip().startswith(f"{defaults.max_bytes >> 30} GiB")
    assert row["expires"].split("|")[-2].strip() == f"{defaults.expires_seconds:g} s"


CONFIG_KEY = re.compile(r"\b((?:thresholds|state|cardinality)\.[a-z_]+)\b")


@pytest.mark.parametrize("page", [SOURCE / "README.md", SOURCE / "docs" / "metrics.md"], ids=page_id)
def test_the_config_keys_a_page_names_exist(page):
    """`state.max_tasks` in a HELP text or the README is a key of sidecar.yml."""
    named = set(CONFIG_KEY.findall(page.read_text()))
    assert named, "no config key named: the pattern is wrong"
    missing = []
    for key in sorted(named):
        section, field = key.split(".")
        if field not in type(getattr(Config(), section)).model_fields:
            missing.append(key)
    assert missing == [], f"{page_id(page)} names config keys that do not exist: {missing}"


# -- links and named files -------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    found: set[str] = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            n, unique = 0, slug
            while unique in found:
                n += 1
                unique = f"{slug}-{n}"
            found.add(unique)
    found |= set(re.findall(r"""<a\s+(?:id|name)=["']([^"']+)["']""", path.read_text()))
    return found


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_resolves(page):
    dead = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            dead.append(target)
    assert dead == [], f"{page_id(page)} links to what does not exist: {dead}"


NAMED_FILE = re.compile(
    r"(?<![\w/.-])((?:monitor|exporters|alerts|sidecar|grafana|nginx|config|scripts|tests|docs)/[\w/.-]*\w)")
PLACEHOLDERS = {"tests/test_x.py"}  # README: "python -m pytest tests/test_x.py"


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "architecture.md"], ids=page_id)
def test_every_file_a_page_names_exists(page):
    """A path in the text (`monitor/boundary/parse.py`) names a file of the checkout
    (docs/architecture.md has its own test in tests/test_architecture.py)."""
    text = FENCE.sub("", page.read_text())
    named = {m for m in NAMED_FILE.findall(text) if "." in m.rsplit("/", 1)[-1]} - PLACEHOLDERS
    missing = sorted(p for p in named if not (SOURCE / p).exists() and not (page.parent / p).exists())
    assert missing == [], f"{page_id(page)} names files that do not exist: {missing}"


def source_files() -> list[Path]:
    folders = ("monitor", "exporters", "alerts", "sidecar", "grafana", "nginx", "config", "scripts")
    files = [p for folder in folders for p in (SOURCE / folder).rglob("*")
             if p.is_file() and p.suffix in (".py", ".yml", ".j2", "") and "__pycache__" not in p.parts]
    return [*files, SOURCE / "Dockerfile", SOURCE / "docker-compose.monitoring.yml", SOURCE / "pyproject.toml"]


def test_the_docs_the_code_points_to_exist():
    pointers = {(page_id(path), doc) for path in source_files()
                for doc in re.findall(r"\bdocs/[\w.-]+\.md\b", path.read_text(errors="replace"))}
    assert pointers, "no code names a doc page: the pattern is wrong"
    dead = sorted((where, doc) for where, doc in pointers if not (SOURCE / doc).exists())
    assert dead == [], f"the code points to doc pages that do not exist: {dead}"


# -- no lab diary ----------------------------------------------------------------------------

DIARY = re.compile(r"session [0-9]|issue [0-9]+|slow day|fast day", re.IGNORECASE)


def test_docs_and_comments_describe_the_product_not_its_history():
    """Sessions, issue numbers and what happened on which day belong in git, not in the docs."""
    found = [f"{page_id(path)}:{n}: {line.strip()}" for path in [*PAGES, *source_files()]
             for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if DIARY.search(line)]
    assert found == []

"""The one cutting rule for tracebacks (alerts/delivery/cutting.py): the end is kept, the start
if room allows, the middle replaced by a marker that counts what went, within the budget.

tests/test_alerts_e2e.py shows it on a real worker's traceback in Slack and in the console.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from celery_sidecar.alerts.delivery.blocks import MAX_SECTION_TEXT, MessageRenderer
from celery_sidecar.alerts.delivery.cutting import CONSOLE, SLACK, Budget, cut_middle
from celery_sidecar.alerts.model import Alert

MARKER = re.compile(r"^… (\d+) lines? cut …$")


def traceback(frames: int, exception: str = "KeyError: 'customer_id'") -> str:
    lines = ["Traceback (most recent call last):"]
    for i in range(frames):
        lines += [f'  File "/app/module_{i}.py", line {i + 1}, in step_{i}', f"    return step_{i + 1}(record)"]
    lines[-1] = '    raise KeyError("customer_id")'
    return "\n".join([*lines, exception])


def test_a_deep_traceback_keeps_its_raising_frame_and_exception_and_says_what_it_cut():
    text = traceback(40)
    cut = cut_middle(text, CONSOLE).splitlines()
    assert cut[-3:] == ['  File "/app/module_39.py", line 40, in step_39', '    raise KeyError("customer_id")',
                        "KeyError: 'customer_id'"]
    assert cut[0] == "Traceback (most recent call last):"
    [marker] = [line for line in cut if MARKER.match(line)]
    assert int(MARKER.match(marker)[1]) == len(text.splitlines()) - (len(cut) - 1)
    assert len(cut) <= CONSOLE.lines


def test_the_kept_end_starts_on_a_frame():
    cut = cut_middle(traceback(40), Budget(lines=8, chars=2000)).splitlines()
    tail = cut[cut.index(next(line for line in cut if MARKER.match(line))) + 1:]
    assert tail[0].startswith('  File "'), cut


def test_a_short_traceback_is_left_whole():
    assert cut_middle(traceback(3), SLACK) == traceback(3)


def test_a_huge_exception_line_is_clipped_not_lost():
    cut = cut_middle(traceback(30, exception="ValueError: " + "x" * 100_000), SLACK)
    assert len(cut) <= SLACK.chars
    assert cut.splitlines()[-1].startswith("ValueError: xxx") and cut.endswith("…")
    assert '    raise KeyError("customer_id")' in cut


def test_slack_renders_the_end_of_the_traceback_within_a_section():
    alert = Alert(key="k", group="g", kind="task_failed", status="firing", severity="critical", title="t",
                  text="", traceback=traceback(500) + " & <b>")
    message = MessageRenderer().message(alert, mention="<!subteam^S0123ABC|oncall>")
    [code] = [b["text"]["text"] for b in message.blocks if "```" in b.get("text", {}).get("text", "")]
    assert code.endswith("KeyError: 'customer_id' &amp; &lt;b&gt;```"), code[-200:]
    assert len(code) <= MAX_SECTION_TEXT
    console = MessageRenderer().plain(alert)
    assert console.endswith("KeyError: 'customer_id' & <b>")


@given(
    lines=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x0b\x0c"
                                                                         "\x1c\x1d\x1e\x85\u2028\u2029"),
                           max_size=300), min_size=1, max_size=200),
    budget=st.builds(Budget, lines=st.integers(2, 60), chars=st.integers(60, 4000)),
)
def test_any_text_fits_its_budget_and_keeps_its_last_line(lines, budget):
    text = "\n".join(lines)
    cut = cut_middle(text, budget)
    kept = cut.splitlines() if cut else [""]
    assert len(kept) <= budget.lines and len(cut) <= budget.chars
    original = text.rstrip("\n").splitlines()
    markers = [line for line in kept if MARKER.match(line)]
    if markers:
        assert len(markers) == 1
        assert int(MARKER.match(markers[0])[1]) == len(original) - (len(kept) - 1)
        last = original[-1]
        assert kept[-1] == last or (kept[-1].endswith("…") and last.startswith(kept[-1][:-1]))

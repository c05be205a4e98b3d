"""The suite's bookkeeping: every scenario has a test, and the report renders results."""

from __future__ import annotations

import re
from pathlib import Path

from tests.reliability.report import KEEP_MARKER, compose, merge, render
from tests.reliability.scenarios import AREAS, SCENARIOS

TESTS = Path(__file__).resolve().parents[1]
_CLAIM = re.compile(r"mark\.scenario\(([^)]*)\)")


def claimed_ids() -> set[str]:
    ids: set[str] = set()
    for path in TESTS.rglob("test_*.py"):
        for args in _CLAIM.findall(path.read_text()):
            ids.update(re.findall(r"\"([a-z0-9.\-]+)\"", args))
    return ids


def test_every_scenario_is_claimed_by_a_test() -> None:
    missing = sorted({s.id for s in SCENARIOS} - claimed_ids())
    assert not missing, f"scenarios with no test: {missing}"


def test_scenarios_are_unique_and_in_known_areas() -> None:
    ids = [s.id for s in SCENARIOS]
    assert len(ids) == len(set(ids))
    assert {s.area for s in SCENARIOS} <= set(AREAS)


def test_report_keeps_soak_results_when_the_soak_was_skipped() -> None:
    soak = {"nodeid": "t::soak", "scenarios": ["endurance.soak"], "outcome": "passed",
            "duration": 1.0, "detail": "", "properties": {"rss_growth_mb": 1.5}}
    first = merge({}, {"finished": "day 1", "results": [soak]})
    skipped = dict(soak, outcome="skipped", detail="long soak: run with --soak")
    failed = {"nodeid": "t::quick", "scenarios": ["endurance.quick"], "outcome": "failed",
              "duration": 1.0, "detail": "AssertionError: grew", "properties": {}}
    second = merge(first, {"finished": "day 2", "results": [skipped, failed]})
    assert second["scenarios"]["endurance.soak"]["when"] == "day 1"
    text = render(second)
    assert "rss_growth_mb=1.5" in text
    assert "**0/1 passed** (failed: AssertionError: grew)" in text
    assert "not run yet" in text  # every other scenario


def test_the_hand_written_tail_of_the_doc_survives_a_new_report() -> None:
    old = f"# old table\n\n{KEEP_MARKER}\n\n## Findings\nby hand\n"
    new = compose("# new table\n", old)
    assert new.startswith("# new table\n") and "old table" not in new
    assert new.endswith(f"{KEEP_MARKER}\n\n## Findings\nby hand\n")
    assert compose("# new\n", "# no marker\n") == "# new\n"

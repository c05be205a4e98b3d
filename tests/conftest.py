"""Suite-wide pytest plumbing: the reliability scenarios and the long soak.

- ``@pytest.mark.scenario("<id>", ...)`` ties a test to scenarios of
  ``tests/reliability/scenarios.py``; an unknown id fails collection.
- ``@pytest.mark.soak`` tests are skipped unless ``--soak`` is given.
- ``--scenario-report FILE`` writes every scenario test's outcome, duration and
  ``record_property`` values as JSON, for ``python -m tests.reliability.report``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.scenarios import BY_ID

_RESULTS = pytest.StashKey[dict[str, dict[str, Any]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true",
                     help="also run the long soak tests (marked soak)")
    parser.addoption("--scenario-report", metavar="FILE",
                     help="write the reliability scenarios' results to FILE (JSON)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "scenario(*ids): claims reliability scenarios "
                            "(tests/reliability/scenarios.py)")
    config.stash[_RESULTS] = {}


def _scenario_ids(item: pytest.Item) -> list[str]:
    return [i for mark in item.iter_markers("scenario") for i in mark.args]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unknown = sorted({f"{item.nodeid}: {i!r}" for item in items for i in _scenario_ids(item)
                      if i not in BY_ID})
    if unknown:
        raise pytest.UsageError("unknown reliability scenario ids (add them to "
                                "tests/reliability/scenarios.py): " + ", ".join(unknown))
    if not config.getoption("--soak"):
        skip = pytest.mark.skip(reason="long soak: run with --soak")
        for item in items:
            if item.get_closest_marker("soak") is not None:
                item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Any:
    report: pytest.TestReport = yield
    ids = _scenario_ids(item)
    if not ids:
        return report
    results = item.config.stash[_RESULTS]
    entry = results.setdefault(item.nodeid, {"nodeid": item.nodeid, "scenarios": ids,
                                             "outcome": "passed", "duration": 0.0,
                                             "detail": "", "properties": {}})
    entry["duration"] += report.duration
    entry["properties"].update({str(k): v for k, v in report.user_properties})
    if report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        if isinstance(report.longrepr, tuple):
            entry["detail"] = str(report.longrepr[2])
    elif report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
        entry["detail"] = (report.longreprtext.strip().splitlines() or [""])[-1][:300]
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = session.config.getoption("--scenario-report")
    if not target:
        return
    document = {"finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "results": list(session.config.stash[_RESULTS].values())}
    Path(target).write_text(json.dumps(document, indent=1, default=str) + "\n")

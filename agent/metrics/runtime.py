"""The agent process's own health, read at scrape time: asyncio tasks and OS threads.

``prometheus_client``'s ``ProcessCollector`` already gives resident memory and open file
descriptors; these two complete what a leak shows up in. A task that is never awaited or
cancelled, or a thread that is never joined, grows these gauges without bound, so the
endurance suite (tests/reliability/test_endurance.py) and an alert can see it from
outside the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

__all__ = ["RuntimeCollector", "os_threads"]

PREFIX = "spiffe_delegate_"


def os_threads(stat_path: Path = Path("/proc/self/stat")) -> int | None:
    """The process's OS threads (field 20 of /proc/<pid>/stat: gRPC's C threads too, which
    ``threading`` does not see); None where there is no /proc."""
    try:
        text = stat_path.read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    fields = text[text.rfind(")") + 2:].split()
    try:
        return int(fields[17])
    except (IndexError, ValueError):
        return None


class RuntimeCollector:
    """``spiffe_delegate_asyncio_tasks`` and ``spiffe_delegate_threads``.

    Tasks are counted on the event loop running the scrape (the agent renders /metrics on
    its loop); a scrape from outside any loop (a test rendering a registry directly) has no
    task sample. ``stat_path`` is injectable for tests."""

    def __init__(self, stat_path: Path = Path("/proc/self/stat")) -> None:
        self._stat_path = stat_path

    def describe(self) -> Iterator[Metric]:
        yield from self._families(sample=False)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(sample=True)

    def _families(self, *, sample: bool) -> Iterator[Metric]:
        tasks = GaugeMetricFamily(
            PREFIX + "asyncio_tasks",
            "asyncio tasks not yet done on the agent's event loop (the scrape's own included)")
        threads = GaugeMetricFamily(
            PREFIX + "threads", "OS threads of the agent process (gRPC's included)")
        if sample:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                tasks.add_metric([], len(asyncio.all_tasks(loop)))
            count = os_threads(self._stat_path)
            if count is not None:
                threads.add_metric([], count)
        yield tasks
        yield threads

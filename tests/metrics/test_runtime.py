"""The process's own gauges: asyncio tasks on the scraping loop, and OS threads."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry

from agent.metrics import RuntimeCollector
from agent.metrics.runtime import os_threads
from tests.metrics.labels import scrape


def registry() -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=True)
    reg.register(RuntimeCollector())
    return reg


async def test_tasks_are_counted_on_the_running_loop_and_a_leaked_one_shows() -> None:
    reg = registry()
    before = scrape(reg).value("spiffe_delegate_asyncio_tasks")
    assert before >= 1  # this test's own task
    stop = asyncio.Event()
    leaked = [asyncio.create_task(stop.wait()) for _ in range(3)]
    assert scrape(reg).value("spiffe_delegate_asyncio_tasks") == before + 3
    stop.set()
    await asyncio.gather(*leaked)
    assert scrape(reg).value("spiffe_delegate_asyncio_tasks") == before


def test_no_task_sample_outside_a_loop() -> None:
    result = scrape(registry())
    assert result.samples("spiffe_delegate_asyncio_tasks") == []
    assert result.value("spiffe_delegate_threads") >= 1


def test_threads_are_os_threads_and_a_new_one_shows() -> None:
    reg = registry()
    before = scrape(reg).value("spiffe_delegate_threads")
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert scrape(reg).value("spiffe_delegate_threads") == before + 1
    finally:
        stop.set()
        thread.join()


def test_stat_parsing_copes_with_odd_command_names(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    rest = " ".join(["S"] + ["0"] * 16 + ["7"] + ["0"] * 30)
    stat.write_text(f"123 (we ird) (x) {rest}\n")
    assert os_threads(stat) == 7
    assert os_threads(tmp_path / "missing") is None
    stat.write_text("garbage")
    assert os_threads(stat) is None

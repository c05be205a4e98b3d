"""``spiffe-delegate demo --duration 30s``, as CI and the README run it: exit 0 after at
least one rotation and no failed pull, the output saying so, and nothing left behind."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def _left_behind(workdir: str) -> list[str]:
    """The demo's directory if it still exists, and processes still naming it."""
    return ([workdir] if Path(workdir).exists() else []) + _processes_mentioning(workdir)


async def _run_demo(*args: str, stop_after: float | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "demo", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    if stop_after is not None:
        await asyncio.sleep(stop_after)
        process.send_signal(signal.SIGINT)
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


def _needs_tools() -> None:
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {tool})")


@pytest.mark.root
async def test_demo_for_30_seconds_reports_rotations_and_no_failures() -> None:
    _needs_tools()
    status, output = await _run_demo("--duration", "30s")
    assert status == 0, output
    assert "attestation: pods" in output, output  # as root: real pod cgroups
    assert "pushed demo/hello:1.0 as CI: ok" in output
    assert "push through the node proxy refused (403)" in output
    rotations = re.findall(r"rotated (node registry proxy|registry-side Envoy|CI Envoy): "
                           r"serial \S+ -> \S+", output)
    assert {"node registry proxy", "registry-side Envoy", "CI Envoy"} <= set(rotations)
    summary = re.search(r"summary: (\d+) rotations seen .*; pulls (\d+) ok, (\d+) failed",
                        output)
    assert summary is not None, output
    assert int(summary.group(1)) >= 3 and int(summary.group(2)) > 0
    assert summary.group(3) == "0"
    assert "result: OK" in output
    removed = re.search(r"removed (\S+)", output)
    assert removed is not None
    assert _left_behind(removed.group(1)) == []


@pytest.mark.root
async def test_ctrl_c_stops_the_demo_and_removes_everything() -> None:
    _needs_tools()
    status, output = await _run_demo(stop_after=8.0)
    assert status in (0, 130), output  # 130: interrupted while still starting
    assert "stopping: ending every process by its PID" in output
    removed = re.search(r"removed (\S+)", output)
    assert removed is not None, output
    assert _left_behind(removed.group(1)) == []

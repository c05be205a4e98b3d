"""Fixtures for the admin commands: dev-spire on a real socket (in-process, on the test's
event loop), a synthetic /proc of a healthy node, and running the CLI as a process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.devspire import DevSpire, DevSpireSettings
from tests.attest.conftest import FakeProcTree
from tests.sds_server.conftest import DELEGATE, TD, delegate_entry, short_dir

CLI = [sys.executable, "-m", "agent"]
HOST_NS = "pid:[4026531836]"
SELF_PID = 4242
POD_A = "0f1e2d3c-4b5a-4697-8877-665544332211"
POD_B = "11111111-2222-4333-8444-555555555555"
CID_A = "a" * 64
CID_B = "b" * 64


def systemd_v1_line(pod_uid: str, container_id: str) -> str:
    escaped = pod_uid.replace("-", "_")
    return (f"1:name=systemd:/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{escaped}.slice/cri-containerd-{container_id}.scope\n")


def cgroupfs_v2_line(pod_uid: str, container_id: str) -> str:
    return f"0::/kubepods/besteffort/pod{pod_uid}/{container_id}\n"


def add_process(tree: FakeProcTree, pid: int, *, cgroup: str, comm: str = "sleep",
                ns: str | None = HOST_NS) -> Path:
    directory = tree.add(pid, cgroup=cgroup, comm=comm.encode(), uid=0)
    (directory / "comm").write_text(comm + "\n")
    if ns is not None:
        (directory / "ns").mkdir()
        (directory / "ns" / "pid").symlink_to(ns)  # dangling, as readlink needs no target
    return directory


def healthy_proc(root: Path) -> FakeProcTree:
    """A node as the agent should see it: PID 1 is systemd in the root cgroup, the agent
    (``self``) shares its PID namespace, and two pods' containers are visible."""
    root.mkdir(parents=True)
    tree = FakeProcTree(root)
    add_process(tree, 1, cgroup="0::/init.scope\n", comm="systemd")
    add_process(tree, SELF_PID, cgroup=systemd_v1_line(POD_B, CID_B), comm="python3")
    (root / "self").symlink_to(str(SELF_PID))
    add_process(tree, 300, cgroup=systemd_v1_line(POD_A, CID_A), comm="envoy")
    add_process(tree, 301, cgroup=systemd_v1_line(POD_A, CID_A), comm="envoy")
    add_process(tree, 500, cgroup=cgroupfs_v2_line(POD_B, CID_B), comm="pause")
    return tree


@pytest.fixture
def work() -> Iterator[Path]:
    path = short_dir("adm-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Spire:
    socket: Path
    dev: DevSpire


@asynccontextmanager
async def dev_spire(work: Path, *, entries: Sequence[dict[str, Any]] | None = None,
                    delegates: Sequence[str] = (DELEGATE,)) -> AsyncIterator[Spire]:
    """dev-spire; by default with an entry for this test process (and the CLI processes it
    starts: same uid and interpreter) whose SPIFFE ID is an authorized delegate."""
    entries_path = work / "entries.json"
    chosen = [delegate_entry()] if entries is None else list(entries)
    entries_path.write_text(json.dumps({"entries": chosen}))
    settings = DevSpireSettings(socket_path=str(work / "admin.sock"), trust_domain=TD,
                                entries_path=str(entries_path),
                                authorized_delegates=tuple(delegates), reload_interval=0.05)
    dev = DevSpire(settings)
    await dev.start()
    try:
        yield Spire(work / "admin.sock", dev)
    finally:
        await dev.stop(grace=0)


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def run_cli(*args: str, env: dict[str, str] | None = None,
                  timeout: float = 60.0) -> Ran:  # noqa: ASYNC109
    """``python -m agent ARGS`` as a process, awaited without blocking the event loop (the
    dev-spire or agent it talks to runs on this loop)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPIFFE_DELEGATE_")}
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**clean, **(env or {})})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return Ran(proc.returncode if proc.returncode is not None else -1, out.decode(),
               err.decode())


def statuses(results: Sequence[Any]) -> dict[str, str]:
    """name -> status, from CheckResults or their JSON."""
    out = {}
    for result in results:
        if isinstance(result, dict):
            out[result["name"]] = result["status"]
        else:
            out[result.name] = result.status.value
    return out


"""Fixtures for the attestation tests: a synthetic /proc tree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


def stat_line(pid: int, comm: bytes, state: str = "S", start_time: int = 4242) -> bytes:
    """A /proc/<pid>/stat line in the kernel's format (52 fields), comm written raw."""
    rest = [state, "1", str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 43
    rest[19] = str(start_time)  # field 22
    return f"{pid} (".encode() + comm + (") " + " ".join(rest) + "\n").encode()


def status_text(pid: int, uid: int, euid: int | None = None, state: str = "S") -> bytes:
    euid = uid if euid is None else euid
    return (f"Name:\tsleep\nUmask:\t0022\nState:\t{state} (sleeping)\nTgid:\t{pid}\n"
            f"Ngid:\t0\nPid:\t{pid}\nPPid:\t1\nTracerPid:\t0\n"
            f"Uid:\t{uid}\t{euid}\t{euid}\t{euid}\nGid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
            "FDSize:\t64\nGroups:\t\n").encode()


@dataclass
class FakeProcTree:
    """Writes /proc/<pid>/{stat,status,cgroup} under ``root``; pass ``None`` to leave one out."""

    root: Path

    def add(self, pid: int, *, cgroup: str | bytes | None = "0::/\n",
            comm: bytes = b"sleep", state: str = "S", start_time: int = 4242,
            uid: int = 1000, euid: int | None = None,
            stat: bytes | None = None, status: bytes | None = None,
            write_stat: bool = True, write_status: bool = True) -> Path:
        directory = self.root / str(pid)
        directory.mkdir(parents=True, exist_ok=True)
        if write_stat:
            (directory / "stat").write_bytes(
                stat if stat is not None else stat_line(pid, comm, state, start_time))
        if write_status:
            (directory / "status").write_bytes(
                status if status is not None else status_text(pid, uid, euid, state))
        if cgroup is not None:
            data = cgroup.encode() if isinstance(cgroup, str) else cgroup
            (directory / "cgroup").write_bytes(data)
        return directory


@pytest.fixture
def proc_tree(tmp_path: Path) -> FakeProcTree:
    root = tmp_path / "proc"
    root.mkdir()
    # Entries a real /proc has that are not processes.
    (root / "self").symlink_to("1")
    for name in ("sys", "net", "1a", "cpuinfo"):
        (root / name).mkdir()
    return FakeProcTree(root)

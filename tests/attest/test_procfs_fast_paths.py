"""ProcReader's cheaper paths: ``placement`` (identity without status), one read per short
file, and parsed cgroup files kept by content (never the content itself)."""

from __future__ import annotations

import os
from collections import Counter

import pytest

from agent.attest import procfs
from agent.attest.procfs import AmbiguousCgroup, ProcessGone, ProcessPlacement, ProcReader
from tests.attest.conftest import FakeProcTree
from tests.attest.test_procfs import CID, OTHER_CID, OTHER_UID, UID, systemd_line


def test_placement_is_identity_without_the_uid(proc_tree: FakeProcTree) -> None:
    proc_tree.add(321, cgroup="3:pids:/\n" + systemd_line(UID, CID) + "0::/\n",
                  start_time=987654, uid=1001)
    reader = ProcReader(proc_tree.root)
    placement = reader.placement(321)
    assert placement == ProcessPlacement(pid=321, start_time=987654, pod_uid=UID,
                                         container_id=CID)
    identity = reader.identity(321)
    assert placement.same_process(identity)
    assert (identity.pod_uid, identity.container_id) == (UID, CID)


def test_placement_does_not_need_status(proc_tree: FakeProcTree) -> None:
    proc_tree.add(5, cgroup=systemd_line(UID, CID), write_status=False)
    assert ProcReader(proc_tree.root).placement(5).pod_uid == UID


@pytest.mark.parametrize("missing", ["stat", "cgroup"])
def test_placement_of_a_vanished_process_is_gone(proc_tree: FakeProcTree,
                                                 missing: str) -> None:
    proc_tree.add(77, cgroup=None if missing == "cgroup" else "0::/\n",
                  write_stat=missing != "stat")
    with pytest.raises(ProcessGone):
        ProcReader(proc_tree.root).placement(77)


def test_placement_refuses_zombies_and_ambiguous_cgroups(proc_tree: FakeProcTree) -> None:
    proc_tree.add(78, state="Z")
    proc_tree.add(79, cgroup=systemd_line(UID, CID) + f"0::/kubepods/pod{OTHER_UID}/{OTHER_CID}\n")
    reader = ProcReader(proc_tree.root)
    with pytest.raises(ProcessGone, match="zombie"):
        reader.placement(78)
    with pytest.raises(AmbiguousCgroup):
        reader.placement(79)


def test_placement_through_an_exited_pidfd_is_gone(proc_tree: FakeProcTree) -> None:
    proc_tree.add(80, cgroup="0::/\n")
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    pidfd = os.pidfd_open(pid)
    try:
        os.waitpid(pid, 0)
        with pytest.raises(ProcessGone, match="pidfd"):
            ProcReader(proc_tree.root).placement(80, pidfd)
    finally:
        os.close(pidfd)


def test_real_placement_of_this_process() -> None:
    reader = ProcReader()
    placement = reader.placement(os.getpid())
    assert placement.same_process(reader.identity(os.getpid()))


def test_a_file_is_read_whole_whatever_its_size(proc_tree: FakeProcTree,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Files of exactly one chunk, and of more than one, need the reads that follow.
    monkeypatch.setattr(procfs, "_READ_CHUNK", 16)
    reader = ProcReader(proc_tree.root)
    for pid, line in ((11, "0::/" + "x" * 11 + "\n"), (12, systemd_line(UID, CID))):
        proc_tree.add(pid, cgroup=line)
        assert len(line) == 16 or len(line) > 32
        assert procfs._read_file(str(proc_tree.root / str(pid) / "cgroup")) == line.encode()
    assert reader.identity(12).pod_uid == UID


def test_cgroup_files_are_read_afresh_and_parsed_once_per_content(
        proc_tree: FakeProcTree, monkeypatch: pytest.MonkeyPatch) -> None:
    for pid in range(100, 120):
        proc_tree.add(pid, cgroup=systemd_line(UID, CID))
    parses: Counter[bytes] = Counter()
    real_parse = procfs.parse_cgroup_file

    def counting(raw: str | bytes) -> procfs.CgroupInfo:
        parses[raw if isinstance(raw, bytes) else raw.encode()] += 1
        return real_parse(raw)

    monkeypatch.setattr(procfs, "parse_cgroup_file", counting)
    reader = ProcReader(proc_tree.root)
    assert reader.pids_of_pod(UID) == list(range(100, 120))
    assert sum(parses.values()) == 1
    # A process moved to another pod is seen at the next read: contents are never cached.
    (proc_tree.root / "105" / "cgroup").write_text(systemd_line(OTHER_UID, OTHER_CID))
    assert reader.placement(105).pod_uid == OTHER_UID
    assert reader.pids_of_pod(UID) == [pid for pid in range(100, 120) if pid != 105]
    assert sum(parses.values()) == 2

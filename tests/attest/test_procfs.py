"""ProcReader over a synthetic /proc tree, and over the real one for what needs a kernel."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from agent.attest import procfs
from agent.attest.cgroups import CgroupStatus
from agent.attest.procfs import (
    AmbiguousCgroup,
    ProcessGone,
    ProcessIdentity,
    ProcReader,
    ProcUnreadable,
)
from agent.errors import AttestationError
from tests.attest.conftest import FakeProcTree

UID = "2c48913c-b29f-11e7-9350-020968147796"
OTHER_UID = "a2830d0d-b0f0-4ff0-81b5-0ee4e299cf80"
CID = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961"
OTHER_CID = "09bc3d7ade839efec32b6bec4ec79d099027a668ddba043083ec21d3c3b8f1e6"


def systemd_line(uid: str, cid: str) -> str:
    escaped = uid.replace("-", "_")
    return (f"1:name=systemd:/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{escaped}.slice/cri-containerd-{cid}.scope\n")


def cgroupfs_line(uid: str, cid: str) -> str:
    return f"0::/kubepods/burstable/pod{uid}/{cid}\n"


# -- one process ---------------------------------------------------------------------------

def test_identity_of_a_pod_process(proc_tree: FakeProcTree) -> None:
    proc_tree.add(321, cgroup="3:pids:/\n" + systemd_line(UID, CID) + "0::/\n",
                  start_time=987654, uid=1001, euid=0)
    reader = ProcReader(proc_tree.root)
    identity = reader.identity(321)
    assert identity == ProcessIdentity(pid=321, start_time=987654, uid=1001, pod_uid=UID,
                                       container_id=CID)
    assert identity.in_pod
    assert reader.start_time(321) == 987654
    assert reader.pod_of(321) == UID
    assert reader.cgroup(321).status is CgroupStatus.POD


def test_identity_of_a_host_process(proc_tree: FakeProcTree) -> None:
    proc_tree.add(7, cgroup="0::/system.slice/containerd.service\n", uid=0)
    identity = ProcReader(proc_tree.root).identity(7)
    assert identity == ProcessIdentity(7, 4242, 0, None, None)
    assert not identity.in_pod


def test_identity_of_a_podless_container(proc_tree: FakeProcTree) -> None:
    proc_tree.add(8, cgroup=f"0::/system.slice/docker-{CID}.scope\n")
    identity = ProcReader(proc_tree.root).identity(8)
    assert (identity.pod_uid, identity.container_id) == (None, CID)
    assert not identity.in_pod


NASTY_COMMS = [
    b"sleep",
    b"a b c",
    b"x) S 1 2 3",
    b") ) )",
    b"(",
    b")",
    b"()",
    b"1 2 3 4 5 6 7",
    b"new\nline)",
    b"tab\there",
    b"",
    b"\xff\xfe)",
    b"15 chars long!)",
    b"9999999999)) 0",
]


@pytest.mark.parametrize("comm", NASTY_COMMS)
def test_start_time_survives_nasty_comm_names(proc_tree: FakeProcTree, comm: bytes) -> None:
    proc_tree.add(4321, comm=comm, start_time=123456789)
    reader = ProcReader(proc_tree.root)
    assert reader.start_time(4321) == 123456789
    assert reader.identity(4321).start_time == 123456789


def test_uid_is_the_real_uid(proc_tree: FakeProcTree) -> None:
    proc_tree.add(55, uid=1234, euid=0)
    assert ProcReader(proc_tree.root).identity(55).uid == 1234


def test_same_process_compares_pid_and_start_time() -> None:
    a = ProcessIdentity(10, 100, 0, UID, CID)
    assert a.same_process(ProcessIdentity(10, 100, 5, None, None))
    assert not a.same_process(ProcessIdentity(10, 101, 0, UID, CID))
    assert not a.same_process(ProcessIdentity(11, 100, 0, UID, CID))


def test_missing_process_is_gone(proc_tree: FakeProcTree) -> None:
    reader = ProcReader(proc_tree.root)
    for call in (reader.identity, reader.start_time, reader.pod_of, reader.cgroup):
        with pytest.raises(ProcessGone) as caught:
            call(999)
        assert caught.value.pid == 999
        assert isinstance(caught.value, AttestationError)
        assert "999" in str(caught.value)


@pytest.mark.parametrize("missing", ["stat", "status", "cgroup"])
def test_process_that_vanishes_mid_read_is_gone(proc_tree: FakeProcTree, missing: str) -> None:
    proc_tree.add(77, cgroup=None if missing == "cgroup" else "0::/\n",
                  write_stat=missing != "stat", write_status=missing != "status")
    with pytest.raises(ProcessGone):
        ProcReader(proc_tree.root).identity(77)


@pytest.mark.parametrize("state", ["Z", "X"])
def test_zombie_is_gone(proc_tree: FakeProcTree, state: str) -> None:
    proc_tree.add(78, state=state)
    with pytest.raises(ProcessGone, match="zombie"):
        ProcReader(proc_tree.root).identity(78)


@pytest.mark.parametrize("stat", [
    b"",
    b"12 (sleep S 1 2",
    b"12 (sleep) S 1 2 3\n",
    b"12 (sleep) S " + b"x " * 30,
    b"12 (sleep) S " + b"1 " * 18 + b"-5 " + b"0 " * 30,
])
def test_malformed_stat_is_unreadable(proc_tree: FakeProcTree, stat: bytes) -> None:
    proc_tree.add(12, stat=stat)
    reader = ProcReader(proc_tree.root)
    with pytest.raises(ProcUnreadable, match="stat"):
        reader.identity(12)
    with pytest.raises(ProcUnreadable):
        reader.start_time(12)


@pytest.mark.parametrize("status", [b"", b"Name:\tx\n", b"Uid:\n", b"Uid:\tme\t0\t0\t0\n"])
def test_status_without_a_real_uid_is_unreadable(proc_tree: FakeProcTree, status: bytes) -> None:
    proc_tree.add(13, status=status)
    with pytest.raises(ProcUnreadable, match="Uid"):
        ProcReader(proc_tree.root).identity(13)


def test_permission_denied_is_unreadable(proc_tree: FakeProcTree,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    proc_tree.add(14)

    def denied(path: str, dir_fd: int | None = None) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(procfs, "_read_file", denied)
    reader = ProcReader(proc_tree.root)
    with pytest.raises(ProcUnreadable, match="Permission denied"):
        reader.identity(14)
    with pytest.raises(ProcUnreadable):
        reader.pod_of(14)
    assert reader.pods() == {}  # a scan skips what it cannot read


def test_conflicting_cgroups_are_not_attestable(proc_tree: FakeProcTree) -> None:
    proc_tree.add(90, cgroup=systemd_line(UID, CID) + cgroupfs_line(OTHER_UID, OTHER_CID))
    reader = ProcReader(proc_tree.root)
    with pytest.raises(AmbiguousCgroup, match="multiple pod UIDs") as caught:
        reader.identity(90)
    assert caught.value.pid == 90
    with pytest.raises(AmbiguousCgroup):
        reader.pod_of(90)
    assert reader.cgroup(90).status is CgroupStatus.CONFLICT
    assert reader.pids_of_pod(UID) == [] and reader.pids_of_pod(OTHER_UID) == []
    assert reader.pods() == {}


def test_unparseable_cgroup_file_means_not_in_a_pod(proc_tree: FakeProcTree,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    proc_tree.add(91, cgroup=systemd_line(UID, CID) + "\nrubbish\n")
    reader = ProcReader(proc_tree.root)
    with caplog.at_level(logging.WARNING, logger="agent.attest.procfs"):
        identity = reader.identity(91)
    assert (identity.pod_uid, identity.container_id) == (None, None)
    assert "not in a pod" in caplog.text and "91" in caplog.text
    assert reader.pids_of_pod(UID) == []


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "12"])
def test_bad_pid_is_a_value_error(proc_tree: FakeProcTree, bad: object) -> None:
    reader = ProcReader(proc_tree.root)
    with pytest.raises(ValueError, match="PID"):
        reader.identity(bad)  # type: ignore[arg-type]


# -- all processes -------------------------------------------------------------------------

def test_pids_lists_only_processes(proc_tree: FakeProcTree) -> None:
    for pid in (300, 2, 41):
        proc_tree.add(pid)
    assert ProcReader(proc_tree.root).pids() == [2, 41, 300]


def test_pids_of_pod_and_pods(proc_tree: FakeProcTree) -> None:
    proc_tree.add(10, cgroup=systemd_line(UID, CID))
    proc_tree.add(11, cgroup=cgroupfs_line(UID, OTHER_CID))          # same pod, 2nd container
    proc_tree.add(12, cgroup=cgroupfs_line(OTHER_UID, OTHER_CID))
    proc_tree.add(13, cgroup="0::/user.slice/user-1000.slice/session-2.scope\n")
    proc_tree.add(14, cgroup=f"0::/kubepods/burstable/pod{UID}\n")   # pod, no container
    proc_tree.add(15, cgroup=f"0::/docker/{CID}\n")                  # container, no pod
    proc_tree.add(16, cgroup=None)                                   # vanished meanwhile
    reader = ProcReader(proc_tree.root)
    assert reader.pids_of_pod(UID) == [10, 11]
    assert reader.pids_of_pod(OTHER_UID) == [12]
    assert reader.pids_of_pod(str(uuid.uuid4())) == []
    assert reader.pods() == {UID: [10, 11], OTHER_UID: [12]}


@pytest.mark.parametrize("bad", [UID.upper(), UID.replace("-", "_"), f"pod{UID}", "", "x"])
def test_pids_of_pod_wants_a_canonical_uid(proc_tree: FakeProcTree, bad: str) -> None:
    with pytest.raises(ValueError, match="pod UID"):
        ProcReader(proc_tree.root).pids_of_pod(bad)


def test_scans_of_2000_processes_read_each_cgroup_file_once(
        proc_tree: FakeProcTree, monkeypatch: pytest.MonkeyPatch) -> None:
    pods = [str(uuid.UUID(int=n)) for n in range(1, 51)]
    expected: dict[str, list[int]] = {}
    for pid in range(100, 2100):
        if pid % 3 == 0:  # a third on the host
            cgroup = f"1:name=systemd:/system.slice/svc{pid}.service\n0::/\n"
        else:
            pod = pods[pid % len(pods)]
            cid = f"{pid:064x}"
            cgroup = (systemd_line(pod, cid) if pid % 2 else cgroupfs_line(pod, cid))
            expected.setdefault(pod, []).append(pid)
        proc_tree.add(pid, cgroup=cgroup, write_stat=False, write_status=False)

    reads: Counter[str] = Counter()
    real_read = procfs._read_file

    def counting(path: str, dir_fd: int | None = None) -> bytes:
        reads[path] += 1
        return real_read(path, dir_fd)

    monkeypatch.setattr(procfs, "_read_file", counting)
    reader = ProcReader(proc_tree.root)

    assert reader.pods() == expected
    assert len(reads) == 2000
    assert set(reads.values()) == {1}
    assert all(path.endswith("/cgroup") for path in reads)

    reads.clear()
    assert reader.pids_of_pod(pods[7]) == expected[pods[7]]
    assert len(reads) == 2000 and set(reads.values()) == {1}


# -- the real /proc ------------------------------------------------------------------------

def test_real_proc_identity_of_this_process() -> None:
    reader = ProcReader()
    identity = reader.identity(os.getpid())
    assert identity.pid == os.getpid()
    assert identity.uid == os.getuid()
    assert identity.start_time == reader.start_time(os.getpid()) > 0
    # Our own cgroup file says whatever it says, but it parses.
    assert reader.cgroup(os.getpid()).attestable


def test_real_proc_child_is_newer_than_us() -> None:
    reader = ProcReader()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert reader.start_time(child.pid) >= reader.start_time(os.getpid())
        assert child.pid in reader.pids()
    finally:
        child.kill()
        child.wait()
    with pytest.raises(ProcessGone):
        reader.identity(child.pid)


def test_real_proc_zombie_is_gone() -> None:
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        stat = Path(f"/proc/{child.pid}/stat")
        while stat.read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z":
            assert time.monotonic() < deadline, "child never became a zombie"
            time.sleep(0.005)
        with pytest.raises(ProcessGone, match="zombie"):
            ProcReader().identity(child.pid)
    finally:
        child.wait()


def test_real_proc_reads_never_mix_two_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process is killed and reaped after its stat was read: the remaining reads go
    through the same /proc/<pid> directory fd, so they fail instead of reading whatever
    process has the PID next."""
    child = subprocess.Popen(["sleep", "30"])
    real_read = procfs._read_file

    def kill_after_stat(path: str, dir_fd: int | None = None) -> bytes:
        data = real_read(path, dir_fd)
        if path == "stat":
            child.kill()
            child.wait()
        return data

    monkeypatch.setattr(procfs, "_read_file", kill_after_stat)
    try:
        with pytest.raises(ProcessGone):
            ProcReader().identity(child.pid)
    finally:
        child.kill()
        child.wait()


def test_real_proc_pidfd_pins_the_process() -> None:
    child = subprocess.Popen(["sleep", "30"])
    pidfd = os.pidfd_open(child.pid)
    try:
        reader = ProcReader()
        assert reader.identity(child.pid, pidfd=pidfd).pid == child.pid
        child.kill()
        child.wait()
        # Even where /proc still has something at that PID (here: this test process), a
        # pidfd whose process exited means the snapshot cannot be trusted.
        with pytest.raises(ProcessGone, match="pidfd"):
            reader.identity(os.getpid(), pidfd=pidfd)
    finally:
        os.close(pidfd)
        child.kill()
        child.wait()

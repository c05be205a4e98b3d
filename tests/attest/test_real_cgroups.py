"""Real processes in real cgroups shaped like a kubelet's: ProcReader must see their pods.

Needs root; each test is skipped with the reason when the kernel will not cooperate.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent.attest.cgroups import CgroupStatus
from agent.attest.procfs import AmbiguousCgroup, ProcessGone, ProcReader
from tests.podcgroups import FakePod, cgroup_paths, fake_pod, new_container_id, new_pod_uid

pytestmark = pytest.mark.root

SLEEP = ["sleep", "60"]


def _check_seen(reader: ProcReader, pod: FakePod, pid: int, container_id: str) -> None:
    # The kernel really put the process there (not just our idea of the path).
    assert pod.cgroup_path(container_id) in cgroup_paths(pid)
    assert pid in pod.pids(container_id)
    identity = reader.identity(pid)
    assert (identity.pod_uid, identity.container_id) == (pod.pod_uid, container_id)
    assert identity.uid == os.getuid()
    assert reader.pod_of(pid) == pod.pod_uid
    assert pid in reader.pids_of_pod(pod.pod_uid)
    assert pid in reader.pods()[pod.pod_uid]


@pytest.mark.parametrize(("layout", "qos", "runtime", "hierarchies"), [
    ("systemd-v1", "burstable", "containerd", None),
    ("systemd-v1", "besteffort", "crio", ["pids"]),
    ("systemd-v1", "guaranteed", "docker", ["name=systemd", "pids"]),
    ("systemd-v2", "burstable", "containerd", None),
    ("systemd-hybrid", "besteffort", "containerd", None),
    ("cgroupfs-v2", "burstable", "containerd", None),
    ("cgroupfs-v2", "guaranteed", "crio", None),
    ("cgroupfs-v1", "besteffort", "docker", None),
])
def test_process_in_a_fake_pod_is_seen(layout: str, qos: str, runtime: str,
                                       hierarchies: list[str] | None) -> None:
    reader = ProcReader()
    with fake_pod(layout=layout, qos=qos, runtime=runtime,  # type: ignore[arg-type]
                  hierarchies=hierarchies) as pod:
        proc = pod.spawn(SLEEP)
        _check_seen(reader, pod, proc.pid, pod.container_id)
        assert len(reader.pids_of_pod(pod.pod_uid)) == 1
    # Cleaned up: the process is dead and its cgroups are gone.
    assert proc.returncode is not None
    assert not any(d.exists() for d in pod.directories())
    with pytest.raises(ProcessGone):
        reader.identity(proc.pid)


def test_systemd_v1_path_is_the_kubelet_shape() -> None:
    uid = new_pod_uid()
    cid = new_container_id()
    with fake_pod(uid, cid, layout="systemd-v1") as pod:
        proc = pod.spawn(SLEEP)
        escaped = uid.replace("-", "_")
        expected = (f"/kubepods.slice/kubepods-burstable.slice/"
                    f"kubepods-burstable-pod{escaped}.slice/cri-containerd-{cid}.scope")
        lines = Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()
        assert any(line.endswith(f":name=systemd:{expected}") for line in lines), lines


def test_cgroupfs_v2_path_is_the_kubelet_shape() -> None:
    uid = new_pod_uid()
    cid = new_container_id()
    with fake_pod(uid, cid, layout="cgroupfs-v2") as pod:
        proc = pod.spawn(SLEEP)
        lines = Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()
        assert f"0::/kubepods/burstable/pod{uid}/{cid}" in lines


def test_child_is_in_the_pod_before_it_runs() -> None:
    with fake_pod(layout="cgroupfs-v2") as pod:
        proc = pod.spawn(["cat", "/proc/self/cgroup"], stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=10)
        assert f"0::{pod.cgroup_path()}" in out.splitlines()


def test_two_containers_of_one_pod() -> None:
    reader = ProcReader()
    with fake_pod(layout="systemd-v1") as pod:
        first = pod.spawn(SLEEP)
        second_id = new_container_id()
        second = pod.spawn(SLEEP, container_id=second_id)
        _check_seen(reader, pod, first.pid, pod.container_id)
        _check_seen(reader, pod, second.pid, second_id)
        assert reader.pids_of_pod(pod.pod_uid) == sorted([first.pid, second.pid])


def test_pods_side_by_side_in_v1_and_v2() -> None:
    reader = ProcReader()
    with fake_pod(layout="systemd-v1") as a, fake_pod(layout="cgroupfs-v2") as b:
        in_a, in_b = a.spawn(SLEEP), b.spawn(SLEEP)
        pods = reader.pods()
        assert pods[a.pod_uid] == [in_a.pid]
        assert pods[b.pod_uid] == [in_b.pid]
        assert reader.pids_of_pod(a.pod_uid) == [in_a.pid]
        assert reader.pids_of_pod(b.pod_uid) == [in_b.pid]


def test_process_in_two_pods_is_not_attestable() -> None:
    reader = ProcReader()
    with fake_pod(layout="systemd-v1") as a, fake_pod(layout="cgroupfs-v2") as b:
        proc = a.spawn(SLEEP)
        b.move(proc.pid)
        paths = cgroup_paths(proc.pid)
        assert a.cgroup_path() in paths and b.cgroup_path() in paths
        assert reader.cgroup(proc.pid).status is CgroupStatus.CONFLICT
        with pytest.raises(AmbiguousCgroup, match="multiple pod UIDs"):
            reader.identity(proc.pid)
        assert reader.pids_of_pod(a.pod_uid) == []
        assert reader.pids_of_pod(b.pod_uid) == []


def test_leaving_the_pod_is_seen() -> None:
    """A process moved out of its pod's cgroup is no longer reported in the pod."""
    reader = ProcReader()
    with fake_pod(layout="cgroupfs-v2") as pod:
        proc = pod.spawn(SLEEP)
        assert reader.pod_of(proc.pid) == pod.pod_uid
        (pod.hierarchies["cgroup2"] / "cgroup.procs").write_text(str(proc.pid))
        assert reader.pod_of(proc.pid) is None
        assert reader.pids_of_pod(pod.pod_uid) == []


def test_cleanup_runs_when_the_test_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"), fake_pod(layout="systemd-v1") as pod:
        proc = pod.spawn(["sh", "-c", "sleep 60 & sleep 60"])
        leaf = pod.directories()[0]
        assert leaf.is_dir()
        raise RuntimeError("boom")
    assert proc.returncode is not None
    assert not leaf.exists()
    assert not leaf.parent.exists()  # the pod's own slice


def test_pod_uid_and_container_id_are_random() -> None:
    with fake_pod() as a, fake_pod() as b:
        assert a.pod_uid != b.pod_uid and a.container_id != b.container_id

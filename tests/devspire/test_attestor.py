"""The devspire attestor: SPIRE's container locator on the cgroup shapes of spec section 4."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.devspire.attestor import (
    AttestationFailed,
    Attestor,
    ContainerLocation,
    LocatorError,
    locate_in_cgroup_file,
    locate_in_mountinfo,
    locate_in_path,
)
from agent.devspire.pods import Container, Pod, PodList
from agent.model import Selector

CID = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961"
CID2 = "09bc3d7ade839efec32b6bec4ec79d099027a668ddba043083ec21d3c3b8f1e6"
HOST_CID = "93529524695bb00d91c1f6dba692ea8d3550c3b94fb2463af7bc9ec82f992d26"
UID = "2c48913c-b29f-11e7-9350-020968147796"
UID2 = "a2830d0d-b0f0-4ff0-81b5-0ee4e299cf80"
ZERO_UID = "00000000-1111-2222-3333-444444444444"
ZERO_CID = "0123456789abcdef" * 4


@pytest.mark.parametrize(("path", "pod_uid", "container_id"), [
    # cgroupfs driver, v1
    (f"/kubepods/burstable/pod{UID}/{CID}", UID, CID),
    (f"/kubepods/pod{UID}/{CID}", UID, CID),
    (f"/kubepods/kubepods/besteffort/pod{UID}/{CID}", UID, CID),
    # kind: nested docker, the pod's container wins over the node container
    (f"/docker/{HOST_CID}/kubepods/besteffort/pod{UID2}/{CID2}", UID2, CID2),
    # systemd driver, docker
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}"
     f".slice/docker-{CID}.scope", UID, CID),
    # systemd driver, cri-o (underscored UID)
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
     f"{UID2.replace('-', '_')}.slice/crio-{CID2}.scope", UID2, CID2),
    # systemd driver, containerd
    (f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{ZERO_UID.replace('-', '_')}"
     f".slice/cri-containerd-{ZERO_CID}.scope", ZERO_UID, ZERO_CID),
    # the colon form: pod UID and container ID in one segment
    (f"/kubepods-besteffort-pod{ZERO_UID.replace('-', '_')}.slice:cri-containerd:{ZERO_CID}",
     ZERO_UID, ZERO_CID),
    # cgroup v2 inside a cgroup namespace
    (f"/../../kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod"
     f"{ZERO_UID.replace('-', '_')}.slice/cri-containerd-{ZERO_CID}.scope", ZERO_UID, ZERO_CID),
    (f"/../crio-{CID}.scope", "", CID),
    (f"/../{ZERO_CID}", "", ZERO_CID),
    (f"/../../pod{UID2}/{CID}", UID2, CID),
    # host processes
    ("/user.slice/user-1000.slice/session-2.scope", "", ""),
    ("/system.slice/containerd.service", "", ""),
    ("/", "", ""),
    # a pod UID alone is not enough: no container ID, no pod UID either
    (f"/kubepods/pod{UID}", "", ""),
    # 63 hex digits are not a container ID; an underscore breaks the word boundary
    (f"/kubepods/pod{UID}/{CID[:63]}", "", ""),
    (f"/kubepods/pod{UID}/x_{CID}", "", ""),
])
def test_locate_in_path(path: str, pod_uid: str, container_id: str) -> None:
    assert locate_in_path(path) == ContainerLocation(pod_uid, container_id)


def test_cgroup_v1_file_from_spire_testdata() -> None:
    text = "".join(f"{n}:{c}:/kubepods/burstable/pod{UID}/{CID}\n"
                   for n, c in [(11, "hugetlb"), (10, "devices"), (1, "name=systemd")])
    assert locate_in_cgroup_file(text) == ContainerLocation(UID, CID)


def test_kind_on_macos_pod_line_beats_node_container_line() -> None:
    pod_line = f"1:cpuset:/docker/{HOST_CID}/kubepods/besteffort/pod{UID2}/{CID2}"
    node_line = f"0::/docker/{HOST_CID}/system.slice/containerd.service"
    for text in (f"{pod_line}\n{node_line}\n", f"{node_line}\n{pod_line}\n"):
        assert locate_in_cgroup_file(text) == ContainerLocation(UID2, CID2)


def test_crio_with_service_line() -> None:
    text = (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
            f"{UID2.replace('-', '_')}.slice/crio-{CID2}.scope\n0::/system.slice/crio.service\n")
    assert locate_in_cgroup_file(text) == ContainerLocation(UID2, CID2)


def test_host_process_file() -> None:
    text = ("1:name=systemd:/user.slice/user-1000.slice/session-2.scope\n10:devices:/user.slice\n"
            "0::/system.slice/containerd.service\n")
    assert locate_in_cgroup_file(text) == ContainerLocation()


def test_multiple_pod_uids_fail() -> None:
    text = f"2:cpu:/kubepods/pod{UID}/{CID}\n1:memory:/kubepods/pod{UID2}/{CID}\n"
    with pytest.raises(LocatorError, match="multiple pod UIDs found"):
        locate_in_cgroup_file(text)


def test_multiple_container_ids_fail() -> None:
    text = f"2:cpu:/kubepods/pod{UID}/{CID}\n1:memory:/kubepods/pod{UID}/{CID2}\n"
    with pytest.raises(LocatorError, match="multiple container IDs found"):
        locate_in_cgroup_file(text)


def test_container_without_pod_then_a_bare_line_conflicts_like_spire() -> None:
    # SPIRE compares every later line's container ID with the first one, even an empty one.
    with pytest.raises(LocatorError, match="multiple container IDs found"):
        locate_in_cgroup_file(f"1:cpu:/docker/{CID}\n0::/\n")


def test_malformed_cgroup_line_fails() -> None:
    with pytest.raises(LocatorError, match="id:controllers:path"):
        locate_in_cgroup_file("garbage\n")


def test_mountinfo_fallback_skips_root_mounts() -> None:
    text = (
        "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
        f"31 25 0:27 /kubepods/pod{UID}/{CID} /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
        "32 25 0:28 /x /mnt rw - ext4 /dev/sda1 rw\n"
    )
    assert locate_in_mountinfo(text) == ContainerLocation(UID, CID)


# --- the whole attestor over a synthetic /proc --------------------------------------------

def make_proc(root: Path, pid: int, *, uid: int = 1000, gid: int = 1000, real_uid: int = -1,
              real_gid: int = -1, groups: str = "",
              cgroup: str | None = "0::/user.slice\n", exe: str | None = "/usr/bin/app",
              status: bool = True) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    ruid = uid if real_uid < 0 else real_uid
    rgid = gid if real_gid < 0 else real_gid
    if status:  # Uid:/Gid: list real, effective, saved set and filesystem ids
        (d / "status").write_text(
            f"Name:\tapp\nUid:\t{ruid}\t{uid}\t{uid}\t{uid}\n"
            f"Gid:\t{rgid}\t{gid}\t{gid}\t{gid}\nGroups:\t{groups}\n")
    if cgroup is not None:
        (d / "cgroup").write_text(cgroup)
    if exe is not None:
        os.symlink(exe, d / "exe")


def strs(selectors: frozenset[Selector]) -> set[str]:
    return {str(s) for s in selectors}


def test_unix_selectors_use_effective_ids_like_spire(tmp_path: Path) -> None:
    make_proc(tmp_path, 42, uid=0, gid=0, real_uid=1234, real_gid=5678, groups="0 4242")
    got = strs(Attestor(tmp_path).attest(42).selectors)
    assert {"unix:uid:0", "unix:gid:0", "unix:user:root", "unix:group:root",
            "unix:supplementary_gid:4242", "unix:path:/usr/bin/app"} <= got
    assert "unix:uid:1234" not in got and "unix:gid:5678" not in got


def test_unresolvable_names_are_left_out(tmp_path: Path) -> None:
    make_proc(tmp_path, 42, uid=54321, gid=54321, exe=None)
    got = strs(Attestor(tmp_path).attest(42).selectors)
    assert got == {"unix:uid:54321", "unix:gid:54321"}


def test_pod_process_with_pods_file(tmp_path: Path) -> None:
    cgroup = (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
              f"{UID2.replace('-', '_')}.slice/cri-containerd-{CID2}.scope\n")
    make_proc(tmp_path, 7, cgroup=cgroup)
    pods = PodList((Pod(uid=UID2, namespace="zarf", service_account="registry", name="reg-0",
                        node_name="node-1", labels=(("app", "reg"),),
                        containers=(Container(CID2, "proxy", "envoy:1"),)),))
    got = strs(Attestor(tmp_path, pods).attest(7).selectors)
    assert {f"k8s:pod-uid:{UID2}", f"k8s:container-id:{CID2}", "k8s:ns:zarf",
            "k8s:sa:registry", "k8s:pod-name:reg-0", "k8s:node-name:node-1",
            "k8s:pod-label:app:reg", "k8s:container-name:proxy",
            "k8s:container-image:envoy:1", "unix:uid:1000"} <= got


def test_pod_process_without_pods_file_gets_uid_and_container(tmp_path: Path) -> None:
    make_proc(tmp_path, 7, cgroup=f"0::/kubepods/pod{UID}/{CID}\n")
    got = strs(Attestor(tmp_path).attest(7).selectors)
    assert {s for s in got if s.startswith("k8s:")} == {f"k8s:pod-uid:{UID}",
                                                        f"k8s:container-id:{CID}"}


def test_container_found_by_id_when_cgroup_has_no_pod_uid(tmp_path: Path) -> None:
    make_proc(tmp_path, 7, cgroup=f"0::/../crio-{CID}.scope\n")
    pods = PodList((Pod(uid=UID, namespace="ns1", containers=(Container(CID),)),))
    got = strs(Attestor(tmp_path, pods).attest(7).selectors)
    assert {f"k8s:pod-uid:{UID}", "k8s:ns:ns1"} <= got


def test_unknown_container_fails_k8s_only(tmp_path: Path) -> None:
    make_proc(tmp_path, 7, cgroup=f"0::/../crio-{CID}.scope\n")
    got = strs(Attestor(tmp_path).attest(7).selectors)
    assert "unix:uid:1000" in got
    assert not any(s.startswith("k8s:") for s in got)


def test_gone_process_gets_empty_selectors_not_an_error(tmp_path: Path) -> None:
    assert Attestor(tmp_path).attest(999999).selectors == frozenset()


def test_host_process_has_no_k8s_selectors(tmp_path: Path) -> None:
    make_proc(tmp_path, 7)
    assert not any(s.type == "k8s" for s in Attestor(tmp_path).attest(7).selectors)


def test_all_plugins_failing_is_an_error(tmp_path: Path) -> None:
    make_proc(tmp_path, 7, status=False, cgroup="not-a-cgroup-line\n")
    with pytest.raises(AttestationFailed):
        Attestor(tmp_path).attest(7)


def test_k8s_failure_keeps_unix_selectors(tmp_path: Path) -> None:
    make_proc(tmp_path, 7,
              cgroup=f"2:cpu:/kubepods/pod{UID}/{CID}\n1:mem:/kubepods/pod{UID2}/{CID}\n")
    got = strs(Attestor(tmp_path).attest(7).selectors)
    assert "unix:uid:1000" in got and not any(s.startswith("k8s:") for s in got)


def test_real_proc_self() -> None:
    got = strs(Attestor().attest(os.getpid()).selectors)
    assert f"unix:uid:{os.geteuid()}" in got
    assert f"unix:gid:{os.getegid()}" in got
    assert f"unix:path:{os.path.realpath('/proc/self/exe')}" in got

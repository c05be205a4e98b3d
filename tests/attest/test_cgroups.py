"""parse_cgroup_file over every shape SPIRE's k8s attestor accepts, and what it refuses."""

from __future__ import annotations

import pytest

from agent.attest.cgroups import (
    CgroupInfo,
    CgroupStatus,
    is_pod_uid,
    parse_cgroup_file,
    parse_cgroup_path,
)

POD = CgroupStatus.POD
CONTAINER = CgroupStatus.CONTAINER
HOST = CgroupStatus.HOST
CONFLICT = CgroupStatus.CONFLICT
INVALID = CgroupStatus.INVALID

# IDs from SPIRE's testdata (spec section 4).
UID_2C = "2c48913c-b29f-11e7-9350-020968147796"
CID_9B = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961"
UID_A2 = "a2830d0d-b0f0-4ff0-81b5-0ee4e299cf80"
CID_09 = "09bc3d7ade839efec32b6bec4ec79d099027a668ddba043083ec21d3c3b8f1e6"
KIND_HOST = "93529524695bb00d91c1f6dba692ea8d3550c3b94fb2463af7bc9ec82f992d26"
UID_00 = "00000000-1111-2222-3333-444444444444"
CID_01 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
CID_76 = "7654321089abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
CID_FE = "fedcba98765432100123456789abcdef0123456789abcdef0123456789abcdef"
UID_72 = "72f7f152-440c-66ac-9084-e0fc1d8a910c"
CID_B2 = "b2a10285" + "0" * 56  # the code comment elides the rest
UID_05 = "055a09a0-eef1-43da-84a8-330ee9a68c52"
CID_D5 = "d504cebc" + "1" * 56  # the issue elides the rest
CID_45 = "45490e76" + "2" * 56


def v1_file(path: str, *, unified: str | None = None) -> str:
    """A cgroup v1 file with every controller at ``path`` (and a cgroup2 line, if given)."""
    controllers = ["name=systemd", "pids", "hugetlb", "net_cls,net_prio", "perf_event",
                   "freezer", "devices", "memory", "blkio", "cpu,cpuacct", "cpuset"]
    lines = [f"{len(controllers) - i}:{c}:{path}" for i, c in enumerate(controllers)]
    if unified is not None:
        lines.append(f"0::{unified}")
    return "\n".join(lines) + "\n"


KIND_FILE = v1_file(
    f"/docker/{KIND_HOST}/kubepods/besteffort/pod{UID_A2}/{CID_09}",
    unified=f"/docker/{KIND_HOST}/system.slice/containerd.service")

SYSTEMD_CRIO_FILE = (
    "12:hugetlb:/kubepods.slice/kubepods-besteffort.slice/"
    "kubepods-besteffort-poda2830d0d_b0f0_4ff0_81b5_0ee4e299cf80.slice/"
    f"crio-{CID_09}.scope\n"
    "3:rdma:/\n"
    "1:systemd:/kubepods.slice/kubepods-besteffort.slice/"
    "kubepods-besteffort-poda2830d0d_b0f0_4ff0_81b5_0ee4e299cf80.slice/"
    f"crio-{CID_09}.scope\n"
    "0::/system.slice/crio.service\n"
)

KUBELET_SLICE = ("/kubelet.slice/kubelet-kubepods.slice/"
                 "kubelet-kubepods-pod00000000_1111_2222_3333_444444444444.slice/"
                 f"cri-containerd-{CID_01}.scope")

NOT_IN_POD_FILE = ("1:name=systemd:/user.slice/user-1000.slice/session-2.scope\n"
                   "10:devices:/user.slice\n"
                   "0::/system.slice/containerd.service\n")

IN_POD = [
    pytest.param(f"11:hugetlb:/kubepods/burstable/pod{UID_2C}/{CID_9B}\n", UID_2C, CID_9B,
                 id="cgroupfs-v1-burstable"),
    pytest.param(v1_file(f"/kubepods/burstable/pod{UID_2C}/{CID_9B}", unified="/"),
                 UID_2C, CID_9B, id="cgroupfs-hybrid-full-file"),
    pytest.param(v1_file(f"/kubepods/pod{UID_2C}/{CID_9B}"), UID_2C, CID_9B,
                 id="cgroupfs-v1-guaranteed"),
    pytest.param(v1_file(f"/kubepods/besteffort/pod{UID_2C}/{CID_9B}"), UID_2C, CID_9B,
                 id="cgroupfs-v1-besteffort"),
    pytest.param(f"3:cpu:/kubepods/kubepods/besteffort/pod{UID_2C}/{CID_9B}\n", UID_2C,
                 CID_9B, id="docker-for-desktop"),
    pytest.param(KIND_FILE, UID_A2, CID_09, id="kind-nested-docker"),
    pytest.param(
        "\n".join(reversed(KIND_FILE.splitlines())), UID_A2, CID_09,
        id="kind-docker-line-first"),
    pytest.param(
        v1_file("/kubepods.slice/kubepods-burstable.slice/"
                f"kubepods-burstable-pod{UID_2C}.slice/docker-{CID_9B}.scope"),
        UID_2C, CID_9B, id="systemd-v1-docker-dashed-uid"),
    pytest.param(SYSTEMD_CRIO_FILE, UID_A2, CID_09, id="systemd-crio-underscored-uid"),
    pytest.param(f"0::{KUBELET_SLICE}\n1:name=systemd:{KUBELET_SLICE}\n", UID_00, CID_01,
                 id="kubelet-slice-containerd"),
    pytest.param(
        "0::/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod72f7f152_440c_66ac_9084_e0fc1d8a910c.slice:cri-containerd:"
        f"{CID_B2}\n", UID_72, CID_B2, id="systemd-colon-form"),
    pytest.param(
        "0::/kubepods.slice/kubepods-pod72f7f152_440c_66ac_9084_e0fc1d8a910c.slice/"
        f"cri-containerd-{CID_B2}.scope\n", UID_72, CID_B2, id="systemd-v2-guaranteed"),
    pytest.param(
        "0::/../../kubelet-kubepods-besteffort.slice/"
        "kubelet-kubepods-besteffort-pod00000000_1111_2222_3333_444444444444.slice/"
        f"cri-containerd-{CID_01}.scope\n", UID_00, CID_01, id="v2-cgroupns-relative"),
    pytest.param(f"0::/../../pod{UID_05}/{CID_D5}\n", UID_05, CID_D5,
                 id="v2-cgroupns-cgroupfs-issue-2578"),
    pytest.param(f"0::{KUBELET_SLICE}\n1:name=systemd:/fake/just/to/test/condition/"
                 f"cri-containerd-{CID_FE}.scope\n", UID_00, CID_01,
                 id="pod-entry-overrides-podless-entry"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B}/extra\n", UID_2C, CID_9B,
                 id="segments-after-the-container"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B}\r\n", UID_2C, CID_9B, id="crlf"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B}", UID_2C, CID_9B,
                 id="no-final-newline"),
    pytest.param(f"0::/kubepods/pod2c48913c_b29f-11e7_9350-020968147796/{CID_9B}\n", UID_2C,
                 CID_9B, id="mixed-separators"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/crio-conmon-{CID_9B}.scope\n", UID_2C, CID_9B,
                 id="crio-conmon"),
    pytest.param(f"5:cpu:extra:/kubepods/pod{UID_2C}/{CID_9B}\n", UID_2C, CID_9B,
                 id="colons-after-the-second-belong-to-the-path"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/\N{LATIN SMALL LETTER E WITH ACUTE}{CID_9B}\n",
                 UID_2C, CID_9B, id="non-ascii-is-a-word-boundary-as-in-go"),
]


@pytest.mark.parametrize(("text", "pod_uid", "container_id"), IN_POD)
def test_pod_shapes(text: str, pod_uid: str, container_id: str) -> None:
    info = parse_cgroup_file(text)
    assert info == CgroupInfo(pod_uid, container_id, POD)
    assert info.in_pod and info.attestable
    assert parse_cgroup_file(text.encode()) == info


CONTAINER_ONLY = [
    pytest.param(f"0::/../crio-{CID_45}.scope\n", CID_45, id="crio-in-cgroupns-no-uid"),
    pytest.param(f"0::/../{CID_01}\n", CID_01, id="cgroup-primary-testdata"),
    pytest.param(f"0::/docker/{CID_01}\n", CID_01, id="plain-docker-v2"),
    pytest.param(f"0::/system.slice/docker-{CID_01}.scope\n", CID_01, id="docker-systemd"),
    pytest.param(f"0::/kubepods/pod{UID_2C}//{CID_9B}\n", CID_9B,
                 id="empty-segment-ends-the-walk"),
    pytest.param(f"0::/kubepods/{CID_9B}/pod{UID_2C}\n", CID_9B,
                 id="pod-after-container-is-not-looked-at"),
    pytest.param(f"0::/kubepods/xpod{UID_2C}/{CID_9B}\n", CID_9B, id="pod-needs-boundary"),
    pytest.param(f"0::/kubepods/burstable_pod{UID_2C}/{CID_9B}\n", CID_9B,
                 id="underscore-is-a-word-char"),
    pytest.param(f"0::/kubepods/Pod{UID_2C}/{CID_9B}\n", CID_9B, id="pod-is-case-sensitive"),
    pytest.param(f"0::/kubepods/{UID_2C}/{CID_9B}\n", CID_9B, id="missing-pod-prefix"),
    pytest.param(f"0::/kubepods/pod{UID_2C[:-1]}/{CID_9B}\n", CID_9B, id="uid-11-in-last"),
    pytest.param(f"0::/kubepods/pod{UID_2C}0/{CID_9B}\n", CID_9B, id="uid-13-in-last"),
    pytest.param(f"0::/kubepods/pod{UID_2C.replace('-', '.', 1)}/{CID_9B}\n", CID_9B,
                 id="uid-wrong-separator"),
]


@pytest.mark.parametrize(("text", "container_id"), CONTAINER_ONLY)
def test_container_without_pod(text: str, container_id: str) -> None:
    info = parse_cgroup_file(text)
    assert info == CgroupInfo(None, container_id, CONTAINER)
    assert not info.in_pod and info.attestable


HOST_FILES = [
    pytest.param(NOT_IN_POD_FILE, id="spire-not-in-pod"),
    pytest.param("", id="empty-file"),
    pytest.param("0::/\n", id="v2-root"),
    pytest.param(f"0::/kubepods/pod{UID_2C}\n", id="pod-without-container"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B[:-1]}\n", id="63-hex"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B}a\n", id="65-hex"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B}{CID_9B}\n", id="128-hex"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/x{CID_9B}\n", id="word-char-before-id"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B}_.scope\n", id="word-char-after-id"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B}/\n", id="trailing-slash-ends-walk"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B[:-1]}\N{CYRILLIC SMALL LETTER A}\n",
                 id="unicode-lookalike"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B[:-1]}\N{FULLWIDTH DIGIT ONE}\n",
                 id="fullwidth-digit"),
]


@pytest.mark.parametrize("text", HOST_FILES)
def test_not_in_a_container(text: str) -> None:
    assert parse_cgroup_file(text) == CgroupInfo(None, None, HOST)


CONFLICTS = [
    pytest.param(f"0::{KUBELET_SLICE}\n1:name=systemd:{KUBELET_SLICE.replace(CID_01, CID_76)}\n",
                 "multiple container IDs", id="spire-container-id-conflict"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B}\n1:cpu:/kubepods/pod{UID_A2}/{CID_9B}\n",
                 "multiple pod UIDs", id="pod-uid-conflict"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B}\n1:cpu:/kubepods/pod{UID_A2}/{CID_09}\n",
                 "multiple pod UIDs", id="two-pods"),
    pytest.param(f"0::/docker/{CID_01}\n1:cpu:/docker/{CID_76}\n", "multiple container IDs",
                 id="two-plain-containers"),
    # SPIRE's rule, kept: once a container without a pod is chosen, a later line naming no
    # container at all also conflicts (e.g. plain docker on a hybrid host).
    pytest.param(f"1:cpu:/docker/{CID_01}\n0::/\n", "multiple container IDs",
                 id="podless-container-then-nothing"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B}\n"
                 f"1:cpu:/kubepods/pod{UID_2C.upper()}/{CID_9B.upper()}\n",
                 "multiple pod UIDs", id="upper-case-still-conflicts"),
]


@pytest.mark.parametrize(("text", "words"), CONFLICTS)
def test_conflicts_are_not_attestable(text: str, words: str) -> None:
    info = parse_cgroup_file(text)
    assert info.status is CONFLICT
    assert info.pod_uid is None and info.container_id is None
    assert words in info.detail
    assert not info.in_pod and not info.attestable


INVALID_FILES = [
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B}\n\n1:cpu:/\n", "line 2",
                 id="empty-line-in-the-middle"),
    pytest.param("\n", "line 1", id="a-lone-newline"),
    pytest.param(f"cpu:/kubepods/pod{UID_2C}/{CID_9B}\n", "line 1", id="one-colon"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B}\nrubbish\n", "line 2", id="rubbish"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B}\n\n", "line 2",
                 id="two-final-newlines"),
    pytest.param(f"0::/kubepods/pod{UID_2C}/{CID_9B.upper()}\n", "upper-case",
                 id="upper-case-container-id"),
    pytest.param(f"0::/kubepods/pod{UID_2C.upper()}/{CID_9B}\n", "upper-case",
                 id="upper-case-pod-uid"),
    pytest.param(f"0::/docker/{CID_9B.upper()}\n", "upper-case",
                 id="upper-case-podless-container"),
]


@pytest.mark.parametrize(("text", "words"), INVALID_FILES)
def test_unparseable_files_are_not_in_a_pod(text: str, words: str) -> None:
    info = parse_cgroup_file(text)
    assert info.status is INVALID
    assert info.pod_uid is None and info.container_id is None
    assert words in info.detail
    assert not info.in_pod and not info.attestable


def test_undecodable_bytes_do_not_break_parsing() -> None:
    raw = f"0::/kubepods/pod{UID_2C}/".encode() + b"\xff\xfe" + CID_9B.encode() + b"\n"
    assert parse_cgroup_file(raw) == CgroupInfo(UID_2C, CID_9B, POD)
    assert parse_cgroup_file(b"\xff:\xfe:\xfd\n").status is HOST


@pytest.mark.parametrize(("path", "expected"), [
    ("/", (None, None)),
    ("", (None, None)),
    (f"/kubepods/pod{UID_2C}/{CID_9B}", (UID_2C, CID_9B)),
    (f"kubepods/pod{UID_2C}/{CID_9B}", (UID_2C, CID_9B)),  # relative, no leading slash
    (f"pod{UID_2C}:{CID_9B}", (UID_2C, CID_9B)),
    (f"{CID_9B}", (None, CID_9B)),
    (f"/{CID_01}:{CID_9B}", (None, CID_01)),  # leftmost ID of the segment
    (f"/pod{UID_2C}-pod{UID_A2}-{CID_9B}", (UID_2C, CID_9B)),  # leftmost UID of the segment
    (f"/pod{UID_A2}/pod{UID_2C}-{CID_9B}", (UID_2C, CID_9B)),  # same segment first
    (f"/pod{UID_A2}/x/{CID_9B}", (UID_A2, CID_9B)),  # any distance back
    (f"/pod{UID_2C}/{CID_9B.upper()}", (UID_2C, CID_9B.upper())),  # case kept here
])
def test_parse_cgroup_path(path: str, expected: tuple[str | None, str | None]) -> None:
    assert parse_cgroup_path(path) == expected


@pytest.mark.parametrize(("text", "ok"), [
    (UID_2C, True),
    (UID_00, True),
    (UID_2C.upper(), False),
    (UID_2C.replace("-", "_"), False),
    (UID_2C[:-1], False),
    (UID_2C + "0", False),
    ("", False),
    (f"pod{UID_2C}", False),
])
def test_is_pod_uid(text: str, ok: bool) -> None:
    assert is_pod_uid(text) is ok

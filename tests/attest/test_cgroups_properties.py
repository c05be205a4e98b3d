"""Property tests: the cgroup parser never raises, finds exactly the documented shapes, and
turns down near misses."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from hypothesis import assume, example, given
from hypothesis import strategies as st

from agent.attest.cgroups import CgroupInfo, CgroupStatus, parse_cgroup_file

HEX = "0123456789abcdef"
container_ids = st.text(alphabet=HEX, min_size=64, max_size=64)
pod_uids = st.uuids().map(str)

V1_CONTROLLERS = ["name=systemd", "systemd", "pids", "hugetlb", "net_cls,net_prio",
                  "perf_event", "freezer", "devices", "memory", "blkio", "cpu,cpuacct",
                  "cpuset", "rdma", "misc"]


@dataclass(frozen=True)
class Shape:
    """One process's cgroup file as a kubelet and runtime would write it."""

    pod_uid: str
    container_id: str
    path: str
    text: str


def _uid_in_path(uid: str, separators: list[str]) -> str:
    groups = uid.split("-")
    return groups[0] + "".join(sep + group for sep, group in zip(separators, groups[1:],
                                                                  strict=True))


@st.composite
def pod_paths(draw: st.DrawFn, uid: str, cid: str) -> str:
    """A pod container's cgroup path in any documented driver/QoS/runtime/prefix shape."""
    driver = draw(st.sampled_from(["systemd", "cgroupfs"]))
    qos = draw(st.sampled_from(["", "burstable", "besteffort"]))  # "" = Guaranteed
    runtime = draw(st.sampled_from(["cri-containerd", "crio", "docker"]))
    prefix = draw(st.sampled_from(["", "kind", "cgroupns", "cgroupns-deep"]))
    if driver == "systemd":
        seps = draw(st.sampled_from([["_"] * 4, ["-"] * 4]) | st.lists(
            st.sampled_from("-_"), min_size=4, max_size=4))
        kubelet = draw(st.booleans())
        base = "kubelet-kubepods" if kubelet else "kubepods"
        slices = [f"{base}.slice"] if not kubelet else ["kubelet.slice", "kubelet-kubepods.slice"]
        if qos:
            slices.append(f"{base}-{qos}.slice")
        pod_slice = f"{base}-{qos + '-' if qos else ''}pod{_uid_in_path(uid, seps)}.slice"
        if draw(st.booleans()):
            segments = [*slices, f"{pod_slice}:{runtime}:{cid}"]  # the colon form
        else:
            segments = [*slices, pod_slice, f"{runtime}-{cid}.scope"]
    else:
        seps = draw(st.sampled_from([["-"] * 4]) | st.lists(
            st.sampled_from("-_"), min_size=4, max_size=4))
        top = draw(st.sampled_from([["kubepods"], ["kubepods", "kubepods"]]))  # docker desktop
        container = draw(st.sampled_from([cid, f"crio-{cid}", f"crio-{cid}.scope"]))
        segments = [*top, *([qos] if qos else []), f"pod{_uid_in_path(uid, seps)}", container]
    if prefix == "kind":
        segments = ["docker", draw(container_ids), *segments]
    elif prefix == "cgroupns":
        segments = ["..", "..", *segments[1:]]  # the kubepods root is above the namespace
    elif prefix == "cgroupns-deep":
        segments = ["..", "..", "..", *segments]
    return "/" + "/".join(segments)


@st.composite
def pod_files(draw: st.DrawFn) -> Shape:
    """A whole /proc/<pid>/cgroup file (v1, v2 or hybrid) for a process in a pod."""
    uid, cid = draw(pod_uids), draw(container_ids)
    path = draw(pod_paths(uid, cid))
    version = draw(st.sampled_from(["v1", "v2", "hybrid", "hybrid-v2-used"]))
    lines: list[str] = []
    if version != "v2":
        controllers = draw(st.lists(st.sampled_from(V1_CONTROLLERS), min_size=1, max_size=12,
                                    unique=True))
        in_pod = draw(st.lists(st.booleans(), min_size=len(controllers),
                               max_size=len(controllers)))
        in_pod[0] = True
        # The kernel lists v1 hierarchies newest first and cgroup2 ("0::") last. Order
        # matters to SPIRE's rules (see test_conflicts_are_not_attestable), so keep it.
        for number, (controller, inside) in enumerate(zip(controllers, in_pod, strict=True)):
            lines.append(f"{len(controllers) - number}:{controller}:{path if inside else '/'}")
    if version in ("v2", "hybrid-v2-used"):
        lines.append(f"0::{path}")
    elif version == "hybrid":
        other = draw(st.sampled_from(["/", "/system.slice/containerd.service",
                                      "/docker/" + draw(container_ids) + "/system.slice"]))
        lines.append(f"0::{other}")
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    final = newline if draw(st.booleans()) else ""  # the last newline is optional
    return Shape(uid, cid, path, newline.join(lines) + final)


# -- the parser never raises, and what it returns is always well formed -------------------

CANONICAL_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _well_formed(info: CgroupInfo, text: str) -> None:
    if info.status is CgroupStatus.POD:
        assert info.pod_uid is not None and CANONICAL_UID.fullmatch(info.pod_uid)
        assert info.container_id is not None and info.container_id in text
        assert info.pod_uid[-12:] in text
    elif info.status is CgroupStatus.CONTAINER:
        assert info.pod_uid is None
        assert info.container_id is not None and re.fullmatch("[0-9a-f]{64}", info.container_id)
    else:
        assert info.pod_uid is None and info.container_id is None
    assert info.in_pod is (info.status is CgroupStatus.POD)
    assert bool(info.detail) is (not info.attestable)


@given(st.text())
def test_arbitrary_text_never_raises(text: str) -> None:
    _well_formed(parse_cgroup_file(text), text)


@given(st.binary())
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    _well_formed(parse_cgroup_file(data), data.decode("utf-8", "surrogateescape"))


CGROUPISH = st.text(alphabet=HEX + "ABCDEF-_/:.\n\r podkubescrio\u00e9\u0430\uff11", max_size=400)


@given(CGROUPISH)
@example("0::/pod00000000-0000-0000-0000-000000000000/" + "0" * 64)
def test_cgroup_like_text_never_raises(text: str) -> None:
    _well_formed(parse_cgroup_file(text), text)


@given(st.lists(st.one_of(pod_files().map(lambda s: s.text), CGROUPISH), max_size=4))
def test_spliced_files_never_raise(parts: list[str]) -> None:
    text = "".join(parts)
    _well_formed(parse_cgroup_file(text), text)


# -- every documented shape is found, exactly ----------------------------------------------

@given(pod_files())
def test_every_documented_shape_is_found(shape: Shape) -> None:
    assert parse_cgroup_file(shape.text) == CgroupInfo(shape.pod_uid, shape.container_id,
                                                       CgroupStatus.POD)
    assert parse_cgroup_file(shape.text.encode()) == CgroupInfo(
        shape.pod_uid, shape.container_id, CgroupStatus.POD)


@given(pod_files(), pod_files())
def test_two_different_pods_conflict(first: Shape, second: Shape) -> None:
    assume(first.pod_uid != second.pod_uid)
    text = f"7:pids:{first.path}\n0::{second.path}\n"
    info = parse_cgroup_file(text)
    assert info.status is CgroupStatus.CONFLICT
    assert "multiple pod UIDs" in info.detail


@given(pod_files(), container_ids)
def test_same_pod_other_container_conflicts(shape: Shape, other: str) -> None:
    assume(other != shape.container_id)
    text = f"7:pids:{shape.path}\n0::{shape.path.replace(shape.container_id, other)}\n"
    info = parse_cgroup_file(text)
    assert info.status is CgroupStatus.CONFLICT
    assert "multiple container IDs" in info.detail


# -- near misses are turned down -----------------------------------------------------------

def _v2(path: str) -> str:
    return f"0::{path}\n"


def _assert_rejected(text: str) -> CgroupInfo:
    info = parse_cgroup_file(text)
    assert not info.in_pod, (text, info)
    assert info.pod_uid is None
    return info


@given(pod_files(), st.sampled_from([63, 65]), st.sampled_from(HEX))
def test_container_id_of_wrong_length_is_not_found(shape: Shape, length: int,
                                                   pad: str) -> None:
    wrong = (shape.container_id + pad)[:length]
    info = _assert_rejected(_v2(shape.path.replace(shape.container_id, wrong)))
    assert info.container_id != wrong


@given(pod_files(), st.data())
def test_upper_case_hex_is_rejected(shape: Shape, data: st.DataObject) -> None:
    which = data.draw(st.sampled_from(["container", "pod"]))
    if which == "container":
        assume(any(c in "abcdef" for c in shape.container_id))
        text = shape.text.replace(shape.container_id, shape.container_id.upper())
    else:
        assume(any(c in "abcdef" for c in shape.pod_uid))
        # Every rendering (dashes or underscores) of the UID, upper-cased.
        text = re.sub(r"pod[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}"
                      r"[-_][0-9a-f]{12}", lambda m: "pod" + m.group(0)[3:].upper(), shape.text)
    info = _assert_rejected(text)
    assert info.status is CgroupStatus.INVALID


@st.composite
def broken_uids(draw: st.DrawFn, uid: str) -> str:
    """A pod UID with one group a character short or long, or a bad separator."""
    groups = uid.split("-")
    kind = draw(st.sampled_from(["short", "long", "separator"]))
    index = draw(st.integers(0, 4))
    if kind == "short":
        groups[index] = groups[index][:-1]
        return "-".join(groups)
    if kind == "long":
        groups[index] += draw(st.sampled_from(HEX))
        return "-".join(groups)
    sep = draw(st.sampled_from([".", ":", "", " ", "--", "\u2010", "+"]))
    seps = ["-"] * 4
    seps[draw(st.integers(0, 3))] = sep
    return _uid_in_path(uid, seps)


@given(st.data(), pod_uids, container_ids)
def test_malformed_pod_uid_is_not_a_pod(data: st.DataObject, uid: str, cid: str) -> None:
    broken = data.draw(broken_uids(uid))
    info = _assert_rejected(_v2(f"/kubepods/burstable/pod{broken}/{cid}"))
    assert info == CgroupInfo(None, cid, CgroupStatus.CONTAINER)
    systemd = broken.replace("-", "_")
    info = _assert_rejected(_v2(
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd}.slice/"
        f"cri-containerd-{cid}.scope"))
    assert info == CgroupInfo(None, cid, CgroupStatus.CONTAINER)


@given(pod_uids, container_ids, st.sampled_from(["", "x", "X", "_", "9", "Pod", "POD", "p0d"]))
def test_missing_or_wrong_pod_prefix(uid: str, cid: str, prefix: str) -> None:
    info = _assert_rejected(_v2(f"/kubepods/{prefix}{uid}/{cid}"))
    assert info == CgroupInfo(None, cid, CgroupStatus.CONTAINER)


@given(pod_uids, container_ids, st.sampled_from(string.ascii_letters + string.digits + "_"))
def test_word_character_glued_to_pod_prefix(uid: str, cid: str, glue: str) -> None:
    _assert_rejected(_v2(f"/kubepods/{glue}pod{uid}/{cid}"))


@given(pod_uids, container_ids, st.sampled_from(["\u0430", "\uff10", "\u0660", "g", "G", "\u00e9"]),
       st.integers(0, 63))
def test_non_hex_in_container_id(uid: str, cid: str, bad: str, index: int) -> None:
    wrong = cid[:index] + bad + cid[index + 1:]
    info = _assert_rejected(_v2(f"/kubepods/pod{uid}/{wrong}"))
    assert info.status is CgroupStatus.HOST


@given(pod_uids, container_ids, st.sampled_from(["\u0430", "\uff10", "g", "\u00e9"]),
       st.integers(0, 35))
def test_non_hex_in_pod_uid(uid: str, cid: str, bad: str, index: int) -> None:
    assume(uid[index] != "-")
    wrong = uid[:index] + bad + uid[index + 1:]
    info = _assert_rejected(_v2(f"/kubepods/pod{wrong}/{cid}"))
    assert info == CgroupInfo(None, cid, CgroupStatus.CONTAINER)


@given(pod_files())
def test_path_with_too_few_colons_makes_the_file_invalid(shape: Shape) -> None:
    assume(":" not in shape.path)
    info = _assert_rejected(shape.text.rstrip("\r\n") + f"\n0:{shape.path}\n")
    assert info.status is CgroupStatus.INVALID


@given(pod_files(), st.integers(min_value=0, max_value=20))
def test_empty_line_inside_the_file_makes_it_invalid(shape: Shape, position: int) -> None:
    lines = shape.text.replace("\r\n", "\n").rstrip("\n").split("\n")
    lines.insert(min(position, len(lines)), "")
    info = _assert_rejected("\n".join(lines) + "\n")
    assert info.status is CgroupStatus.INVALID


@given(pod_files(), st.sampled_from(["x", "_", "0", "a"]))
def test_word_character_glued_to_container_id(shape: Shape, glue: str) -> None:
    glued = _v2(shape.path.replace(shape.container_id, shape.container_id + glue))
    info = _assert_rejected(glued)
    assert info.container_id != shape.container_id

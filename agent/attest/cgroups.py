"""Pure parser for /proc/<pid>/cgroup: which Kubernetes pod and container a process is in.

It follows SPIRE's k8s workload attestor (the "new container locator") so that we and the
SPIRE agent agree about every process, and it never raises on any input.

Per line (``hierarchy-id:controllers:path``, split on the first two colons) the path's
segments are walked from the end:

* the container ID is the leftmost 64-hex-digit word (``\\b[0-9a-fA-F]{64}\\b`` with ASCII
  word boundaries, as in Go's RE2) of the last segment that has one; that segment is cut
  just before the ID;
* the pod UID is then looked for, from the cut segment backwards, as
  ``\\bpod<8>-<4>-<4>-<4>-<12>\\b`` (hex groups, each separator ``-`` or ``_``); underscores,
  which the systemd cgroup driver writes for dashes, become dashes again;
* no container ID means no pod UID is looked for; an empty segment (a leading ``/``, a
  doubled or trailing ``/``) ends the walk, as ``path.Split`` does in Go.

Across lines an entry with a pod UID overrides entries without one (kind on macOS puts the
docker host's container beside the pod); two different pod UIDs, or a container ID that
differs from the one already chosen (including "none"), make the file ambiguous.

Decisions that differ from SPIRE, both on the safe side:

* a line with fewer than three fields (including an empty line in the middle of the file)
  is an error in SPIRE; here the whole file is :attr:`CgroupStatus.INVALID`, which means
  "not in a pod" (no pod is ever claimed for it);
* SPIRE's ``[[:xdigit:]]`` also matches upper-case hex, and the IDs it finds that way can
  never match the kubelet (pod UIDs and container IDs are lower-case), so SPIRE would
  end with an error; here such a result is :attr:`CgroupStatus.INVALID` as well. Upper-case
  words still take part in the conflict rules exactly as in SPIRE.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = [
    "CgroupInfo",
    "CgroupStatus",
    "is_pod_uid",
    "parse_cgroup_file",
    "parse_cgroup_path",
]

# re.ASCII makes \b mean what it means in Go's RE2: [0-9A-Za-z_] on one side only.
_CONTAINER_ID = re.compile(r"\b([0-9a-fA-F]{64})\b", re.ASCII)
_POD_UID = re.compile(
    r"\bpod([0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}"
    r"[-_][0-9a-fA-F]{12})\b",
    re.ASCII,
)
_CANONICAL_CONTAINER_ID = re.compile(r"[0-9a-f]{64}", re.ASCII)
_CANONICAL_POD_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                                re.ASCII)


class CgroupStatus(enum.Enum):
    """What a cgroup file says about its process."""

    POD = "pod"
    """A container of a pod: both ``pod_uid`` and ``container_id`` are set."""
    CONTAINER = "container"
    """A container ID but no pod UID (e.g. plain docker, or cri-o inside a cgroup namespace)."""
    HOST = "host"
    """No container ID anywhere: a host process (or an exited one, whose cgroups are gone)."""
    CONFLICT = "conflict"
    """Different pod UIDs or container IDs on different lines: not attestable."""
    INVALID = "invalid"
    """Not a cgroup file we understand (a line with < 3 fields, upper-case IDs)."""


@dataclass(frozen=True)
class CgroupInfo:
    """The outcome of parsing one /proc/<pid>/cgroup file.

    ``pod_uid`` (canonical, dashed, lower-case) and ``container_id`` (64 lower-case hex
    digits) are only ever set for :attr:`CgroupStatus.POD` and :attr:`CgroupStatus.CONTAINER`;
    ``detail`` explains CONFLICT and INVALID in words an operator can act on.
    """

    pod_uid: str | None
    container_id: str | None
    status: CgroupStatus
    detail: str = ""

    @property
    def in_pod(self) -> bool:
        return self.status is CgroupStatus.POD

    @property
    def attestable(self) -> bool:
        """False when the file was ambiguous or unparseable."""
        return self.status not in (CgroupStatus.CONFLICT, CgroupStatus.INVALID)


_HOST = CgroupInfo(None, None, CgroupStatus.HOST)


def is_pod_uid(text: str) -> bool:
    """True for a canonical Kubernetes pod UID: lower-case hex, 8-4-4-4-12, with dashes."""
    return _CANONICAL_POD_UID.fullmatch(text) is not None


def is_container_id(text: str) -> bool:
    """True for a container ID as this package reports it: 64 lower-case hex digits."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def parse_cgroup_path(path: str) -> tuple[str | None, str | None]:
    """One cgroup path -> ``(pod_uid, container_id)`` as SPIRE's extractor finds them.

    Case is kept (upper-case hex is normalised away only by :func:`parse_cgroup_file`);
    underscores in the pod UID are turned into dashes.
    """
    segments = path.split("/")
    index = len(segments) - 1
    container_id: str | None = None
    remainder = ""
    while index >= 0 and segments[index]:
        found = _CONTAINER_ID.search(segments[index])
        if found is not None:
            container_id = found.group(1)
            remainder = segments[index][: found.start(1)]
            break
        index -= 1
    if container_id is None:
        return None, None
    # What is left of the container's segment is searched first, then the segments before.
    candidates = [remainder] if remainder else []
    index -= 1
    while index >= 0 and segments[index]:
        candidates.append(segments[index])
        index -= 1
    for segment in candidates:
        found = _POD_UID.search(segment)
        if found is not None:
            return found.group(1).replace("_", "-"), container_id
    return None, container_id


def _lines(text: str) -> list[str]:
    """Lines as Go's bufio.ScanLines yields them: no empty token after a final newline,
    one trailing carriage return dropped per line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def parse_cgroup_file(text: str | bytes) -> CgroupInfo:
    """Parses the contents of /proc/<pid>/cgroup; never raises.

    ``bytes`` are decoded as UTF-8 with ``surrogateescape``, so undecodable bytes act as
    non-word characters, as they do for Go's regexp.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    pod_uid = ""
    container_id = ""
    for number, line in enumerate(_lines(text), start=1):
        fields = line.split(":", 2)
        if len(fields) < 3:
            return CgroupInfo(
                None, None, CgroupStatus.INVALID,
                f"line {number} is not hierarchy-id:controllers:path: {line[:200]!r}")
        found_pod, found_container = parse_cgroup_path(fields[2])
        new_pod = found_pod or ""
        new_container = found_container or ""
        if pod_uid and not new_pod:
            continue
        if not pod_uid and new_pod:
            pod_uid, container_id = new_pod, new_container
        if new_pod and pod_uid and new_pod != pod_uid:
            return CgroupInfo(None, None, CgroupStatus.CONFLICT,
                              f"multiple pod UIDs found ({pod_uid!r}, {new_pod!r})")
        if container_id and new_container != container_id:
            return CgroupInfo(
                None, None, CgroupStatus.CONFLICT,
                f"multiple container IDs found ({container_id!r}, {new_container!r})")
        pod_uid, container_id = new_pod, new_container
    if not container_id:
        return _HOST
    if not _CANONICAL_CONTAINER_ID.fullmatch(container_id) or (
            pod_uid and not _CANONICAL_POD_UID.fullmatch(pod_uid)):
        return CgroupInfo(None, None, CgroupStatus.INVALID,
                          f"upper-case hex in container ID {container_id!r} or pod UID "
                          f"{pod_uid!r}; the kubelet only uses lower case")
    if pod_uid:
        return CgroupInfo(pod_uid, container_id, CgroupStatus.POD)
    return CgroupInfo(None, container_id, CgroupStatus.CONTAINER)

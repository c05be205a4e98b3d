"""Workload attestation of a PID from /proc, producing SPIRE's unix and k8s selectors.

Selectors dev-spire produces (each ``type:value``):

unix plugin (fails when /proc/<pid>/status cannot be read, e.g. the process is gone):
  unix:uid:<uid>                 unix:user:<name>   (when the uid resolves in the passwd db)
  unix:gid:<gid>                 unix:group:<name>  (when the gid resolves in the group db)
  (the EFFECTIVE ids, as SPIRE's unix plugin takes them: the 2nd field of Uid:/Gid:)
  unix:supplementary_gid:<gid>   unix:supplementary_group:<name>   (from the Groups: line)
  unix:path:<exe path>           (the /proc/<pid>/exe link, when readable)

k8s plugin (the container locator reads /proc/<pid>/cgroup, falling back to mountinfo):
  no container ID in any cgroup path -> no selectors and no error ("not a Kubernetes pod"),
  which is also what a PID whose /proc entry is gone gets;
  k8s:pod-uid:<uid>              k8s:container-id:<64 hex>   (dev-spire only; SPIRE has no such
                                                               selector, it resolves names instead)
  and, for a pod listed in the pods file (found by pod UID, or by container ID when the cgroup
  path carries no pod UID):
  k8s:ns:<ns>  k8s:sa:<sa>  k8s:pod-name:<name>  k8s:node-name:<node>
  k8s:pod-label:<key>:<value>    k8s:container-name:<c>  k8s:container-image:<img>
  (the last two when the pod lists that container). A container ID without a pod UID that no
  listed pod claims fails the plugin, as SPIRE's does after its kubelet polls run out.

As in SPIRE >= 1.15.2, attestation fails only when every plugin fails; a failed plugin's
selectors are dropped and logged.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

from agent.devspire.pods import PodList
from agent.model import Selector

_LOG = logging.getLogger("spiffe_delegate.devspire")

# Go's \b and [[:xdigit:]] are ASCII-only, hence re.ASCII.
_CONTAINER_ID = re.compile(r"\b([0-9A-Fa-f]{64})\b", re.ASCII)
_POD_UID = re.compile(
    r"\bpod([0-9A-Fa-f]{8}[-_][0-9A-Fa-f]{4}[-_][0-9A-Fa-f]{4}[-_][0-9A-Fa-f]{4}[-_][0-9A-Fa-f]{12})\b",
    re.ASCII)


class AttestationFailed(Exception):
    """Every workload attestor plugin failed for this PID."""


class LocatorError(Exception):
    """The cgroup data is malformed or names more than one pod or container."""


@dataclass(frozen=True)
class ContainerLocation:
    pod_uid: str = ""
    container_id: str = ""


def _split_last(path: str) -> tuple[str, str]:
    """Go's path.Split followed by trimming the directory's trailing slash."""
    head, slash, tail = path.rpartition("/")
    return (head, tail) if slash else ("", path)


def locate_in_path(cgroup_path: str) -> ContainerLocation:
    """Walks a cgroup path from its last segment: first a container ID, then a pod UID."""
    rest, segment = _split_last(cgroup_path)
    container_id = ""
    while segment:
        match = _CONTAINER_ID.search(segment)
        if match:
            container_id = match.group(1)
            segment = segment[:match.start(1)]
            break
        rest, segment = _split_last(rest)
    if not container_id:
        return ContainerLocation()
    if not segment:
        rest, segment = _split_last(rest)
    while segment:
        pod = _POD_UID.search(segment)
        if pod:
            return ContainerLocation(pod.group(1).replace("_", "-"), container_id)
        rest, segment = _split_last(rest)
    return ContainerLocation("", container_id)


class _Merger:
    """Combines per-line answers: a pod UID beats none; disagreements fail."""

    def __init__(self) -> None:
        self.pod_uid = ""
        self.container_id = ""

    def add(self, found: ContainerLocation) -> None:
        if self.pod_uid and not found.pod_uid:
            return
        if not self.pod_uid and found.pod_uid:
            self.pod_uid, self.container_id = found.pod_uid, found.container_id
        if found.pod_uid and found.pod_uid != self.pod_uid:
            raise LocatorError(f"multiple pod UIDs found ({self.pod_uid!r}, {found.pod_uid!r})")
        if self.container_id and found.container_id != self.container_id:
            raise LocatorError(
                f"multiple container IDs found ({self.container_id!r}, {found.container_id!r})")
        self.pod_uid, self.container_id = found.pod_uid, found.container_id

    def result(self) -> ContainerLocation:
        return ContainerLocation(self.pod_uid, self.container_id)


def locate_in_cgroup_file(text: str) -> ContainerLocation:
    """Parses /proc/<pid>/cgroup (v1 or v2) the way SPIRE's new container locator does."""
    merger = _Merger()
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) < 3:
            raise LocatorError(f"cgroup entry {line!r} does not have the form id:controllers:path")
        merger.add(locate_in_path(fields[2]))
    return merger.result()


def _unescape_mount_field(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def locate_in_mountinfo(text: str) -> ContainerLocation:
    """Scans cgroup/cgroup2 mounts whose root is not "/" (the fallback after the cgroup file)."""
    merger = _Merger()
    for line in text.splitlines():
        if not line.strip():
            continue
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if not sep or len(fields) < 5 or not tail:
            raise LocatorError(f"mountinfo line {line!r} is malformed")
        if tail[0] not in ("cgroup", "cgroup2"):
            continue
        root = _unescape_mount_field(fields[3])
        if root == "/":
            continue
        merger.add(locate_in_path(root))
    return merger.result()


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it does not exist (a gone process)."""
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None


@dataclass(frozen=True)
class Attestation:
    selectors: frozenset[Selector]
    location: ContainerLocation


class Attestor:
    """Runs the unix and k8s plugins on a PID under ``proc_root``."""

    def __init__(self, proc_root: str | Path = "/proc", pods: PodList | None = None) -> None:
        self.proc_root = Path(proc_root)
        self.pods = pods or PodList()

    def attest(self, pid: int) -> Attestation:
        results: list[frozenset[Selector]] = []
        errors: list[str] = []
        location = ContainerLocation()
        try:
            results.append(self.unix_selectors(pid))
        except OSError as exc:
            errors.append(f"unix: {exc}")
        try:
            location = self.locate(pid)
            results.append(self.k8s_selectors(location))
        except (LocatorError, OSError) as exc:
            errors.append(f"k8s: {exc}")
        if not results:
            raise AttestationFailed("; ".join(errors))
        for error in errors:
            _LOG.warning("pid %d: workload attestor failed, its selectors are dropped: %s",
                         pid, error)
        return Attestation(frozenset().union(*results), location)

    def unix_selectors(self, pid: int) -> frozenset[Selector]:
        status = (self.proc_root / str(pid) / "status").read_text()
        fields: dict[str, list[str]] = {}
        for line in status.splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.split()
        try:
            # SPIRE takes the second of gopsutil's [real, effective, ...] ids when there are
            # several, i.e. the effective uid and gid.
            uids, gids = fields["Uid"], fields["Gid"]
            uid = int(uids[1] if len(uids) > 1 else uids[0])
            gid = int(gids[1] if len(gids) > 1 else gids[0])
        except (KeyError, IndexError, ValueError):
            raise OSError(f"/proc/{pid}/status has no usable Uid/Gid lines") from None
        out = {Selector("unix", f"uid:{uid}"), Selector("unix", f"gid:{gid}")}
        if (user := _user_name(uid)) is not None:
            out.add(Selector("unix", f"user:{user}"))
        if (group := _group_name(gid)) is not None:
            out.add(Selector("unix", f"group:{group}"))
        for raw in fields.get("Groups", []):
            if raw.isdigit():
                out.add(Selector("unix", f"supplementary_gid:{raw}"))
                if (name := _group_name(int(raw))) is not None:
                    out.add(Selector("unix", f"supplementary_group:{name}"))
        try:
            exe = os.readlink(self.proc_root / str(pid) / "exe")
        except OSError:
            exe = ""
        if exe:
            out.add(Selector("unix", f"path:{exe}"))
        return frozenset(out)

    def locate(self, pid: int) -> ContainerLocation:
        base = self.proc_root / str(pid)
        cgroup = _read_text(base / "cgroup")
        location = locate_in_cgroup_file(cgroup) if cgroup is not None else ContainerLocation()
        if not location.container_id:
            mountinfo = _read_text(base / "mountinfo")
            if mountinfo is not None:
                location = locate_in_mountinfo(mountinfo)
        return location

    def k8s_selectors(self, location: ContainerLocation) -> frozenset[Selector]:
        if not location.container_id:
            return frozenset()  # not a Kubernetes pod
        pod = (self.pods.by_uid(location.pod_uid) if location.pod_uid
               else self.pods.by_container(location.container_id))
        if pod is None and not location.pod_uid:
            raise LocatorError("no selectors found after max poll attempts")
        out = {Selector("k8s", f"container-id:{location.container_id}")}
        out.add(Selector("k8s", f"pod-uid:{pod.uid if pod else location.pod_uid}"))
        if pod is not None:
            for name, value in (("ns", pod.namespace), ("sa", pod.service_account),
                                ("pod-name", pod.name), ("node-name", pod.node_name)):
                if value:
                    out.add(Selector("k8s", f"{name}:{value}"))
            for key, value in pod.labels:
                out.add(Selector("k8s", f"pod-label:{key}:{value}"))
            container = pod.container(location.container_id)
            if container is not None:
                if container.name:
                    out.add(Selector("k8s", f"container-name:{container.name}"))
                if container.image:
                    out.add(Selector("k8s", f"container-image:{container.image}"))
        return frozenset(out)


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None

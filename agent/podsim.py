"""Simulated Kubernetes pods made of real cgroups, with real processes in them (needs root).

Usage::

    from agent.podsim import fake_pod

    with fake_pod(qos="burstable") as pod:         # layout=None: what this machine has
        proc = pod.spawn(["sleep", "60"])          # already in the pod's cgroup when it execs
        assert ProcReader().pod_of(proc.pid) == pod.pod_uid
        envoy = pod.launcher(work_dir, "/usr/bin/envoy")   # for callers that start it later

``create_pod`` (and ``fake_pod``, the context manager built on it) creates the same
directories a kubelet would, under the real cgroup mounts found in /proc/self/mountinfo,
e.g.

* ``systemd-v1``: ``<name=systemd>/kubepods.slice/kubepods-burstable.slice/
  kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<64hex>.scope``
* ``cgroupfs-v2``: ``<cgroup2>/kubepods/burstable/pod<uid>/<64hex>``

(``systemd-v2``, ``systemd-hybrid`` (v1 name=systemd and cgroup2 together) and
``cgroupfs-v1`` as well). With ``layout=None`` the first layout this machine supports is
used (see :data:`AUTO_LAYOUTS`). The pod UID and container ID are random unless given, so
several pods (and several test runs) can exist side by side. :meth:`FakePod.close` kills
every process left in the pod's cgroups and removes the cgroups leaf first; shared parents
(``kubepods.slice``, the QoS slice) are removed only when no other pod uses them.

Only the named ``systemd`` v1 hierarchy, the ``pids`` v1 controller and cgroup2 are ever
used: other controllers (memory, cpu, ...) may belong to whatever else runs on the machine.

:class:`PodCgroupsUnavailable` is raised, saying why, when not root, when the hierarchy is
not mounted, or when the kernel refuses to create the cgroup or to move a process into it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.errors import SpiffeDelegateError

__all__ = [
    "ALLOWED_HIERARCHIES",
    "AUTO_LAYOUTS",
    "V1_PIDS",
    "V1_SYSTEMD",
    "V2",
    "FakePod",
    "Layout",
    "PodCgroupsUnavailable",
    "QoS",
    "Runtime",
    "cgroup_paths",
    "container_dir_name",
    "create_pod",
    "fake_pod",
    "find_hierarchy",
    "new_container_id",
    "new_pod_uid",
    "pod_relative_dir",
]

Layout = Literal["systemd-v1", "systemd-v2", "systemd-hybrid", "cgroupfs-v1", "cgroupfs-v2"]
QoS = Literal["guaranteed", "burstable", "besteffort"]
Runtime = Literal["containerd", "crio", "docker"]

V1_SYSTEMD = "name=systemd"
V1_PIDS = "pids"
V2 = "cgroup2"
ALLOWED_HIERARCHIES = frozenset({V1_SYSTEMD, V1_PIDS, V2})

_LAYOUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "systemd-v1": ("systemd", (V1_SYSTEMD,)),
    "systemd-v2": ("systemd", (V2,)),
    "systemd-hybrid": ("systemd", (V1_SYSTEMD, V2)),
    "cgroupfs-v1": ("cgroupfs", (V1_PIDS,)),
    "cgroupfs-v2": ("cgroupfs", (V2,)),
}
#: The order ``layout=None`` tries: a machine with the v1 ``name=systemd`` hierarchy
#: (legacy or hybrid) gets ``systemd-v1``, a cgroup2-only machine ``systemd-v2`` (then
#: ``cgroupfs-v2``), one with only the v1 ``pids`` controller ``cgroupfs-v1``. A layout
#: whose hierarchies are not mounted is passed over, and so is one where the kernel refuses
#: to create the cgroups.
AUTO_LAYOUTS: tuple[Layout, ...] = ("systemd-v1", "systemd-v2", "cgroupfs-v2", "cgroupfs-v1")
_SCOPE_PREFIX = {"containerd": "cri-containerd-", "crio": "crio-", "docker": "docker-"}
_CLEANUP_SECONDS = 10.0
_START_SECONDS = 5.0
# The exit status of a launcher whose move into the pod's cgroups failed.
_MOVE_FAILED = 111

_HINT_ROOT = "run as root"
_HINT_MOUNT = ("mount that cgroup hierarchy, or choose a layout whose hierarchies are "
               "mounted (layout=None picks one)")
_HINT_KERNEL = ("run where cgroups are writable: on the host, or in a privileged container "
                "with the cgroup mounts read-write")


class PodCgroupsUnavailable(SpiffeDelegateError):
    """This machine cannot simulate a pod: not root, the cgroup hierarchy is not mounted,
    or the kernel refused to create a cgroup or to move a process into one."""


def new_pod_uid() -> str:
    return str(uuid.uuid4())


def new_container_id() -> str:
    return secrets.token_hex(32)


def cgroup_paths(pid: int) -> list[str]:
    """The path part of every line of /proc/<pid>/cgroup."""
    text = Path(f"/proc/{pid}/cgroup").read_text()
    return [line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2]


def find_hierarchy(spec: str) -> Path | None:
    """Mount point of a cgroup hierarchy mounted at its root: ``cgroup2``, or a v1 super
    option such as ``name=systemd`` or ``pids``. None when not mounted."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        mount_fields, fs_fields = left.split(), right.split()
        if len(mount_fields) < 5 or len(fs_fields) < 3 or mount_fields[3] != "/":
            continue
        fstype, super_options = fs_fields[0], fs_fields[2].split(",")
        if (spec == V2 and fstype == "cgroup2") or (
                spec != V2 and fstype == "cgroup" and spec in super_options):
            return Path(mount_fields[4])
    return None


def pod_relative_dir(driver: str, qos: str, pod_uid: str) -> list[str]:
    """The kubelet's directories from the hierarchy root down to the pod, one per level."""
    if driver == "systemd":
        escaped = pod_uid.replace("-", "_")
        if qos == "guaranteed":
            return ["kubepods.slice", f"kubepods-pod{escaped}.slice"]
        return ["kubepods.slice", f"kubepods-{qos}.slice", f"kubepods-{qos}-pod{escaped}.slice"]
    if qos == "guaranteed":
        return ["kubepods", f"pod{pod_uid}"]
    return ["kubepods", qos, f"pod{pod_uid}"]


def container_dir_name(driver: str, runtime: str, container_id: str) -> str:
    if driver == "systemd":
        return f"{_SCOPE_PREFIX[runtime]}{container_id}.scope"
    return f"crio-{container_id}" if runtime == "crio" else container_id


@dataclass
class FakePod:
    """A pod's cgroups in one or more hierarchies; see the module docstring.

    Made by :func:`create_pod`; whoever made it calls :meth:`close`.
    """

    pod_uid: str
    container_id: str
    layout: str
    qos: str
    runtime: str
    driver: str
    hierarchies: dict[str, Path]
    containers: list[str] = field(default_factory=list)
    #: Processes killed and reaped by :meth:`close`; :meth:`spawn` adds its own, and a
    #: caller may add a process it started through :meth:`launcher`.
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def pod_dirs(self) -> list[str]:
        return pod_relative_dir(self.driver, self.qos, self.pod_uid)

    def cgroup_path(self, container_id: str | None = None) -> str:
        """The path as /proc/<pid>/cgroup shows it (outside any cgroup namespace)."""
        cid = container_id or self.container_id
        return "/" + "/".join([*self.pod_dirs, container_dir_name(self.driver, self.runtime, cid)])

    def directories(self, container_id: str | None = None) -> list[Path]:
        """The container's cgroup directory in each hierarchy."""
        relative = self.cgroup_path(container_id).lstrip("/")
        return [mount / relative for mount in self.hierarchies.values()]

    def add_container(self, container_id: str | None = None) -> str:
        """Creates a container's cgroups in this pod (a random ID if none is given);
        returns its ID. Existing containers are left as they are."""
        cid = container_id or new_container_id()
        if cid in self.containers:
            return cid
        created: list[Path] = []
        for directory in self.directories(cid):
            try:
                _makedirs(directory)
            except OSError as err:
                # Leaves made in other hierarchies go now; parents go with close().
                for leaf in created:
                    with contextlib.suppress(OSError):
                        leaf.rmdir()
                raise PodCgroupsUnavailable(
                    f"the kernel refused to create cgroup {directory}: {err}",
                    _HINT_KERNEL) from err
            created.append(directory)
        self.containers.append(cid)
        return cid

    def spawn(self, argv: Sequence[str], *, container_id: str | None = None,
              uid: int | None = None, **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Starts ``argv`` inside the container's cgroups and returns once it runs there.

        A shell moves itself into the cgroups and then execs the program (dropping to
        ``uid`` first, if given), so the program keeps one PID and never runs outside the
        pod. No Python ``preexec_fn`` is used: in a process running gRPC, a forked child
        would run gRPC's fork handlers, which can abort it (``ev_epoll1_linux.cc: Check
        failed``) and leave a dead PID; without one, subprocess uses vfork+exec.
        ``container_id`` defaults to the pod's first container; a new ID adds a container.

        Raises :class:`PodCgroupsUnavailable` when the kernel refuses the move (or
        ``uid`` is given and ``setpriv`` is missing), ``RuntimeError`` when the program
        does not start within 5 s or exits with a non-zero status before it is seen
        running (a short program that already exited with status 0 did run in the pod).
        """
        cid = self.add_container(container_id or self.container_id)
        targets = [str(d / "cgroup.procs") for d in self.directories(cid)]
        program = shutil.which(argv[0]) or argv[0]
        enter = f'for t in "$@"; do echo $$ > "$t" || exit {_MOVE_FAILED}; done; exec '
        if uid is not None:
            if shutil.which("setpriv") is None:
                raise PodCgroupsUnavailable(
                    "setpriv (util-linux) is needed to start pod processes as a user",
                    "install util-linux")
            enter += f"setpriv --reuid={uid} --regid={uid} --clear-groups -- "
        proc = subprocess.Popen(["sh", "-c", enter + shlex.join([program, *argv[1:]]), "sh",
                                 *targets], **popen_kwargs)
        self.processes.append(proc)
        deadline = time.monotonic() + _START_SECONDS
        while not _running_in(proc.pid, program, self.pod_uid, uid):
            if proc.poll() is not None:
                if proc.returncode == 0:
                    # The move succeeded (a failed one exits 111) and the program
                    # ran and finished before we looked; exec and setpriv never exit 0.
                    return proc
                if proc.returncode == _MOVE_FAILED:
                    raise PodCgroupsUnavailable(
                        f"the kernel refused to move a process into {targets}", _HINT_KERNEL)
                raise RuntimeError(f"{argv} did not start in pod {self.pod_uid} "
                                   f"(exit status {proc.returncode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv} did not start in pod {self.pod_uid} "
                                   f"within {_START_SECONDS:g}s")
            time.sleep(0.001)
        return proc

    def launcher(self, directory: Path, program: str | Path,
                 container_id: str | None = None) -> Path:
        """Writes an executable ``/bin/sh`` script in ``directory`` and returns its path.

        The script writes its own PID into every ``cgroup.procs`` of the container's
        cgroups, then execs ``program`` with the script's arguments: the program runs in
        the pod from its first instruction and keeps the launcher's PID. It is for callers
        that start the process themselves (another process manager, an Envoy wrapper);
        such a process is killed by :meth:`close` all the same, and reaped if it is a child
        of this process. A launcher whose move fails exits with status 111 without running
        ``program``.

        (A Python ``preexec_fn`` would do the same, but running Python in a child forked
        from a process with gRPC threads can crash before exec.) ``container_id`` defaults
        to the pod's first container; a new ID adds a container.
        """
        cid = self.add_container(container_id or self.container_id)
        targets = " ".join(shlex.quote(str(d / "cgroup.procs")) for d in self.directories(cid))
        text = str(program)
        # A relative path would be resolved against whatever directory the script runs in.
        target = os.path.abspath(text) if "/" in text else (shutil.which(text) or text)
        script = directory / f"in-pod-{self.pod_uid[:8]}-{cid[:12]}-{Path(text).name}"
        script.write_text("#!/bin/sh\n"
                          f'for f in {targets}; do echo $$ > "$f" || exit {_MOVE_FAILED}; '
                          "done\n"
                          f'exec {shlex.quote(target)} "$@"\n')
        script.chmod(0o755)
        return script

    def move(self, pid: int, container_id: str | None = None) -> None:
        """Moves an already running process in. It ran outside the pod until now, so
        prefer :meth:`spawn` or :meth:`launcher` where that matters.

        ``ProcessLookupError`` when there is no such process."""
        cid = self.add_container(container_id or self.container_id)
        for directory in self.directories(cid):
            try:
                (directory / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:
                raise
            except OSError as err:
                raise PodCgroupsUnavailable(
                    f"the kernel refused to move process {pid} into {directory}: {err}",
                    _HINT_KERNEL) from err

    def pids(self, container_id: str | None = None) -> list[int]:
        """PIDs in the container's cgroup, as the kernel lists them (first hierarchy)."""
        return _procs(self.directories(container_id)[0])

    def close(self) -> None:
        """Kills every process in the pod and removes its cgroups; safe to call twice.

        ``RuntimeError`` when a process would not die or a cgroup would not go."""
        errors: list[str] = []
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            try:
                proc.wait(timeout=_CLEANUP_SECONDS)
            except subprocess.TimeoutExpired:
                errors.append(f"process {proc.pid} did not die")
        self.processes.clear()
        for mount in self.hierarchies.values():
            for cid in self.containers:
                leaf = mount / self.cgroup_path(cid).lstrip("/")
                if not _empty_and_remove(leaf):
                    errors.append(f"could not remove {leaf}")
            parents = self.pod_dirs
            for depth in range(len(parents), 0, -1):
                directory = mount.joinpath(*parents[:depth])
                try:
                    directory.rmdir()
                except OSError as err:
                    # Shared parents stay while another pod uses them.
                    if err.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.ENOENT):
                        errors.append(f"could not remove {directory}: {err}")
        self.containers.clear()
        if errors:
            raise RuntimeError("fake pod cleanup failed: " + "; ".join(errors))


def create_pod(pod_uid: str | None = None, container_id: str | None = None, *,
               layout: Layout | None = None, qos: QoS = "burstable",
               runtime: Runtime = "containerd",
               hierarchies: Sequence[str] | None = None) -> FakePod:
    """A pod with one container's cgroups created; the caller must :meth:`~FakePod.close`
    it. See the module docstring.

    ``layout=None`` picks the first of :data:`AUTO_LAYOUTS` that works here.
    ``hierarchies`` overrides the layout's (e.g. ``["pids"]`` or ``["name=systemd",
    "pids"]``); only name=systemd, pids and cgroup2 are allowed.

    Raises :class:`PodCgroupsUnavailable` (not root, hierarchy not mounted, kernel refused),
    ``ValueError`` for an unknown layout or a hierarchy that is not allowed.
    """
    if layout is not None and layout not in _LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {sorted(_LAYOUTS)}")
    if hierarchies is not None:
        not_allowed = set(hierarchies) - ALLOWED_HIERARCHIES
        if not_allowed:
            raise ValueError(f"hierarchies {sorted(not_allowed)} may not be touched; "
                             f"use {sorted(ALLOWED_HIERARCHIES)}")
    if os.geteuid() != 0:
        raise PodCgroupsUnavailable(
            "simulating a pod needs root to create cgroups and move processes into them",
            _HINT_ROOT)
    uid, cid = pod_uid or new_pod_uid(), container_id or new_container_id()
    if layout is not None:
        return _create(layout, uid, cid, qos, runtime, hierarchies)
    reasons: list[str] = []
    for candidate in AUTO_LAYOUTS:
        try:
            return _create(candidate, uid, cid, qos, runtime, hierarchies)
        except PodCgroupsUnavailable as err:
            reasons.append(f"{candidate}: {err.message}")
    raise PodCgroupsUnavailable("no cgroup layout works on this machine: "
                                + "; ".join(reasons), _HINT_KERNEL)


@contextlib.contextmanager
def fake_pod(pod_uid: str | None = None, container_id: str | None = None, *,
             layout: Layout | None = None, qos: QoS = "burstable",
             runtime: Runtime = "containerd",
             hierarchies: Sequence[str] | None = None) -> Iterator[FakePod]:
    """:func:`create_pod`, closed on exit (even after an error)."""
    pod = create_pod(pod_uid, container_id, layout=layout, qos=qos, runtime=runtime,
                     hierarchies=hierarchies)
    try:
        yield pod
    finally:
        pod.close()


def _create(layout: Layout, pod_uid: str, container_id: str, qos: QoS, runtime: Runtime,
            hierarchies: Sequence[str] | None) -> FakePod:
    driver, default_hierarchies = _LAYOUTS[layout]
    wanted = tuple(hierarchies) if hierarchies is not None else default_hierarchies
    mounts: dict[str, Path] = {}
    for spec in wanted:
        mount = find_hierarchy(spec)
        if mount is None:
            raise PodCgroupsUnavailable(
                f"no cgroup hierarchy {spec!r} is mounted at its root here", _HINT_MOUNT)
        mounts[spec] = mount
    pod = FakePod(pod_uid=pod_uid, container_id=container_id, layout=layout, qos=qos,
                  runtime=runtime, driver=driver, hierarchies=mounts)
    try:
        pod.add_container(container_id)
    except BaseException:
        # Whatever was created before the refusal (a parent, another hierarchy's leaf).
        with contextlib.suppress(RuntimeError):
            pod.close()
        raise
    return pod


def _makedirs(directory: Path) -> None:
    # Another pod's cleanup may remove a shared parent between two mkdirs: try again.
    for _ in range(50):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            continue
    directory.mkdir(parents=True, exist_ok=True)


def _procs(directory: Path) -> list[int]:
    try:
        return [int(x) for x in (directory / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _empty_and_remove(leaf: Path) -> bool:
    """Kills what is left in ``leaf`` (children of spawned processes, too) and removes it."""
    deadline = time.monotonic() + _CLEANUP_SECONDS
    while time.monotonic() < deadline:
        for pid in _procs(leaf):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            # Reap it if it is ours; a zombie would keep the cgroup busy.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        try:
            leaf.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as err:
            if err.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                return False
        time.sleep(0.01)
    return False


def _running_in(pid: int, program: str, pod_uid: str, uid: int | None) -> bool:
    """True once ``pid`` is ``program`` itself (exec done), inside the pod, as ``uid``."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        status = Path(f"/proc/{pid}/status").read_text()
        cgroup = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False
    uid_line = next((line for line in status.splitlines() if line.startswith("Uid:")), "")
    in_pod = pod_uid.replace("-", "_") in cgroup or pod_uid in cgroup
    right_user = uid is None or uid_line.split()[1:2] == [str(uid)]
    return exe == os.path.realpath(program) and right_user and in_pod

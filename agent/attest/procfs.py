"""Reads who a process is from /proc (start time, real uid, pod and container), under any root.

Every read goes through :class:`ProcReader`, whose root is injectable so tests can point it
at a synthetic tree. The reader is synchronous and cheap (a few small reads per process);
asyncio callers that scan all of /proc may want ``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import logging
import os
import select
from dataclasses import dataclass
from pathlib import Path

from agent.attest.cgroups import CgroupInfo, CgroupStatus, is_pod_uid, parse_cgroup_file
from agent.errors import AttestationError

__all__ = [
    "AmbiguousCgroup",
    "ProcReader",
    "ProcUnreadable",
    "ProcessGone",
    "ProcessIdentity",
    "ProcessPlacement",
]

log = logging.getLogger("spiffe_delegate.attest")

# Errors that mean "this process is not there (any more)". ESRCH is what the kernel returns
# for reads through a /proc/<pid> directory fd whose process has been reaped.
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH, errno.ENOTDIR})
_READ_CHUNK = 65536
_PARSED_KEPT = 4096


class ProcessGone(AttestationError):
    """The process does not exist, has exited (zombie), or exited while being read."""

    def __init__(self, pid: int, why: str = "no such process") -> None:
        super().__init__(f"process {pid} is gone: {why}",
                         "it exited; a new connection or a new PID is needed")
        self.pid = pid


class AmbiguousCgroup(AttestationError):
    """/proc/<pid>/cgroup names more than one pod or container: the process is not attestable.

    SPIRE's k8s attestor refuses such a process (FailedPrecondition); so do we.
    """

    def __init__(self, pid: int, detail: str) -> None:
        super().__init__(f"process {pid} has ambiguous cgroups: {detail}",
                         "check the node's cgroup layout; the process cannot be attested")
        self.pid = pid
        self.detail = detail


class ProcUnreadable(AttestationError):
    """A /proc file exists but could not be read or parsed (permissions, hidepid, format)."""


@dataclass(frozen=True)
class ProcessIdentity:
    """What we pin about a process before asking SPIRE about it, and check again after.

    ``start_time`` is field 22 of /proc/<pid>/stat (clock ticks since boot): with ``pid`` it
    names one process for the life of the machine. ``uid`` is the real uid. ``pod_uid`` and
    ``container_id`` come from /proc/<pid>/cgroup (None for a host process; ``container_id``
    alone for a container outside any pod).
    """

    pid: int
    start_time: int
    uid: int
    pod_uid: str | None
    container_id: str | None

    @property
    def in_pod(self) -> bool:
        return self.pod_uid is not None

    def same_process(self, other: ProcessIdentity) -> bool:
        """True when ``other`` is the same process (not merely the same PID)."""
        return self.pid == other.pid and self.start_time == other.start_time


@dataclass(frozen=True)
class ProcessPlacement:
    """Which process it is (``pid`` and ``start_time``) and where it runs (``pod_uid``,
    ``container_id``): :class:`ProcessIdentity` without the uid, for re-checks."""

    pid: int
    start_time: int
    pod_uid: str | None
    container_id: str | None

    def same_process(self, other: ProcessIdentity | ProcessPlacement) -> bool:
        return self.pid == other.pid and self.start_time == other.start_time


class ProcReader:
    """The one way this package reads /proc. ``root`` is ``/proc`` or a synthetic tree.

    Errors: a missing or exited process (including a zombie) raises :class:`ProcessGone`;
    a cgroup file naming two pods or containers raises :class:`AmbiguousCgroup`; an
    unreadable or malformed stat/status raises :class:`ProcUnreadable`. All three are
    :class:`~agent.errors.AttestationError`. A cgroup file we cannot parse (a line with fewer
    than three fields) is logged and treated as "not in a pod", never raised.
    """

    def __init__(self, root: Path | str = Path("/proc")) -> None:
        self._root = Path(root)
        self._prefix = str(self._root) + "/"
        # Parsed cgroup files by content: a pod's processes share a handful of contents,
        # and a process's file is the same from one read to the next. The content is
        # always read afresh; only parsing is saved. Bounded (cleared when full).
        self._parsed: dict[bytes, CgroupInfo] = {}

    @property
    def root(self) -> Path:
        return self._root

    def __repr__(self) -> str:
        return f"ProcReader({str(self._root)!r})"

    # -- one process -------------------------------------------------------------------

    def identity(self, pid: int, pidfd: int | None = None) -> ProcessIdentity:
        """Reads stat, status and cgroup of ``pid`` as one consistent snapshot.

        The three files are read through one open /proc/<pid> directory; if that process
        exits and its PID is reused meanwhile, the reads fail (ESRCH) instead of mixing two
        processes. With ``pidfd`` (a pidfd of the process we mean) the snapshot is also
        checked to belong to that process: if the pidfd's process has exited by the end of
        the reads, :class:`ProcessGone` is raised.
        """
        start_time, status, info = self._snapshot(pid, pidfd, with_status=True)
        uid = _parse_real_uid(pid, status)
        return ProcessIdentity(pid=pid, start_time=start_time, uid=uid,
                               pod_uid=info.pod_uid, container_id=info.container_id)

    def placement(self, pid: int, pidfd: int | None = None) -> ProcessPlacement:
        """:meth:`identity` without the uid: stat and cgroup only, with the same guarantees.

        For re-checks that compare only which process it is and where it runs (its start
        time, pod and container): /proc/<pid>/status, the costliest of the three files for
        the kernel to write, is not read.
        """
        start_time, _, info = self._snapshot(pid, pidfd, with_status=False)
        return ProcessPlacement(pid=pid, start_time=start_time, pod_uid=info.pod_uid,
                                container_id=info.container_id)

    def _snapshot(self, pid: int, pidfd: int | None, *, with_status: bool
                  ) -> tuple[int, bytes, CgroupInfo]:
        """(start time, raw status or b"", parsed cgroup) through one /proc/<pid> fd."""
        _check_pid(pid)
        try:
            dir_fd = os.open(f"{self._prefix}{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise self._translate(pid, "", err) from err
        try:
            stat = self._read_at(pid, dir_fd, "stat")
            status = self._read_at(pid, dir_fd, "status") if with_status else b""
            cgroup = self._read_at(pid, dir_fd, "cgroup")
        finally:
            os.close(dir_fd)
        state, start_time = _parse_stat(pid, stat)
        if state in ("Z", "X", "x"):
            raise ProcessGone(pid, "it has exited and not been reaped yet (zombie)")
        info = self._interpret(pid, cgroup)
        if pidfd is not None and _pidfd_exited(pidfd):
            raise ProcessGone(pid, "the process the pidfd pins exited while it was being read")
        return start_time, status, info

    def start_time(self, pid: int) -> int:
        """Field 22 of /proc/<pid>/stat."""
        _check_pid(pid)
        return _parse_stat(pid, self._read(pid, "stat"))[1]

    def cgroup(self, pid: int) -> CgroupInfo:
        """The parsed /proc/<pid>/cgroup, conflicts and all (never raises for the content)."""
        _check_pid(pid)
        return self._parse_cgroup(self._read(pid, "cgroup"))

    def pod_of(self, pid: int) -> str | None:
        """The pod UID of ``pid``, or None when it is not in a pod."""
        _check_pid(pid)
        return self._interpret(pid, self._read(pid, "cgroup")).pod_uid

    # -- all processes -----------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every process (thread-group leader) under the root, ascending."""
        found: list[int] = []
        with os.scandir(self._root) as entries:
            for entry in entries:
                name = entry.name
                if name.isascii() and name.isdigit() and name[0] != "0":
                    found.append(int(name))
        found.sort()
        return found

    def pids_of_pod(self, pod_uid: str) -> list[int]:
        """Live PIDs whose cgroups put them in pod ``pod_uid`` (canonical form), ascending.

        Reads only /proc/<pid>/cgroup, once per process. Processes whose cgroups are
        ambiguous or unparseable are never included.
        """
        if not is_pod_uid(pod_uid):
            raise ValueError(f"{pod_uid!r} is not a pod UID "
                             "(lower-case hex 8-4-4-4-12 with dashes)")
        # Any representation SPIRE accepts, dashed or underscored, holds the last group as is.
        needle = pod_uid[-12:].encode("ascii")
        return [pid for pid, info in self._scan(needle) if info.pod_uid == pod_uid]

    def pods(self) -> dict[str, list[int]]:
        """Every pod with live processes: pod UID -> PIDs (ascending), from one /proc scan."""
        result: dict[str, list[int]] = {}
        for pid, info in self._scan(b"pod"):
            if info.pod_uid is not None:
                result.setdefault(info.pod_uid, []).append(pid)
        return result

    def _scan(self, needle: bytes) -> list[tuple[int, CgroupInfo]]:
        """Parses the cgroup file of every process whose raw text contains ``needle``."""
        found: list[tuple[int, CgroupInfo]] = []
        prefix = self._prefix
        for pid in self.pids():
            try:
                raw = _read_file(f"{prefix}{pid}/cgroup")
            except OSError as err:
                if err.errno not in _GONE_ERRNOS:
                    log.debug("skipping pid %d: cannot read its cgroup file: %s", pid, err)
                continue
            if needle not in raw:
                continue
            info = self._parse_cgroup(raw)
            if info.status is CgroupStatus.POD:
                found.append((pid, info))
            elif not info.attestable:
                log.debug("skipping pid %d: %s", pid, info.detail)
        return found

    # -- helpers -----------------------------------------------------------------------

    def _parse_cgroup(self, raw: bytes) -> CgroupInfo:
        info = self._parsed.get(raw)
        if info is None:
            info = parse_cgroup_file(raw)
            if len(self._parsed) >= _PARSED_KEPT:
                self._parsed.clear()
            self._parsed[raw] = info
        return info

    def _interpret(self, pid: int, raw: bytes) -> CgroupInfo:
        info = self._parse_cgroup(raw)
        if info.status is CgroupStatus.CONFLICT:
            raise AmbiguousCgroup(pid, info.detail)
        if info.status is CgroupStatus.INVALID:
            log.warning("treating process %d as not in a pod: its cgroup file is not "
                        "understood: %s", pid, info.detail)
        return info

    def _read(self, pid: int, name: str) -> bytes:
        try:
            return _read_file(f"{self._prefix}{pid}/{name}")
        except OSError as err:
            raise self._translate(pid, name, err) from err

    def _read_at(self, pid: int, dir_fd: int, name: str) -> bytes:
        try:
            return _read_file(name, dir_fd)
        except OSError as err:
            raise self._translate(pid, name, err) from err

    def _translate(self, pid: int, name: str, err: OSError) -> AttestationError:
        if err.errno in _GONE_ERRNOS:
            return ProcessGone(pid, f"{self._root / str(pid) / name} does not exist")
        return ProcUnreadable(f"cannot read {self._root / str(pid) / name}: {err.strerror}",
                              "the agent needs root (or CAP_SYS_PTRACE) and hostPID, and "
                              "/proc must not be mounted with hidepid")


def _read_file(path: str, dir_fd: int | None = None) -> bytes:
    """The whole file (proc files may need several reads)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        first = os.read(fd, _READ_CHUNK)
        if len(first) < _READ_CHUNK:
            # A short read is the end: /proc's seq files hand out everything they have
            # up to the size asked (and regular files stop short only at their end).
            # That saves one read per file, a third of the system calls of a scan.
            return first
        chunks = [first]
        while chunk := os.read(fd, _READ_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _check_pid(pid: int) -> None:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"PID must be a positive integer, not {pid!r}")


def _parse_stat(pid: int, raw: bytes) -> tuple[str, int]:
    """(state, start_time) from /proc/<pid>/stat.

    ``comm`` (field 2) is free text in parentheses and may itself hold spaces, parentheses
    and newlines, so the fixed fields are taken after the LAST ')'.
    """
    close = raw.rfind(b")")
    fields = raw[close + 1:].split() if close >= 0 else []
    # After comm: field 3 (state) is fields[0], so field 22 (starttime) is fields[19].
    if len(fields) < 20:
        raise ProcUnreadable(f"/proc/{pid}/stat is not in the kernel's format: {raw[:200]!r}")
    try:
        state = fields[0].decode("ascii")
        start_time = int(fields[19])
    except (UnicodeDecodeError, ValueError) as err:
        raise ProcUnreadable(f"/proc/{pid}/stat has a bad state or start time: "
                             f"{raw[:200]!r}") from err
    if start_time < 0:
        raise ProcUnreadable(f"/proc/{pid}/stat has a negative start time: {raw[:200]!r}")
    return state, start_time


def _parse_real_uid(pid: int, raw: bytes) -> int:
    """The real uid: the first number of the ``Uid:`` line of /proc/<pid>/status."""
    # The first line that starts with "Uid:", found without splitting the whole file:
    # with a newline put in front, every line starts after one.
    start = (b"\n" + raw).find(b"\nUid:")  # where that line starts in ``raw``, or -1
    if start >= 0:
        end = raw.find(b"\n", start)
        values = raw[start + 4:end if end >= 0 else None].split()
        if values and values[0].isdigit():
            return int(values[0])
    raise ProcUnreadable(f"/proc/{pid}/status has no valid Uid line")


def _pidfd_exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True

"""``spiffe-delegate doctor``: checks that this node is set up for the agent, and says what to
do about each thing that is not.

Facts are gathered first (one call to SPIRE for this process's own PID, one scan of /proc,
a few ``stat`` calls); each check is then a small function of those facts that returns a
:class:`CheckResult` (name, PASS/WARN/FAIL/SKIP, what was found, what to do). Run it where
the agent runs (``kubectl exec ds/spiffe-delegate -- spiffe-delegate doctor``): the same
uid, binary, pod and container, so SPIRE attests it exactly as it attests the agent, and
the same ``SPIFFE_DELEGATE_*`` variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import json
import os
import socket
import stat
import time
from collections import Counter
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from agent.attest.cgroups import CgroupInfo, CgroupStatus, parse_cgroup_file
from agent.attest.procfs import ProcessGone, ProcReader
from agent.errors import AttestationError, SpireError, SpirePermissionDenied
from agent.model import X509SvidUpdate
from agent.spire.backoff import BackoffPolicy
from agent.spire.client import DelegatedIdentityClient

__all__ = [
    "CheckResult",
    "DoctorOptions",
    "HostPidFacts",
    "ProcScan",
    "SpireAnswer",
    "Status",
    "SvidFacts",
    "ask_spire",
    "check_admin_socket",
    "check_clock",
    "check_delegate",
    "check_host_pid",
    "check_pod_cgroups",
    "check_sds_socket",
    "doctor",
    "read_host_pid",
    "render_results",
    "run_checks",
    "scan_proc",
    "socket_problem",
]

_MAX_UNIX_PATH = 107  # sun_path is 108 bytes, NUL included
_EXAMPLES = 3


class Status(enum.Enum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class CheckResult:
    """``detail``: what was found. ``advice``: what to do (empty when nothing is to do)."""

    name: str
    status: Status
    detail: str
    advice: str = ""

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail,
                "advice": self.advice}


@dataclass(frozen=True)
class DoctorOptions:
    """``timeout``: how long SPIRE may take to answer. ``max_clock_skew``: how far an SVID's
    validity may start in this clock's future. ``pod_sample``: pods attested in full."""

    spire_admin_socket: Path
    sds_socket: Path
    proc_root: Path = Path("/proc")
    timeout: float = 5.0
    max_clock_skew: float = 30.0
    pod_sample: int = 5


# --- facts: SPIRE -------------------------------------------------------------------------

@dataclass(frozen=True)
class SvidFacts:
    """The public facts of one X.509-SVID (its key is never kept)."""

    spiffe_id: str
    serial: int
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class SpireAnswer:
    """SPIRE's first answer to SubscribeToX509SVIDs for this process: ``svids`` (None
    when there was none), or the ``error`` it answered, or ``timed_out``."""

    svids: tuple[SvidFacts, ...] | None = None
    error: SpireError | None = None
    timed_out: bool = False
    seconds: float = 0.0


def socket_problem(path: Path) -> tuple[str, str] | None:
    """Why nothing answers on the Unix socket ``path`` (what, what to do), or None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"{path} does not exist", ""
    except OSError as exc:
        return f"cannot stat {path}: {exc.strerror or exc}", ""
    if not stat.S_ISSOCK(mode):
        return f"{path} is not a socket", ""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(str(path))
    except PermissionError:
        return (f"permission denied connecting to {path}",
                "run as a user that may connect to it (the SPIRE agent's admin socket is "
                "usually owned by root with mode 0770 or tighter)")
    except ConnectionRefusedError:
        return (f"nothing listens on {path} (a stale socket file)",
                "the SPIRE agent is not running, or restarting; check its pod and log")
    except OSError as exc:
        return f"cannot connect to {path}: {exc.strerror or exc}", ""
    finally:
        probe.close()
    return None


def _svid_facts(update: X509SvidUpdate) -> tuple[SvidFacts, ...]:
    facts = []
    for svid in update.svids:
        leaf = x509.load_der_x509_certificate(svid.cert_chain[0])
        facts.append(SvidFacts(svid.spiffe_id, leaf.serial_number,
                               leaf.not_valid_before_utc, leaf.not_valid_after_utc))
    return tuple(facts)


async def ask_spire(path: Path, *, pid: int, within: float) -> SpireAnswer:
    """SPIRE's first answer to SubscribeToX509SVIDs for ``pid``, asked once (no retries)."""
    policy = BackoffPolicy(initial=0.1, maximum=0.1, max_attempts=1)
    started = time.monotonic()
    async with DelegatedIdentityClient(path, backoff=policy,
                                       first_message_warning=None) as client:
        stream = client.subscribe_x509_svids(pid=pid)
        try:
            # Not asyncio.wait_for: on 3.11 it can swallow a cancellation that races the
            # answer, and the doctor then never returns when asked to stop.
            async with asyncio.timeout(within):
                update = await anext(stream, None)
        except TimeoutError:
            return SpireAnswer(timed_out=True, seconds=time.monotonic() - started)
        except SpireError as exc:
            return SpireAnswer(error=exc, seconds=time.monotonic() - started)
        finally:
            if isinstance(stream, AsyncGenerator):
                await stream.aclose()
    seconds = time.monotonic() - started
    if update is None:
        return SpireAnswer(timed_out=True, seconds=seconds)
    return SpireAnswer(svids=_svid_facts(update), seconds=seconds)


# --- facts: /proc -------------------------------------------------------------------------

@dataclass(frozen=True)
class HostPidFacts:
    """What /proc says about PID 1 and this process. ``root_error``: /proc unreadable."""

    root: Path
    root_error: str | None = None
    init_visible: bool = False
    init_comm: str = ""
    init_error: str | None = None
    init_cgroup: CgroupInfo | None = None
    init_ns: str | None = None
    self_ns: str | None = None
    ns_error: str | None = None


def read_host_pid(root: Path) -> HostPidFacts:
    try:
        if not root.is_dir():
            return HostPidFacts(root, root_error=f"{root} is not a directory")
        os.listdir(root)
    except OSError as exc:
        return HostPidFacts(root, root_error=f"cannot list {root}: {exc.strerror or exc}")
    init = root / "1"
    if not init.is_dir():
        return HostPidFacts(root)
    comm = ""
    with contextlib.suppress(OSError):
        comm = (init / "comm").read_text(errors="replace").strip()
    init_error: str | None = None
    info: CgroupInfo | None = None
    try:
        info = parse_cgroup_file((init / "cgroup").read_bytes())
    except OSError as exc:
        init_error = f"cannot read {init / 'cgroup'}: {exc.strerror or exc}"
    init_ns = self_ns = ns_error = None
    try:
        init_ns = os.readlink(init / "ns" / "pid")
        self_ns = os.readlink(root / "self" / "ns" / "pid")
    except OSError as exc:
        ns_error = f"cannot read {exc.filename}: {exc.strerror or exc}"
    return HostPidFacts(root, init_visible=True, init_comm=comm, init_error=init_error,
                        init_cgroup=info, init_ns=init_ns, self_ns=self_ns, ns_error=ns_error)


@dataclass(frozen=True)
class ProcScan:
    """One pass over every /proc/<pid>/cgroup. ``unrecognised``: processes in a kubepods
    cgroup that the parser cannot tie to a pod (pid, why); ``unreadable``: cgroup files
    that exist but could not be read; ``layouts``: pod processes by cgroup layout;
    ``sample_errors``: pods of the sample whose first process could not be attested."""

    root: Path
    error: str | None = None
    processes: int = 0
    pods: dict[str, list[int]] = field(default_factory=dict)
    unrecognised: tuple[tuple[int, str], ...] = ()
    unreadable: tuple[tuple[int, str], ...] = ()
    layouts: Counter[str] = field(default_factory=Counter)
    sampled: int = 0
    sample_errors: tuple[tuple[str, str], ...] = ()

    @property
    def pod_processes(self) -> int:
        return sum(len(pids) for pids in self.pods.values())


def _layout(raw: str) -> str:
    lines = [line for line in raw.splitlines() if line]
    version = "v2" if all(line.startswith("0::") for line in lines) else "v1"
    driver = "systemd" if "kubepods.slice" in raw or "kubepods-" in raw else "cgroupfs"
    runtime = ("containerd" if "cri-containerd" in raw else "cri-o" if "crio" in raw
               else "docker" if "docker" in raw else "unknown runtime")
    return f"cgroup {version}/{driver}/{runtime}"


def _first_kubepods_line(raw: str) -> str:
    line = next((line for line in raw.splitlines() if "kubepods" in line), "")
    return line[:160]


def scan_proc(reader: ProcReader, *, sample: int = 5) -> ProcScan:
    """Reads every process's cgroup file under the reader's root, then attests (stat,
    status and cgroup, as the agent does) the first process of up to ``sample`` pods."""
    root = reader.root
    try:
        pids = reader.pids()
    except OSError as exc:
        return ProcScan(root, error=f"cannot list {root}: {exc.strerror or exc}")
    pods: dict[str, list[int]] = {}
    unrecognised: list[tuple[int, str]] = []
    unreadable: list[tuple[int, str]] = []
    layouts: Counter[str] = Counter()
    for pid in pids:
        try:
            raw = (root / str(pid) / "cgroup").read_bytes()
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESRCH):
                unreadable.append((pid, exc.strerror or str(exc)))
            continue
        info = parse_cgroup_file(raw)
        text = raw.decode("utf-8", "replace")
        if info.status is CgroupStatus.POD and info.pod_uid is not None:
            pods.setdefault(info.pod_uid, []).append(pid)
            layouts[_layout(text)] += 1
        elif "kubepods" in text:
            why = info.detail or {CgroupStatus.CONTAINER: "a container ID but no pod UID",
                                  CgroupStatus.HOST: "no container ID"}.get(info.status, "")
            unrecognised.append((pid, f"{why}: {_first_kubepods_line(text)}"))
    errors: list[tuple[str, str]] = []
    sampled = 0
    for pod_uid in sorted(pods)[:max(sample, 0)]:
        sampled += 1
        try:
            reader.identity(pods[pod_uid][0])
        except ProcessGone:
            continue
        except AttestationError as exc:
            errors.append((pod_uid, str(exc)))
    return ProcScan(root, processes=len(pids), pods=pods, unrecognised=tuple(unrecognised),
                    unreadable=tuple(unreadable), layouts=layouts, sampled=sampled,
                    sample_errors=tuple(errors))


# --- the checks ---------------------------------------------------------------------------

_SOCKET_FLAG = "--spire-admin-socket (SPIFFE_DELEGATE_SPIRE_ADMIN_SOCKET)"


def check_admin_socket(path: Path, problem: tuple[str, str] | None,
                       answer: SpireAnswer | None) -> CheckResult:
    name = "spire-admin-socket"
    if problem is not None:
        what, advice = problem
        return CheckResult(name, Status.FAIL, what, advice or (
            f"start the SPIRE agent with admin_socket_path = \"{path}\" in its agent {{}} "
            f"block, mount that directory into this pod, or point {_SOCKET_FLAG} at it"))
    code = answer.error.code_name if answer is not None and answer.error is not None else ""
    if code == "UNIMPLEMENTED":
        return CheckResult(name, Status.FAIL,
                           f"{path} answers, but not the Delegated Identity API",
                           "this is probably the Workload API socket: point "
                           f"{_SOCKET_FLAG} at the SPIRE agent's admin_socket_path "
                           "(SPIRE >= 1.x with the admin API enabled)")
    if code == "UNAVAILABLE":
        return CheckResult(name, Status.FAIL,
                           f"{path} accepts connections but gRPC calls fail: "
                           f"{answer.error.message if answer and answer.error else ''}",
                           "check that this is the SPIRE agent's admin socket and that the "
                           "SPIRE agent is healthy (its log)")
    if answer is not None and answer.timed_out:
        return CheckResult(name, Status.PASS,
                           f"{path} accepts connections (SPIRE's answer is below)")
    took = f" ({answer.seconds * 1000:.0f} ms)" if answer is not None else ""
    return CheckResult(name, Status.PASS, f"{path} answers the Delegated Identity API{took}")


def check_delegate(problem: tuple[str, str] | None, answer: SpireAnswer | None, *,
                   pid: int, timeout: float) -> CheckResult:
    name = "authorized-delegate"
    if problem is not None or answer is None:
        return CheckResult(name, Status.SKIP, "not checked: the SPIRE admin socket does not "
                           "answer (see spire-admin-socket)")
    if answer.timed_out:
        return CheckResult(
            name, Status.FAIL,
            f"SPIRE sent no X.509-SVID for this process (pid {pid}) within {timeout:g}s",
            "SPIRE answers only once every matching entry has a minted SVID: check the SPIRE "
            "agent's log and the entries matching this process, or raise --timeout")
    error = answer.error
    if isinstance(error, SpirePermissionDenied):
        if "no identity issued" in error.message:
            advice = ("register an entry matching this process (the agent's pod: e.g. "
                      "selectors k8s:ns:<namespace> and k8s:sa:<service account>) whose "
                      "SPIFFE ID is listed in the SPIRE agent's authorized_delegates")
        else:
            advice = ("add this process's SPIFFE ID (that of the entry matching it) to "
                      "authorized_delegates in the SPIRE agent's config (agent { "
                      "authorized_delegates = [\"spiffe://<td>/ns/<ns>/sa/<sa>\"] }) and "
                      "restart the SPIRE agent; the entry must match this process")
        return CheckResult(name, Status.FAIL, error.message, advice)
    if error is not None:
        return CheckResult(name, Status.FAIL, error.message, error.hint)
    svids = answer.svids or ()
    if not svids:
        return CheckResult(name, Status.WARN,
                           f"SPIRE accepted the call but issued pid {pid} no X.509-SVID",
                           "register an entry matching this process; without its own SVID "
                           "the agent cannot learn its trust domain or serve /metrics "
                           "over SPIFFE mutual TLS")
    ids = ", ".join(dict.fromkeys(svid.spiffe_id for svid in svids))
    return CheckResult(name, Status.PASS,
                       f"SPIRE serves this process (pid {pid}) as a delegate: {ids}")


def _ago(seconds: float) -> str:
    return f"in {seconds:.0f}s" if seconds >= 0 else f"{-seconds:.0f}s ago"


def check_clock(answer: SpireAnswer | None, *, now: datetime,
                max_skew: float) -> CheckResult:
    name = "clock"
    svids = answer.svids if answer is not None else None
    if not svids:
        return CheckResult(name, Status.SKIP, "not checked: no SVID from SPIRE to compare with")
    worst: CheckResult | None = None
    for svid in svids:
        starts = (svid.not_before - now).total_seconds()
        ends = (svid.not_after - now).total_seconds()
        when = (f"{svid.spiffe_id} (serial {svid.serial:x}) is valid from "
                f"{svid.not_before:%Y-%m-%dT%H:%M:%SZ} ({_ago(starts)}) to "
                f"{svid.not_after:%Y-%m-%dT%H:%M:%SZ} ({_ago(ends)})")
        if starts > max_skew:
            return CheckResult(name, Status.FAIL,
                               f"{when}: this clock is {starts:.0f}s behind SPIRE's",
                               "synchronise the node's clock (NTP, chrony); Envoy and its "
                               "peers reject certificates that are not valid yet")
        if ends <= 0:
            return CheckResult(name, Status.FAIL,
                               f"{when}: it has expired by this clock",
                               "this clock is ahead of SPIRE's, or SPIRE serves expired "
                               "SVIDs: synchronise the clock (NTP, chrony) and check the "
                               "SPIRE agent's log")
        if starts > 0 and worst is None:
            worst = CheckResult(name, Status.WARN,
                                f"{when}: this clock is {starts:.0f}s behind SPIRE's "
                                f"(within {max_skew:g}s)",
                                "synchronise the node's clock (NTP, chrony)")
    if worst is not None:
        return worst
    first = svids[0]
    began = (now - first.not_before).total_seconds()
    left = (first.not_after - now).total_seconds()
    return CheckResult(name, Status.PASS,
                       f"this clock is within the validity of {first.spiffe_id}'s SVID "
                       f"(valid for {began:.0f}s, {left:.0f}s left)")


_HOST_PID_ADVICE = ("run the agent in the host's PID namespace (hostPID: true in the "
                    "DaemonSet's pod spec) as root or with CAP_SYS_PTRACE; /proc must not be "
                    "mounted with hidepid; --proc-root (SPIFFE_DELEGATE_PROC_ROOT) names "
                    "where /proc is")


def check_host_pid(facts: HostPidFacts, scan: ProcScan) -> CheckResult:
    name = "host-pid-namespace"
    root = facts.root
    if facts.root_error is not None:
        return CheckResult(name, Status.FAIL, facts.root_error, _HOST_PID_ADVICE)
    if scan.processes == 0:
        return CheckResult(name, Status.FAIL, f"no process is visible under {root}",
                           _HOST_PID_ADVICE)
    if not facts.init_visible:
        return CheckResult(name, Status.FAIL,
                           f"PID 1 is not visible under {root} ({scan.processes} processes "
                           "are): /proc hides other users' processes (hidepid) or is not "
                           "a PID namespace's own", _HOST_PID_ADVICE)
    if facts.init_error is not None:
        return CheckResult(name, Status.FAIL, facts.init_error, _HOST_PID_ADVICE)
    if facts.init_ns is not None and facts.self_ns is not None \
            and facts.init_ns != facts.self_ns:
        return CheckResult(name, Status.FAIL,
                           f"this process is in PID namespace {facts.self_ns}, PID 1 of "
                           f"{root} in {facts.init_ns}: the PIDs the kernel reports for "
                           "SDS callers would not be the ones SPIRE attests", _HOST_PID_ADVICE)
    info = facts.init_cgroup
    comm = f" ({facts.init_comm})" if facts.init_comm else ""
    if info is not None and info.status is CgroupStatus.POD:
        return CheckResult(name, Status.FAIL,
                           f"PID 1{comm} is a process of pod {info.pod_uid}: this is the "
                           "pod's own PID namespace, not the host's; other pods' processes "
                           "cannot be found", _HOST_PID_ADVICE)
    seen = (f"{scan.processes} processes visible, {scan.pod_processes} of them in "
            f"{len(scan.pods)} pods")
    if info is not None and info.status is CgroupStatus.CONTAINER:
        return CheckResult(name, Status.WARN,
                           f"PID 1{comm} is in container {info.container_id}: a container's "
                           f"own PID namespace, unless this node is itself a container "
                           f"(kind); {seen}", _HOST_PID_ADVICE)
    if facts.ns_error is not None:
        return CheckResult(name, Status.WARN,
                           f"PID 1{comm} is not in a container, but the PID namespaces "
                           f"could not be compared: {facts.ns_error}; {seen}",
                           "reading another process's /proc/<pid>/ns needs root with "
                           "CAP_SYS_PTRACE in the host's user namespace")
    return CheckResult(name, Status.PASS,
                       f"PID 1{comm} is the host's init and this process shares its PID "
                       f"namespace ({facts.self_ns}); {seen}")


def _examples(items: Sequence[tuple[object, str]]) -> str:
    shown = "; ".join(f"{key}: {why}" for key, why in items[:_EXAMPLES])
    more = f"; and {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else ""
    return shown + more


def check_pod_cgroups(scan: ProcScan) -> CheckResult:
    name = "pod-cgroups"
    if scan.error is not None or scan.processes == 0:
        return CheckResult(name, Status.SKIP,
                           f"not checked: no process visible under {scan.root} "
                           "(see host-pid-namespace)")
    report = "please report it with the output of cat /proc/<pid>/cgroup for those processes"
    if scan.sample_errors:
        return CheckResult(name, Status.FAIL,
                           f"{len(scan.sample_errors)} of {scan.sampled} sampled pods could "
                           f"not be attested: {_examples(scan.sample_errors)}",
                           _HOST_PID_ADVICE)
    layouts = "; ".join(f"{count} in {layout}" for layout, count in scan.layouts.most_common())
    found = (f"{len(scan.pods)} pods with {scan.pod_processes} processes"
             + (f" ({layouts})" if layouts else "")
             + (f"; {scan.sampled} sampled pods attested" if scan.sampled else ""))
    if scan.unrecognised and not scan.pods:
        return CheckResult(name, Status.FAIL,
                           f"{len(scan.unrecognised)} processes are in kubepods cgroups but "
                           f"none could be tied to a pod: {_examples(scan.unrecognised)}",
                           f"this node's cgroup layout is not recognised; {report}")
    if scan.unrecognised:
        return CheckResult(name, Status.WARN,
                           f"{found}; but {len(scan.unrecognised)} processes in kubepods "
                           f"cgroups could not be tied to a pod: "
                           f"{_examples(scan.unrecognised)}",
                           f"those processes cannot be served by pod; {report}")
    if scan.unreadable:
        return CheckResult(name, Status.WARN,
                           f"{found}; {len(scan.unreadable)} cgroup files could not be read: "
                           f"{_examples(scan.unreadable)}", _HOST_PID_ADVICE)
    if not scan.pods:
        return CheckResult(name, Status.WARN,
                           f"no process in a pod cgroup among {scan.processes} processes",
                           "expected outside Kubernetes or on a node without pods; on a "
                           "Kubernetes node, " + _HOST_PID_ADVICE)
    return CheckResult(name, Status.PASS, found)


def _mode(path: Path, st: os.stat_result) -> str:
    return f"{path} (mode {stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}:{st.st_gid})"


def check_sds_socket(path: Path) -> CheckResult:
    """The directory of the SDS socket: there (or creatable), writable, reachable by Envoy;
    and whatever is at the socket path already."""
    name = "sds-socket"
    flag = "--sds-socket (SPIFFE_DELEGATE_SDS_SOCKET)"
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        return CheckResult(name, Status.FAIL,
                           f"{path} is longer than a Unix socket path may be "
                           f"({_MAX_UNIX_PATH} bytes)", f"choose a shorter {flag}")
    directory = path.parent
    try:
        st = directory.stat()
    except FileNotFoundError:
        ancestor = next(p for p in directory.parents if p.exists())
        if os.access(ancestor, os.W_OK | os.X_OK):
            return CheckResult(name, Status.WARN,
                               f"{directory} does not exist; the agent creates it (mode 0755) "
                               f"at start", "Envoy must see the same directory: mount it from "
                               f"the host (a hostPath volume) in both pods, at {directory}")
        return CheckResult(name, Status.FAIL,
                           f"{directory} does not exist and cannot be created "
                           f"({ancestor} is not writable by uid {os.geteuid()})",
                           f"mount a writable directory at {directory}, or choose another "
                           f"{flag}")
    except OSError as exc:
        return CheckResult(name, Status.FAIL, f"cannot stat {directory}: {exc.strerror}",
                           f"choose another {flag}")
    if not stat.S_ISDIR(st.st_mode):
        return CheckResult(name, Status.FAIL, f"{directory} is not a directory",
                           f"choose another {flag}")
    where = _mode(directory, st)
    if not os.access(directory, os.W_OK | os.X_OK):
        return CheckResult(name, Status.FAIL,
                           f"{where} is not writable by uid {os.geteuid()}",
                           "make it writable for the agent's user (or run the agent as "
                           "root): the agent creates the socket there")
    try:
        existing = path.lstat()
    except FileNotFoundError:
        found = "the socket is not there yet (the agent creates it at start)"
    except OSError as exc:
        return CheckResult(name, Status.FAIL, f"cannot stat {path}: {exc.strerror}",
                           f"choose another {flag}")
    else:
        if not stat.S_ISSOCK(existing.st_mode):
            return CheckResult(name, Status.FAIL,
                               f"{path} exists and is not a socket: the agent refuses to "
                               "start", f"remove it, or choose another {flag}")
        problem = socket_problem(path)
        state = ("an agent serves it" if problem is None
                 else "a stale socket file (the agent replaces it at start)")
        found = (f"{path} is a socket (mode {stat.S_IMODE(existing.st_mode):04o}): {state}")
    if not st.st_mode & 0o001:
        return CheckResult(name, Status.WARN,
                           f"{where} is writable; {found}; but users other than its owner "
                           "and group cannot reach the socket through it",
                           f"run Envoy as uid {st.st_uid} or in group {st.st_gid}, or "
                           f"chmod o+x {directory}")
    return CheckResult(name, Status.PASS, f"{where} is writable; {found}")


# --- running ------------------------------------------------------------------------------

async def run_checks(options: DoctorOptions, *, pid: int | None = None,
                     now: datetime | None = None) -> list[CheckResult]:
    """Gathers the facts and runs every check, in the order they are printed."""
    pid = os.getpid() if pid is None else pid
    admin = options.spire_admin_socket
    problem = await asyncio.to_thread(socket_problem, admin)
    answer = (await ask_spire(admin, pid=pid, within=options.timeout)
              if problem is None else None)
    reader = ProcReader(options.proc_root)
    host = await asyncio.to_thread(read_host_pid, reader.root)
    if host.root_error is not None:
        scan = ProcScan(reader.root, error=host.root_error)
    else:
        scan = await asyncio.to_thread(scan_proc, reader, sample=options.pod_sample)
    sds = await asyncio.to_thread(check_sds_socket, options.sds_socket)
    moment = now if now is not None else datetime.now(UTC)
    return [
        check_admin_socket(admin, problem, answer),
        check_delegate(problem, answer, pid=pid, timeout=options.timeout),
        check_host_pid(host, scan),
        check_pod_cgroups(scan),
        sds,
        check_clock(answer, now=moment, max_skew=options.max_clock_skew),
    ]


def _summary(results: Sequence[CheckResult]) -> Counter[Status]:
    return Counter(result.status for result in results)


def render_results(results: Sequence[CheckResult]) -> str:
    """One block per check: status, name, what was found; then what to do, if anything."""
    width = max(len(result.name) for result in results) if results else 0
    lines = []
    for result in results:
        lines.append(f"{result.status.value}  {result.name.ljust(width)}  {result.detail}")
        if result.advice and result.status in (Status.FAIL, Status.WARN):
            lines.append(f"{'':6}{'':{width}}  -> {result.advice}")
    counts = _summary(results)
    lines.append(f"{counts[Status.FAIL]} failed, {counts[Status.WARN]} warnings, "
                 f"{counts[Status.PASS]} passed, {counts[Status.SKIP]} skipped")
    return "\n".join(lines) + "\n"


def results_json(results: Sequence[CheckResult]) -> dict[str, Any]:
    return {"ok": not _summary(results)[Status.FAIL],
            "checks": [result.to_json() for result in results]}


async def doctor(options: DoctorOptions, *, as_json: bool = False) -> int:
    """``spiffe-delegate doctor``: prints every check; 1 if any failed, else 0."""
    results = await run_checks(options)
    if as_json:
        print(json.dumps(results_json(results), indent=2))
    else:
        print(render_results(results), end="")
    return 1 if _summary(results)[Status.FAIL] else 0

"""Attest-then-re-verify: SPIRE's by-PID answers, delivered only while the PID is still ours.

SPIRE attests whatever a PID names when the subscription opens (and again on every
reconnect) and never watches it afterwards. So, for each subscription:

1. pin the process: a pidfd (the caller's, pinned at accept time, or ``os.pidfd_open``)
   and its :class:`~agent.attest.procfs.ProcessIdentity` (start time, uid, pod, container)
   read through that pidfd;
2. subscribe with SPIRE by PID;
3. after every answer, check that the PID still names the pinned process (same start
   time, same pod and container, pidfd not signalled); and check again right before the
   answer is handed to the consumer;
4. on a mismatch or an exit (the pidfd becomes readable: it is registered with the event
   loop's ``add_reader``, so this is noticed at once, not at the next answer) the answer is
   discarded, the subscription closed, the event logged and counted, and the workload
   attested again through another live process of the same pod, if there is one.

:class:`X509Verifier` is an async iterator of :class:`VerifiedUpdate` for one target:

* :class:`PodTarget` — a pod, by UID. Any live process of the pod may carry the
  subscription (each container's oldest process first, the pod's first-started container
  — the sandbox — last); when it goes, another one is pinned; when there is none the verifier is
  *orphaned* (``wait_orphaned``) and scans ``/proc`` again every ``rescan_interval``.
  It never ends by itself.
* :class:`ProcessTarget` — one bare process (e.g. a proxy that is not in a pod). The cache
  keys it by ``ProcessKey(pid, start_time)``, which names one process for the life of the
  machine. Nothing can stand in for it: when it exits, ``__anext__`` raises
  :class:`~agent.attest.procfs.ProcessGone`.

Counters (:class:`VerifierStats`; pass one object to many verifiers to aggregate):
``pid_reuse_detected`` counts pinned processes whose PID was found naming a *different*
process (another start time, or another pod/container) while we were subscribed for it;
``process_exits`` counts pinned processes that exited; ``answers_discarded`` counts SPIRE
answers thrown away by a check; ``attestations`` counts outcomes by result (see
:data:`ATTESTATION_RESULTS`). Each verifier has its own ``stats`` too.

Consumers must treat ``__anext__`` as cancellation-safe (it is): the SPIRE stream is read
by the verifier's own task, and a new answer replaces an undelivered one (latest value).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.attest.cgroups import is_container_id, is_pod_uid
from agent.attest.procfs import ProcessGone, ProcessIdentity, ProcessPlacement, ProcReader
from agent.clock import Clock, SystemClock
from agent.errors import AttestationError, SpireError
from agent.model import Selector, X509SvidUpdate

__all__ = [
    "ATTESTATION_RESULTS",
    "PodScans",
    "PodTarget",
    "ProcessTarget",
    "Target",
    "VerifiedUpdate",
    "VerifierSettings",
    "VerifierStats",
    "X509Subscriber",
    "X509Verifier",
]

_LOG = logging.getLogger("spiffe_delegate.attest")
# After this many consecutive discarded answers without a delivery, slow down.
_MAX_QUICK_RETRIES = 3

ATTESTATION_RESULTS = ("ok", "unmatched", "process_gone", "failed", "spire_error")
"""How one attestation (one SPIRE answer about a pinned PID, or the attempt) can end:
``ok``: verified and handed on, with SVIDs; ``unmatched``: verified and handed on, but
SPIRE matched no registration entry; ``process_gone``: the pinned process exited (or the
process asked for was gone) before the answer could be trusted; ``failed``: the answer
failed re-verification (PID reused, process moved, /proc unreadable) and was discarded;
``spire_error``: SPIRE refused the subscription. An answer superseded by a newer one
before anyone took it is not counted."""


class X509Subscriber(Protocol):
    """The part of :class:`agent.spire.DelegatedIdentityClient` the verifier uses."""

    def subscribe_x509_svids(
        self, *, pid: int | None = None, selectors: Sequence[Selector] | None = None
    ) -> AsyncIterator[X509SvidUpdate]: ...


@dataclass(frozen=True)
class PodTarget:
    """Every live process of pod ``pod_uid`` (canonical, dashed) speaks for the pod; with
    ``container_id``, only the processes of that container (entries may select by
    container, so another container's answer could be another identity).

    ``pidfd`` (with ``pid``, or the PID is read from the pidfd) names one process of the
    pod already pinned elsewhere (the caller, at accept time); it is tried first while it
    lives. The pidfd is duplicated, never closed."""

    pod_uid: str
    pid: int | None = None
    pidfd: int | None = None
    container_id: str | None = None

    def __post_init__(self) -> None:
        if not is_pod_uid(self.pod_uid):
            raise ValueError(f"{self.pod_uid!r} is not a pod UID "
                             "(lower-case hex 8-4-4-4-12 with dashes)")
        if self.container_id is not None and not is_container_id(self.container_id):
            raise ValueError(f"{self.container_id!r} is not a container ID")

    def __str__(self) -> str:
        if self.container_id is not None:
            return f"pod {self.pod_uid} container {self.container_id[:12]}"
        return f"pod {self.pod_uid}"


@dataclass(frozen=True)
class ProcessTarget:
    """One process. ``pidfd`` (e.g. pinned at accept time) is duplicated, never closed;
    ``start_time``, when given, must match, else the process is treated as gone."""

    pid: int
    pidfd: int | None = None
    start_time: int | None = None

    def __str__(self) -> str:
        return f"process {self.pid}"


Target = PodTarget | ProcessTarget


@dataclass(frozen=True)
class VerifierSettings:
    """``rescan_interval``: how often /proc is searched again for a pod with no live
    process; ``retry_interval``: the wait after SPIRE refused a subscription for good
    (e.g. PERMISSION_DENIED) before trying again; ``use_pidfd``: pin processes with pidfds
    (turn off only to exercise the identity re-checks alone, or where the kernel has none);
    ``answer_timeout``: how long a pod's subscription through one process may go without
    a first answer (SPIRE cannot attest that PID: the client keeps retrying its
    UNAVAILABLE "workload attestation failed" with back-off) before another process of
    the pod is tried instead, if there is one not tried yet in this episode."""

    rescan_interval: float = 1.0
    retry_interval: float = 5.0
    use_pidfd: bool = True
    answer_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.rescan_interval <= 0 or self.retry_interval <= 0 or self.answer_timeout <= 0:
            raise ValueError("rescan_interval, retry_interval and answer_timeout must be "
                             "positive")


@dataclass
class VerifierStats:
    """Plain counters for metrics; see the module docstring."""

    pid_reuse_detected: int = 0
    process_exits: int = 0
    answers_discarded: int = 0
    answers_delivered: int = 0
    subscriptions: int = 0
    attestations: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class VerifiedUpdate:
    """A SPIRE answer and the process it was verified to be about (before and after)."""

    update: X509SvidUpdate
    process: ProcessIdentity

    @property
    def spiffe_ids(self) -> tuple[str, ...]:
        """The SPIFFE IDs in SPIRE's order, each once."""
        return tuple(dict.fromkeys(svid.spiffe_id for svid in self.update.svids))


def _pidfd_readable(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


def _pid_of_pidfd(pidfd: int) -> int | None:
    """The PID a pidfd of ours refers to (the ``Pid:`` line of our own fdinfo), or None
    once that process is gone (the kernel then says -1) or the line is missing."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as fdinfo:
            for line in fdinfo:
                if line.startswith(b"Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError, IndexError):
        pass
    return None


def _describe(identity: ProcessIdentity | ProcessPlacement) -> str:
    where = f"pod {identity.pod_uid}" if identity.pod_uid else "no pod"
    container = (identity.container_id or "none")[:12]
    return f"start time {identity.start_time}, {where}, container {container}"


class PodScans:
    """Which processes each pod has, with lookups made at the same time sharing /proc scans.

    Finding a pod's processes reads the cgroup file of every process on the node. When many
    pods are looked up at once (a trusted proxy asking for every pod it serves, an agent
    restarting under load), one scan each would cost pods x processes reads. Here a lookup
    joins the next scan to start, never one already running (a process that appeared
    after that scan began must be seen), and every lookup that joined a scan is answered
    from it: a burst costs one or two scans. Scans run in a thread (one at a time).

    Pass one object to every verifier of an agent (``X509Verifier(scans=...)``) to share
    it; a verifier without one makes its own, which coalesces only its own lookups.
    """

    def __init__(self, reader: ProcReader) -> None:
        self._reader = reader
        self._next: asyncio.Future[dict[str, list[int]]] | None = None
        self._scanner: asyncio.Task[None] | None = None
        self.scans = 0  # scans made (for tests and benchmarks)

    async def pids_of_pod(self, pod_uid: str) -> list[int]:
        """Live PIDs of pod ``pod_uid``, ascending, from a scan started after this call."""
        if not is_pod_uid(pod_uid):
            raise ValueError(f"{pod_uid!r} is not a pod UID "
                             "(lower-case hex 8-4-4-4-12 with dashes)")
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._next.add_done_callback(_retrieve)
        if self._scanner is None:
            self._scanner = asyncio.create_task(self._scan_while_asked(), name="pod scans")
        # shield: one caller's cancellation must not fail the others' scan.
        pods = await asyncio.shield(self._next)
        return list(pods.get(pod_uid, ()))

    async def _scan_while_asked(self) -> None:
        try:
            while self._next is not None:
                answer, self._next = self._next, None
                self.scans += 1
                try:
                    pods = await asyncio.to_thread(self._reader.pods)
                except asyncio.CancelledError:
                    answer.cancel()
                    raise
                except Exception as exc:  # each waiting lookup raises it
                    if not answer.done():
                        answer.set_exception(exc)
                    continue
                if not answer.done():
                    answer.set_result(pods)
        finally:
            self._scanner = None


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a scan's failure as seen even when every lookup waiting for it was cancelled
    (asyncio would log it as never retrieved)."""
    if not future.cancelled():
        future.exception()


class _Pin:
    """One pinned process: its identity, its pidfd, and whether it is still the same."""

    def __init__(self, reader: ProcReader, identity: ProcessIdentity, pidfd: int | None,
                 stats: list[VerifierStats]) -> None:
        self.reader = reader
        self.identity = identity
        self.pidfd = pidfd
        self.dead = asyncio.Event()
        self.reason: str | None = None
        self._stats = stats
        self._counted = False
        self._watching = False

    @classmethod
    def open(cls, reader: ProcReader, pid: int, *, pidfd: int | None, use_pidfd: bool,
             expect: ProcessIdentity | None, pod_uid: str | None,
             stats: list[VerifierStats], container_id: str | None = None) -> _Pin:
        """Pins ``pid`` (pidfd first, then the identity read through it, so the identity is
        that pidfd's process). Raises AttestationError when it is not the wanted process."""
        fd: int | None = None
        try:
            if use_pidfd:
                fd = cls._open_pidfd(pid, pidfd)
            identity = reader.identity(pid, fd)
            if expect is not None and (
                not expect.same_process(identity)
                or (expect.pod_uid, expect.container_id)
                != (identity.pod_uid, identity.container_id)
            ):
                raise ProcessGone(pid, "the PID now names another process")
            if pod_uid is not None and identity.pod_uid != pod_uid:
                raise AttestationError(f"process {pid} is not in pod {pod_uid}")
            if container_id is not None and identity.container_id != container_id:
                raise AttestationError(f"process {pid} is not in container "
                                       f"{container_id[:12]} of pod {pod_uid}")
            pin = cls(reader, identity, fd, stats)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if fd is not None:
            asyncio.get_running_loop().add_reader(fd, pin._on_exit)
            pin._watching = True
        return pin

    @staticmethod
    def _open_pidfd(pid: int, given: int | None) -> int | None:
        try:
            return os.dup(given) if given is not None else os.pidfd_open(pid)
        except ProcessLookupError:
            raise ProcessGone(pid, "pidfd_open: no such process") from None
        except OSError as err:
            if err.errno in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
                _LOG.debug("no pidfd for process %d (%s); relying on /proc re-checks", pid, err)
                return None
            raise

    def _stop_watching(self) -> None:
        if self._watching and self.pidfd is not None:
            self._watching = False
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.pidfd)

    def _on_exit(self) -> None:
        # Level-triggered: stop watching at once, or the loop spins on a readable pidfd.
        self._stop_watching()
        self.kill(self._classify_gone())

    def kill(self, reason: str) -> None:
        """Marks the pin unusable (first reason wins) and counts what happened once."""
        if self.reason is None:
            self.reason = reason
            if not self._counted:
                self._counted = True
                for stats in self._stats:
                    if reason.startswith("reused"):
                        stats.pid_reuse_detected += 1
                    elif reason.startswith("exited"):
                        stats.process_exits += 1
        self.dead.set()

    def _classify_gone(self) -> str:
        """The pinned process has gone: did another process take its PID already?"""
        try:
            now = self.reader.placement(self.identity.pid)
        except AttestationError:
            return "exited"
        if now.start_time != self.identity.start_time:
            return f"reused: PID {self.identity.pid} now names another process ({_describe(now)})"
        return "exited"

    def verify(self) -> str | None:
        """None while ``pid`` still names the pinned process; else why not."""
        if self.reason is not None:
            return self.reason
        if self.pidfd is not None and _pidfd_readable(self.pidfd):
            self._stop_watching()
            self.kill(self._classify_gone())
            return self.reason
        try:
            now = self.reader.placement(self.identity.pid, self.pidfd)  # uid not compared
        except ProcessGone:
            self.kill(self._classify_gone())
            return self.reason
        except AttestationError as exc:
            self.kill(f"unreadable: {exc}")
            return self.reason
        if now.start_time != self.identity.start_time:
            self.kill(f"reused: PID {self.identity.pid} now names another process "
                      f"({_describe(now)})")
        elif (now.pod_uid, now.container_id) != (self.identity.pod_uid,
                                                 self.identity.container_id):
            self.kill(f"moved: process {self.identity.pid} changed cgroups ({_describe(now)})")
        return self.reason

    def close(self) -> None:
        self._stop_watching()
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None
        if self.reason is None:
            self.reason = "closed"
        self.dead.set()


class X509Verifier:
    """Verified X.509 updates for one target; see the module docstring.

    Starts on first use (``__anext__`` or ``wait_orphaned``) and runs until ``aclose``.
    """

    def __init__(
        self,
        client: X509Subscriber,
        reader: ProcReader,
        target: Target,
        *,
        clock: Clock | None = None,
        settings: VerifierSettings | None = None,
        stats: VerifierStats | None = None,
        logger: logging.Logger | None = None,
        scans: PodScans | None = None,
    ) -> None:
        self._client = client
        self._reader = reader
        self._scans = scans if scans is not None else PodScans(reader)
        self.target = target
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._settings = settings if settings is not None else VerifierSettings()
        self.stats = VerifierStats()
        self._all_stats = [self.stats] if stats is None else [self.stats, stats]
        self._log = logger if logger is not None else _LOG
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._slot: tuple[VerifiedUpdate, _Pin] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._pin: _Pin | None = None
        self._orphaned = False
        self._orphan_event = asyncio.Event()
        self._origin: ProcessIdentity | None = None
        self._reported_errors: set[str] = set()
        # PIDs (with their start times) SPIRE gave no first answer about in this episode;
        # an episode ends with the next delivered answer.
        self._unanswered: dict[int, int] = {}
        self._stall_reported = False

    # --- public -------------------------------------------------------------------------

    @property
    def pid_reuse_detected(self) -> int:
        return self.stats.pid_reuse_detected

    @property
    def current(self) -> ProcessIdentity | None:
        """The process carrying the subscription now, if any."""
        return self._pin.identity if self._pin is not None else None

    @property
    def orphaned(self) -> bool:
        """True while no live process can carry the subscription (a pod with none left,
        or a bare process that has exited)."""
        return self._orphaned

    async def wait_orphaned(self) -> None:
        self._start()
        await self._orphan_event.wait()

    def __aiter__(self) -> X509Verifier:
        return self

    async def __anext__(self) -> VerifiedUpdate:
        self._start()
        while True:
            slot, self._slot = self._slot, None
            if slot is not None:
                item, pin = slot
                # The last check, right before delivery: the answer may have waited.
                reason = pin.verify()
                if reason is None:
                    result = "ok" if item.update.svids else "unmatched"
                    for stats in self._all_stats:
                        stats.answers_delivered += 1
                        stats.attestations[result] += 1
                    return item
                self._discard(pin, reason, "right before delivery")
                continue
            if self._error is not None:
                raise self._error
            if self._closed:
                raise StopAsyncIteration
            changed = self._changed
            await changed.wait()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._wake()

    # --- internals ----------------------------------------------------------------------

    def _start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name=f"verifier {self.target}")

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _set_orphaned(self, orphaned: bool) -> None:
        self._orphaned = orphaned
        if orphaned:
            self._orphan_event.set()
        elif self._orphan_event.is_set():
            self._orphan_event = asyncio.Event()

    async def _run(self) -> None:
        quick_retries = 0
        try:
            while True:
                pin = await self._next_pin()
                self._pin = pin
                try:
                    delivered = await self._follow(pin)
                finally:
                    self._pin = None
                    if self._slot is not None and self._slot[1] is pin:
                        self._slot = None  # never deliver an answer of an unpinned process
                    pin.close()
                quick_retries = 0 if delivered else quick_retries + 1
                if quick_retries >= _MAX_QUICK_RETRIES:
                    quick_retries = 0
                    await self._clock.sleep(self._settings.rescan_interval)
        except ProcessGone as exc:
            self._count("process_gone")
            self._set_orphaned(True)
            self._error = exc
            self._wake()
        except StopAsyncIteration:
            self._closed = True  # the SPIRE client was closed
            self._wake()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._log.exception("%s: verifier failed", self.target)
            self._error = exc
            self._wake()

    async def _next_pin(self) -> _Pin:
        target = self.target
        if isinstance(target, ProcessTarget):
            return self._pin_process(target)
        reported = False
        while True:
            hinted = target.pid
            if hinted is None and target.pidfd is not None:
                hinted = _pid_of_pidfd(target.pidfd)
            if (hinted is not None and target.pidfd is not None
                    and not self._was_unanswered(hinted)):
                try:
                    pin = _Pin.open(self._reader, hinted, pidfd=target.pidfd,
                                    use_pidfd=self._settings.use_pidfd, expect=None,
                                    pod_uid=target.pod_uid, stats=self._all_stats,
                                    container_id=target.container_id)
                except (AttestationError, OSError):
                    pass  # that process is gone (its pidfd says so): any other will do
                else:
                    self._set_orphaned(False)
                    return pin
            pids = await self._candidates(target.pod_uid, target.container_id)
            # Processes SPIRE did not answer about come last (still tried: it may).
            pids = ([pid for pid in pids if not self._was_unanswered(pid)]
                    + [pid for pid in pids if self._was_unanswered(pid)])
            for pid in pids:
                try:
                    pin = _Pin.open(self._reader, pid, pidfd=None,
                                    use_pidfd=self._settings.use_pidfd, expect=None,
                                    pod_uid=target.pod_uid, stats=self._all_stats,
                                    container_id=target.container_id)
                except (AttestationError, OSError) as exc:
                    self._log.debug("%s: cannot pin PID %d: %s", target, pid, exc)
                    continue  # gone meanwhile, or ambiguous: try the next one
                self._set_orphaned(False)
                return pin
            if not reported:
                reported = True
                self._log.info("%s has no live process to attest through; looking again "
                               "every %gs", target, self._settings.rescan_interval)
            self._set_orphaned(True)
            await self._clock.sleep(self._settings.rescan_interval)

    async def _candidates(self, pod_uid: str, container_id: str | None = None) -> list[int]:
        """The pod's PIDs in the order to try them: each container's oldest process, and
        the container that started first (in Kubernetes, the pause sandbox, which SPIRE's
        k8s attestor cannot find among the pod's containers) last; then the others.
        With ``container_id``, that container's processes only, oldest first."""
        pids = await self._scans.pids_of_pod(pod_uid)
        # A thread: a pod may have many processes, each one more cgroup file to read.
        return await asyncio.to_thread(self._order, pids, container_id)

    def _order(self, pids: list[int], container_id: str | None) -> list[int]:
        by_container: dict[str, list[int]] = {}
        for pid in pids:
            try:
                container = self._reader.cgroup(pid).container_id or ""
            except AttestationError:
                continue
            if container_id is not None and container != container_id:
                continue
            by_container.setdefault(container, []).append(pid)
        heads = sorted(pids[0] for pids in by_container.values())
        if len(heads) > 1:
            heads = heads[1:] + heads[:1]
        rest = sorted(pid for pids in by_container.values() for pid in pids[1:])
        return heads + rest

    def _pin_process(self, target: ProcessTarget) -> _Pin:
        expect = self._origin
        try:
            pin = _Pin.open(self._reader, target.pid, pidfd=target.pidfd,
                            use_pidfd=self._settings.use_pidfd, expect=expect, pod_uid=None,
                            stats=self._all_stats)
        except ProcessGone:
            raise
        except AttestationError as exc:
            raise ProcessGone(target.pid, str(exc)) from None
        if target.start_time is not None and pin.identity.start_time != target.start_time:
            pin.close()
            raise ProcessGone(target.pid, "the PID names another process than the one asked for")
        if self._origin is None:
            self._origin = pin.identity
        return pin

    async def _follow(self, pin: _Pin) -> bool:
        """One subscription for one pinned process; returns whether anything was delivered
        (or held for delivery). Ends when the pin dies or an answer fails its check."""
        for stats in self._all_stats:
            stats.subscriptions += 1
        stream = self._client.subscribe_x509_svids(pid=pin.identity.pid)
        dead = asyncio.ensure_future(pin.dead.wait())
        answer: asyncio.Future[X509SvidUpdate] | None = None
        delivered = False
        answered = False
        try:
            while True:
                answer = asyncio.ensure_future(anext(stream))
                while True:
                    # Only a pod's first answer has a deadline (later ones come when
                    # SPIRE rotates), and only while another process could stand in.
                    waiting: set[asyncio.Future[Any]] = {answer, dead}
                    timer = None
                    if not answered and isinstance(self.target, PodTarget):
                        timer = asyncio.ensure_future(
                            self._clock.sleep(self._settings.answer_timeout))
                        waiting.add(timer)
                    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    if timer is not None:
                        await _cancel(timer)
                    done.discard(timer)
                    if done:
                        break
                    if await self._another_candidate(pin):
                        self._unanswered[pin.identity.pid] = pin.identity.start_time
                        self._report_stall(pin)
                        return delivered
                answered = True
                if answer not in done:
                    await _cancel(answer)
                    self._log_gone(pin)
                    return delivered
                try:
                    update = answer.result()
                except SpireError as exc:
                    self._count("spire_error")
                    self._report_error(exc)
                    sleep = asyncio.ensure_future(
                        self._clock.sleep(self._settings.retry_interval))
                    await asyncio.wait({sleep, dead}, return_when=asyncio.FIRST_COMPLETED)
                    await _cancel(sleep)
                    return True  # not a verification failure: no quick-retry throttling
                reason = pin.verify()  # the first check, as soon as SPIRE has answered
                if reason is not None:
                    self._discard(pin, reason, "after SPIRE's answer")
                    return delivered
                self._reported_errors.clear()
                self._unanswered.clear()  # the episode is over
                self._stall_reported = False
                self._slot = (VerifiedUpdate(update, pin.identity), pin)
                delivered = True
                self._wake()
        finally:
            # The read in flight first: a generator that is still running cannot be closed.
            if answer is not None:
                await _cancel(answer)
            await _cancel(dead)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def _was_unanswered(self, pid: int) -> bool:
        """True when SPIRE gave no first answer about this very process (same start
        time) in this episode."""
        start_time = self._unanswered.get(pid)
        if start_time is None:
            return False
        try:
            return self._reader.start_time(pid) == start_time
        except AttestationError:
            return False

    async def _another_candidate(self, pin: _Pin) -> bool:
        """Whether a process of the pod other than ``pin``'s, not yet left unanswered in
        this episode, could carry the subscription instead."""
        target = self.target
        if not isinstance(target, PodTarget):
            return False
        pids = await self._candidates(target.pod_uid, target.container_id)
        return any(pid != pin.identity.pid and not self._was_unanswered(pid) for pid in pids)

    def _report_stall(self, pin: _Pin) -> None:
        """Once per episode (until an answer is delivered again)."""
        level = logging.DEBUG if self._stall_reported else logging.WARNING
        self._stall_reported = True
        self._log.log(level, "%s: no answer from SPIRE about PID %d after %gs (SPIRE may be "
                      "unable to attest that process; the SPIRE client keeps retrying it "
                      "with back-off); trying another of its processes instead",
                      self.target, pin.identity.pid, self._settings.answer_timeout)

    def _count(self, result: str) -> None:
        for stats in self._all_stats:
            stats.attestations[result] += 1

    def _discard(self, pin: _Pin, reason: str, when: str) -> None:
        self._count("process_gone" if reason == "exited" else "failed")
        for stats in self._all_stats:
            stats.answers_discarded += 1
        level = logging.INFO if reason == "exited" else logging.WARNING
        self._log.log(level, "%s: discarded SPIRE's answer for PID %d %s: %s (pinned: %s); "
                      "closing that subscription and attesting again", self.target,
                      pin.identity.pid, when, reason, _describe(pin.identity))
        pin.kill(reason)

    def _log_gone(self, pin: _Pin) -> None:
        self._log.info("%s: PID %d %s (pinned: %s); closing its SPIRE subscription",
                       self.target, pin.identity.pid, pin.reason or "is gone",
                       _describe(pin.identity))

    def _report_error(self, exc: SpireError) -> None:
        message = str(exc)
        if message not in self._reported_errors:
            self._reported_errors.add(message)
            self._log.error("%s: SPIRE refused the subscription: %s; trying again every %gs",
                            self.target, message, self._settings.retry_interval)


async def _cancel(future: asyncio.Future[Any]) -> None:
    """Cancels ``future`` and waits until it has finished; its outcome is dropped. A
    cancellation of the calling task still propagates."""
    if not future.done():
        future.cancel()
        await asyncio.wait({future})
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not warn about it

"""Who is asking over SDS: the kernel's peer credentials, attested through /proc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.attest.procfs import ProcessGone, ProcessIdentity, ProcessPlacement, ProcReader
from agent.cache.keys import WorkloadKey, key_for_process
from agent.errors import AttestationError
from agent.uds.peercred import PeerCredentials

__all__ = ["Caller", "CallerGone", "CallerUnknown", "identify_caller"]


class CallerUnknown(Exception):
    """The caller's process could not be identified; ``str()`` says why (for the log)."""


class CallerGone(CallerUnknown):
    """The caller's connection was closed before its call was read (it vanished with
    requests still in flight): nobody is left to answer."""


@dataclass
class Caller:
    """One SDS caller: its credentials as pinned at accept time, its process as read from
    /proc through the pinned pidfd, and the cache key it is served under.

    ``pidfd`` is the caller's own duplicate of the relay's pidfd (the relay closes its
    copy with the connection, and the number could then name another file): ``close()``
    it when the call ends.
    """

    creds: PeerCredentials
    process: ProcessIdentity
    key: WorkloadKey
    pidfd: int | None = None
    exit_reported: bool = False  # for the handler: its exit was counted and logged
    _on_exit: Callable[[], None] | None = field(default=None, repr=False)

    def exited(self) -> bool:
        """True once the process that connected has exited (its pidfd polls readable)."""
        if self.pidfd is None:
            return self.creds.exited()
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        try:
            return bool(poller.poll(0))
        except OSError:
            return True

    def verify(self, reader: ProcReader) -> str | None:
        """None while the process that connected still lives, in the pod and container it
        was identified in; else ``"exited"``, or why it can no longer be served as
        ``key`` (e.g. it was moved into another pod's cgroup)."""
        if self.exited():
            return "exited"
        try:
            # stat and cgroup only: the uid is not compared, and status costs the most.
            now = reader.placement(self.process.pid, self.pidfd)
        except ProcessGone:
            return "exited"
        except AttestationError as exc:
            return f"can no longer be identified: {exc}"
        if now.start_time != self.process.start_time:
            return "exited"  # and its PID names another process already
        if (now.pod_uid, now.container_id) != (self.process.pod_uid,
                                               self.process.container_id):
            return (f"moved from {_where(self.process)} to {_where(now)}; it is no longer "
                    f"served as {self.key}")
        return None

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Calls ``callback`` once, from the running event loop, when the process that
        connected exits (its pidfd becomes readable). Needs a pidfd; without one, exits are
        noticed by :meth:`verify` only. Undone by :meth:`close`."""
        if self.pidfd is None or self._on_exit is not None:
            return
        self._on_exit = callback
        asyncio.get_running_loop().add_reader(self.pidfd, self._exited)

    def _exited(self) -> None:
        callback = self._on_exit
        self._stop_watching()  # level-triggered: once is enough
        if callback is not None:
            callback()

    def _stop_watching(self) -> None:
        if self._on_exit is not None and self.pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.pidfd)
        self._on_exit = None

    def close(self) -> None:
        self._stop_watching()
        fd, self.pidfd = self.pidfd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def describe(self) -> str:
        where = (f"pod {self.process.pod_uid}" if self.process.pod_uid
                 else f"uid {self.process.uid}, no pod")
        return f"pid {self.process.pid} ({where})"


def _where(process: ProcessIdentity | ProcessPlacement) -> str:
    if process.pod_uid is None:
        return "no pod"
    return f"pod {process.pod_uid} (container {(process.container_id or 'none')[:12]})"


def identify_caller(peer: str, lookup: Callable[[str], PeerCredentials | None],
                    reader: ProcReader) -> Caller:
    """The caller of a gRPC call arriving from ``peer`` (``context.peer()``).

    Raises :class:`CallerUnknown` when the relay has no credentials for the connection,
    the PID is not visible from here (another PID namespace), or /proc cannot vouch for
    the process (gone, PID reused, a cgroup naming two pods).
    """
    creds = lookup(peer)
    if creds is None:
        raise CallerGone(f"no peer credentials for connection {peer!r}: it is closed")
    if creds.pid <= 0:
        raise CallerUnknown(f"the caller (uid {creds.uid}) lives in a PID namespace this "
                            "agent cannot see; run the agent with the host's PID namespace")
    try:
        process = reader.identity(creds.pid, creds.pidfd)
    except AttestationError as exc:
        raise CallerUnknown(f"pid {creds.pid}: {exc}") from None
    pidfd = os.dup(creds.pidfd) if creds.pidfd is not None else None
    caller = Caller(creds=creds, process=process, key=key_for_process(process), pidfd=pidfd)
    if caller.exited():
        caller.close()
        raise CallerUnknown(f"pid {creds.pid} exited while it was being identified")
    return caller

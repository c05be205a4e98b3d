"""Who is asking over SDS: the kernel's peer credentials, attested through /proc."""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Callable
from dataclasses import dataclass

from agent.attest.procfs import ProcessIdentity, ProcReader
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

    def close(self) -> None:
        fd, self.pidfd = self.pidfd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def describe(self) -> str:
        where = (f"pod {self.process.pod_uid}" if self.process.pod_uid
                 else f"uid {self.process.uid}, no pod")
        return f"pid {self.process.pid} ({where})"


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

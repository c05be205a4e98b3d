"""Reads a Unix-socket peer's credentials and pins its process with a pidfd at accept time."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
from dataclasses import dataclass

# Linux 6.5+: a pidfd for the peer as it was when it connected. Python 3.11 has no constant.
SO_PEERPIDFD = 77


@dataclass(frozen=True)
class PeerCredentials:
    """Who is on the other end of a Unix socket, as the kernel says.

    ``pid`` is 0 when the peer lives in a PID namespace we cannot see. ``pidfd`` pins the
    peer's process (not merely its number): it stays tied to that process even after the PID
    is reused. It belongs to whoever accepted the connection and is closed with it.
    """

    pid: int
    uid: int
    gid: int
    pidfd: int | None = None
    pidfd_from_kernel: bool = False

    def exited(self) -> bool:
        """True once the pinned process has exited (a pidfd polls readable on exit)."""
        if self.pidfd is None:
            return False
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        try:
            return bool(poller.poll(0))
        except OSError:
            return True


def read_peer_credentials(sock: socket.socket) -> PeerCredentials:
    """SO_PEERCRED plus a pidfd: SO_PEERPIDFD where the kernel has it, else pidfd_open.

    pidfd_open after the fact is weaker (the PID could already have been reused between
    connect and accept), which is why the kernel's own pidfd is preferred and recorded.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    if pid <= 0:
        return PeerCredentials(pid=0, uid=uid, gid=gid)
    try:
        raw_fd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, struct.calcsize("i"))
        (pidfd,) = struct.unpack("i", raw_fd)
        return PeerCredentials(pid=pid, uid=uid, gid=gid, pidfd=pidfd, pidfd_from_kernel=True)
    except OSError:
        pass
    try:
        return PeerCredentials(pid=pid, uid=uid, gid=gid, pidfd=os.pidfd_open(pid))
    except OSError:
        return PeerCredentials(pid=pid, uid=uid, gid=gid)


def close_pidfd(creds: PeerCredentials) -> None:
    if creds.pidfd is not None:
        with contextlib.suppress(OSError):
            os.close(creds.pidfd)

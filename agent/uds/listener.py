"""Creates a listening Unix socket safely: stale files replaced, live servers left alone."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import stat
from pathlib import Path

from agent.errors import ConfigError, SocketInUse


def clear_stale_socket(path: Path) -> None:
    """Removes ``path`` if it is a socket nobody answers on; refuses anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(
            f"{path} exists and is not a socket",
            "remove it or choose another socket path",
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    finally:
        probe.close()
    raise SocketInUse(
        f"{path} is in use by a running server",
        "stop the other instance or choose another socket path",
    )


def _make_directories(directory: Path) -> None:
    """Creates ``directory`` and its missing parents mode 0755 whatever the umask (under
    umask 077 ``mkdir`` alone made them 0700, and Envoys of other users could not reach the
    socket). Directories that already exist keep their mode: that is the operator's choice."""
    missing: list[Path] = []
    existing = directory
    while not existing.exists():
        missing.append(existing)
        existing = existing.parent
    for made in reversed(missing):
        try:
            made.mkdir(mode=0o755)
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to change
        os.chmod(made, 0o755)
    if not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))


def bind_unix_listener(path: Path, *, mode: int, group: int | None = None,
                       backlog: int = 512) -> socket.socket:
    """Binds a listening socket at ``path`` with ``mode`` (and group) already applied.

    The socket is bound under a temporary name, given its mode, then renamed into place, so
    no client ever sees it with looser permissions than asked.
    """
    try:
        _make_directories(path.parent)
    except OSError as exc:
        raise ConfigError(f"cannot create the socket directory {path.parent}: "
                          f"{exc.strerror or exc}",
                          "create it (writable by this user) or choose another socket path"
                          ) from None
    clear_stale_socket(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, mode)
        if group is not None:
            os.chown(tmp, -1, group)
        sock.listen(backlog)
        os.rename(tmp, path)
    except BaseException as exc:
        sock.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot listen on {path}: {exc.strerror or exc}",
                              f"make {path.parent} writable by this user (uid "
                              f"{os.geteuid()}) or choose another socket path") from None
        raise
    sock.setblocking(False)
    return sock

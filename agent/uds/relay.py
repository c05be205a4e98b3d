"""Relays a public Unix socket to an in-process gRPC server, carrying each caller's credentials.

grpcio's Python server does not expose peer credentials. The relay accepts on the public
socket itself, reads SO_PEERCRED and a pidfd there (pinning the caller's process at accept
time), and forwards the bytes to the gRPC server over a fresh connection whose abstract
address is unguessable. A handler passes ``context.peer()`` to :meth:`lookup` to get the
credentials of the connection its call arrived on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

from agent.errors import ConfigError
from agent.uds.listener import bind_unix_listener
from agent.uds.peercred import PeerCredentials, close_pidfd, read_peer_credentials

_LOG = logging.getLogger("spiffe_delegate.uds")
_ABSTRACT_PREFIX = "spiffe-delegate-relay-"
_CHUNK = 256 * 1024


class PeerCredentialRelay:
    """Accepts on ``public_path`` and forwards to ``inner_target`` (give it to the gRPC server)."""

    def __init__(self, public_path: str | Path, *, mode: int = 0o666, group: int | None = None,
                 backlog: int = 512) -> None:
        self.public_path = Path(public_path)
        self._mode = mode
        self._group = group
        self._backlog = backlog
        try:
            self._inner_dir = Path(tempfile.mkdtemp(prefix="spiffe-delegate-"))  # mode 0700
        except OSError as exc:
            raise ConfigError(
                f"cannot create a private directory for the gRPC socket behind {public_path} "
                f"in {tempfile.gettempdir()}: {exc.strerror or exc}",
                "give the agent a writable temporary directory (TMPDIR, or an emptyDir "
                "mounted at /tmp with a read-only root filesystem)") from None
        self._inner_path = self._inner_dir / "grpc.sock"
        self._peers: dict[str, PeerCredentials] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def inner_target(self) -> str:
        return f"unix:{self._inner_path}"

    @property
    def connections(self) -> int:
        return len(self._peers)

    @property
    def serving(self) -> bool:
        """True while the public socket accepts connections."""
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        sock = bind_unix_listener(self.public_path, mode=self._mode, group=self._group,
                                  backlog=self._backlog)
        self._server = await asyncio.start_unix_server(self._on_connection, sock=sock,
                                                       limit=_CHUNK)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.public_path.unlink()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        shutil.rmtree(self._inner_dir, ignore_errors=True)

    def lookup(self, peer: str) -> PeerCredentials | None:
        """Credentials of the connection a gRPC call came in on; None if unknown or closed."""
        _, _, name = peer.partition("unix-abstract:")
        return self._peers.get(name) if name else None

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        creds: PeerCredentials | None = None
        name = ""
        inner_writer: asyncio.StreamWriter | None = None
        try:
            creds = read_peer_credentials(writer.get_extra_info("socket"))
            name, inner = self._bind_inner()
            self._peers[name] = creds
            await asyncio.get_running_loop().sock_connect(inner, str(self._inner_path))
            inner_reader, inner_writer = await asyncio.open_unix_connection(sock=inner,
                                                                            limit=_CHUNK)
            pumps = [asyncio.create_task(_pump(reader, inner_writer)),
                     asyncio.create_task(_pump(inner_reader, writer))]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError) as exc:
            _LOG.debug("relayed connection ended: %s", exc)
        except asyncio.CancelledError:
            # Only close() cancels these; ending quietly keeps asyncio's stream callback from
            # reporting the cancellation as an error (Python 3.11 does).
            pass
        finally:
            self._peers.pop(name, None)
            for w in (writer, inner_writer):
                if w is not None:
                    w.close()
            if creds is not None:
                close_pidfd(creds)
            self._tasks.discard(task)

    def _bind_inner(self) -> tuple[str, socket.socket]:
        for _ in range(8):
            name = _ABSTRACT_PREFIX + secrets.token_hex(16)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind("\0" + name)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            sock.setblocking(False)
            return name, sock
        raise OSError(errno.EADDRINUSE, "no free abstract relay address")


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    while data := await source.read(_CHUNK):
        sink.write(data)
        await sink.drain()

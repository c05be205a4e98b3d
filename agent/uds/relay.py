"""Relays a public Unix socket to an in-process gRPC server, carrying each caller's credentials.

grpcio's Python server does not expose peer credentials. The relay accepts on the public
socket itself, reads SO_PEERCRED and a pidfd there (pinning the caller's process at accept
time), and forwards the bytes to the gRPC server over a fresh connection whose abstract
address is unguessable. A handler passes ``context.peer()`` to :meth:`lookup` to get the
credentials of the connection its call arrived on.

Only HTTP/2 reaches gRPC: a connection must send the HTTP/2 client preface within
``handshake_timeout`` seconds or it is closed. Random bytes, HTTP/1.x (an Envoy cluster
without ``http2_protocol_options``, curl) and TLS are told apart, logged once per process
and kind with what to do, and closed at once; an HTTP/1.x client also gets a plain-text
``400`` saying so. At most ``max_connections`` connections are open at a time; past that a
new one is closed as soon as it is accepted (and logged, once per process).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import secrets
import shutil
import socket
import tempfile
from collections import Counter
from pathlib import Path

from agent.errors import ConfigError
from agent.uds.listener import bind_unix_listener
from agent.uds.peercred import PeerCredentials, close_pidfd, read_peer_credentials

_LOG = logging.getLogger("spiffe_delegate.uds")
_ABSTRACT_PREFIX = "spiffe-delegate-relay-"
_CHUNK = 256 * 1024
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HTTP1 = re.compile(rb"[A-Z]{3,10} ")
_LOGGED_KEPT = 4096
_HTTP1_ANSWER = (b"this socket serves gRPC (HTTP/2 with prior knowledge) only: Envoy's SDS "
                 b"cluster needs typed_extension_protocol_options with "
                 b"explicit_http_config: {http2_protocol_options: {}}; curl needs "
                 b"--http2-prior-knowledge\n")

REJECTIONS = ("http1", "tls", "not_http2", "handshake_timeout", "too_many_connections")
"""Kinds of connection the relay closes before gRPC sees them (``PeerCredentialRelay.rejected``)."""

_WHY = {
    "http1": ("spoke HTTP/1.x, not HTTP/2", "give Envoy's SDS cluster http2_protocol_options "
              "(explicit_http_config) as the shipped configs do"),
    "tls": ("started a TLS handshake", "the SDS socket is plain gRPC over a Unix socket: "
            "drop the transport_socket (TLS) from the SDS cluster"),
    "not_http2": ("sent bytes that are not an HTTP/2 preface", "connect with a gRPC client"),
    "too_many_connections": ("connected while the socket already had the most connections "
                             "allowed", "raise --sds-max-connections, or find who holds "
                             "them (spiffe-delegate status)"),
}


class PeerCredentialRelay:
    """Accepts on ``public_path`` and forwards to ``inner_target`` (give it to the gRPC server)."""

    def __init__(self, public_path: str | Path, *, mode: int = 0o666, group: int | None = None,
                 backlog: int = 512, max_connections: int = 4096,
                 handshake_timeout: float = 10.0,
                 listener: socket.socket | None = None) -> None:
        self.public_path = Path(public_path)
        self._listener = listener
        self._mode = mode
        self._group = group
        self._backlog = backlog
        self._max_connections = max_connections
        self._handshake_timeout = handshake_timeout
        self.rejected: Counter[str] = Counter()
        """Connections closed before reaching gRPC, by kind (:data:`REJECTIONS`)."""
        self._logged: set[tuple[int, str]] = set()
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
        """Connections relayed to gRPC now (past the HTTP/2 preface)."""
        return len(self._peers)

    @property
    def accepted(self) -> int:
        """Connections open now, those still owing their preface included."""
        return len(self._tasks)

    @property
    def serving(self) -> bool:
        """True while the public socket accepts connections."""
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        sock = self._listener or bind_unix_listener(
            self.public_path, mode=self._mode, group=self._group, backlog=self._backlog)
        self._listener = None
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
            if len(self._tasks) > self._max_connections:
                self._reject(creds, "too_many_connections")
                return
            preface = await self._preface(reader, writer, creds)
            if preface is None:
                return
            name, inner = self._bind_inner()
            self._peers[name] = creds
            await asyncio.get_running_loop().sock_connect(inner, str(self._inner_path))
            inner_reader, inner_writer = await asyncio.open_unix_connection(sock=inner,
                                                                            limit=_CHUNK)
            inner_writer.write(preface)
            pumps = [asyncio.create_task(_pump(reader, inner_writer)),
                     asyncio.create_task(_pump(inner_reader, writer))]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
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

    async def _preface(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       creds: PeerCredentials) -> bytes | None:
        """The client's HTTP/2 preface, or None once the connection was judged not to be
        HTTP/2 (or silent too long), with the reason counted and logged."""
        received = b""
        try:
            async with asyncio.timeout(self._handshake_timeout):
                while len(received) < len(_PREFACE):
                    chunk = await reader.read(len(_PREFACE) - len(received))
                    if not chunk:
                        return None  # gone before saying anything useful: nothing to tell
                    received += chunk
                    if not _PREFACE.startswith(received):
                        break
        except TimeoutError:
            self.rejected["handshake_timeout"] += 1
            _LOG.debug("SDS connection from pid %d sent no HTTP/2 preface within %gs; "
                       "closed", creds.pid, self._handshake_timeout)
            return None
        if received == _PREFACE:
            return received
        if _HTTP1.match(received):
            kind = "http1"
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(_HTTP1_ANSWER), _HTTP1_ANSWER))
            with contextlib.suppress(OSError):
                async with asyncio.timeout(1.0):
                    await writer.drain()
        elif received[:1] == b"\x16" and received[1:2] == b"\x03":
            kind = "tls"
        else:
            kind = "not_http2"
        self._reject(creds, kind)
        return None

    def _reject(self, creds: PeerCredentials, kind: str) -> None:
        self.rejected[kind] += 1
        what, todo = _WHY[kind]
        key = (creds.pid, kind)
        if key in self._logged:
            return
        if len(self._logged) >= _LOGGED_KEPT:
            self._logged.clear()
        self._logged.add(key)
        _LOG.warning("SDS socket %s: a client (pid %d, uid %d) %s; connection closed (%s)",
                     self.public_path, creds.pid, creds.uid, what, todo)

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

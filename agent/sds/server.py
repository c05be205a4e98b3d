"""The SDS server's lifecycle: the public Unix socket (through the peer-credential relay),
the gRPC server behind it, and a graceful drain on shutdown.

    server = SdsServer(SdsSettings(Path("/run/spiffe-delegate/sds.sock")), cache)
    await server.start()          # SocketInUse if another agent answers on the socket
    ...
    await server.stop(grace=5)    # streams end cleanly, the socket file is removed

The socket is mode 0666 by default, as SPIRE's Workload API socket: anyone local may
connect, because every answer depends on who the caller is (its attested PID), never on
being able to connect. ``socket_mode`` and ``socket_group`` narrow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from envoy.service.secret.v3 import sds_pb2_grpc

from agent.attest.procfs import ProcReader
from agent.errors import ConfigError
from agent.sds.handler import SdsHandler
from agent.sds.limits import SdsLimits
from agent.sds.stats import SdsObserver, SdsStats
from agent.sds.view import ViewSettings, WatchSource
from agent.uds.relay import PeerCredentialRelay

__all__ = ["SdsServer", "SdsSettings", "resolve_group"]

_LOG = logging.getLogger("spiffe_delegate.sds")


def resolve_group(text: str) -> int:
    """A group name or number -> gid; ConfigError when the name is unknown."""
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"group {text!r} does not exist",
                          "give an existing group name or a numeric gid") from None


@dataclass(frozen=True)
class SdsSettings:
    """``fetch_timeout``: how long FetchSecrets waits for a caller still being attested.
    ``max_message_bytes``: the largest request accepted (responses are not limited).
    ``limits``: what one client may ask (:class:`~agent.sds.limits.SdsLimits`)."""

    socket_path: Path
    socket_mode: int = 0o666
    socket_group: int | None = None
    view: ViewSettings = field(default_factory=ViewSettings)
    fetch_timeout: float = 5.0
    max_message_bytes: int = 4 * 1024 * 1024
    limits: SdsLimits = field(default_factory=SdsLimits)


class SdsServer:
    """See the module docstring. One per agent, on the agent's event loop."""

    def __init__(self, settings: SdsSettings, cache: WatchSource, *,
                 reader: ProcReader | None = None, stats: SdsStats | None = None,
                 observer: SdsObserver | None = None,
                 logger: logging.Logger | None = None,
                 listener: socket.socket | None = None) -> None:
        self.settings = settings
        self._log = logger if logger is not None else _LOG
        limits = settings.limits
        self._relay = PeerCredentialRelay(settings.socket_path, mode=settings.socket_mode,
                                          group=settings.socket_group,
                                          max_connections=limits.max_connections,
                                          handshake_timeout=limits.handshake_timeout,
                                          listener=listener)
        self.handler = SdsHandler(cache, self._relay.lookup, settings=settings.view,
                                  reader=reader, stats=stats,
                                  fetch_timeout=settings.fetch_timeout, observer=observer,
                                  limits=limits, logger=self._log)
        self._server: grpc.aio.Server | None = None
        self._started = False
        self._stopped = False

    @property
    def stats(self) -> SdsStats:
        return self.handler.stats

    @property
    def socket_path(self) -> Path:
        return self.settings.socket_path

    @property
    def connections(self) -> int:
        """Connections that reached gRPC (past the HTTP/2 preface) and are open now."""
        return self._relay.connections

    @property
    def accepted_connections(self) -> int:
        """Every open connection on the socket, those still owing their preface included."""
        return self._relay.accepted

    @property
    def rejected_connections(self) -> dict[str, int]:
        """Connections closed before reaching gRPC, by kind
        (:data:`agent.uds.relay.REJECTIONS`: http1, tls, not_http2, handshake_timeout,
        too_many_connections)."""
        return dict(self._relay.rejected)

    @property
    def listening(self) -> bool:
        """True from a successful start() until stop(): the socket accepts connections."""
        return self._started and not self._stopped and self._relay.serving

    async def start(self) -> None:
        """Binds the socket and starts serving. Raises SocketInUse (a live server answers
        on the path) or ConfigError (something that is not a socket is in the way)."""
        if self._started:
            return
        limits = self.settings.limits
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.settings.max_message_bytes),
            ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
            # A connection with no call open (an Envoy always has its streams) is closed.
            ("grpc.max_connection_idle_ms", max(int(limits.idle_timeout * 1000), 1)),
        ])
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(self.handler, server)
        server.add_insecure_port(self._relay.inner_target)
        await server.start()
        try:
            await self._relay.start()
        except BaseException:
            await server.stop(None)
            await self._relay.close()
            raise
        self._server = server
        self._started = True
        self._log.info("serving SDS on %s (mode %04o%s)", self.settings.socket_path,
                       self.settings.socket_mode,
                       f", group {self.settings.socket_group}"
                       if self.settings.socket_group is not None else "")

    async def stop(self, grace: float = 5.0) -> None:
        """Ends every stream cleanly (status OK: Envoy keeps its secrets and reconnects),
        refuses new calls, then closes the socket (the file is removed). Within ``grace``
        seconds, whatever the clients do."""
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + max(grace, 0.0)
        self.handler.drain()
        server, self._server = self._server, None
        try:
            if server is not None:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
                # cancellation that races completion.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_left(deadline)):
                        await self.handler.wait_idle()
                await server.stop(_left(deadline))
                # Let the relay carry the last frames (trailers, GOAWAY) out before it
                # closes; it has no event for "every connection is closed": poll briefly.
                flush_until = min(deadline, time.monotonic() + 0.5)
                while self._relay.connections and time.monotonic() < flush_until:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            # Cut short (the agent's second signal): end every call now; the socket
            # file still goes (finally).
            if server is not None:
                await server.stop(None)
            raise
        finally:
            await self._relay.close()
        self._log.info("SDS server stopped; removed %s", self.settings.socket_path)

    async def __aenter__(self) -> SdsServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)

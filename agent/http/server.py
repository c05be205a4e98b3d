"""A small asyncio HTTP/1.1 server for the health and metrics endpoints.

GET and HEAD only, one request per connection (``Connection: close``), no request bodies.
Every connection is bounded in size and time (``HttpLimits``) and handled in its own task,
so a slow or garbage-sending client costs one connection slot for a few seconds and never
delays anyone else. With a ``tls`` source, each connection is upgraded with the context the
source hands out at accept time: a rotated certificate reaches new connections at once,
while connections already open keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

from agent.config import HostPort
from agent.errors import ConfigError
from agent.http.conn import Connection, HeadTooLarge, PlainConnection, TlsConnection

__all__ = ["Handler", "HttpLimits", "HttpServer", "Request", "Response", "TlsSource"]

_ALLOWED_METHODS = ("GET", "HEAD")


@dataclass(frozen=True)
class HttpLimits:
    """``max_request_bytes``: request line plus headers. ``read_timeout``: from accept to
    the end of the request head, TLS handshake included. ``write_timeout``: for sending the
    response and closing. ``max_connections``: beyond this, new connections are closed."""

    max_request_bytes: int = 8192
    read_timeout: float = 5.0
    write_timeout: float = 10.0
    max_connections: int = 64


@dataclass(frozen=True)
class Request:
    """``headers`` have lower-case names. ``peer_uris``: URI SANs of the client certificate
    the TLS handshake verified (empty without TLS)."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    peer: str
    peer_uris: tuple[str, ...] = ()


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @classmethod
    def text(cls, status: int, text: str,
             headers: tuple[tuple[str, str], ...] = ()) -> Response:
        return cls(status, text.encode() + b"\n", headers=headers)


Handler = Callable[[Request], Response]


class TlsSource(Protocol):
    def context(self) -> ssl.SSLContext | None:
        """The server context for a connection accepted now; None refuses it."""


def _peer(writer: asyncio.StreamWriter) -> str:
    address = writer.get_extra_info("peername")
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """The request line and headers of ``head`` (ending in CRLF CRLF); _BadRequest if it is
    not HTTP/1.x."""
    lines = head.removesuffix(b"\r\n\r\n").split(b"\r\n")
    try:
        request_line = lines[0].decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "the request line is not ASCII") from None
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "only HTTP/1.x is served")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed header line")
        headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
    if "://" in target.split("?", 1)[0]:  # absolute form: http://host/path
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    if not target.startswith("/"):
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "the request target is not a path")
    path, _, query = target.partition("?")
    return method, path, query, headers


class HttpServer:
    """Serves ``routes`` (path -> handler) on ``address``; see the module docstring.

    ``flag`` names the option that set the address, for errors (``--health-address``).
    ``authorize``, given a request, returns a refusal (403) or None to let it through; it
    runs before routing so refused clients learn nothing about the paths.
    """

    def __init__(self, address: HostPort, routes: Mapping[str, Handler], *, flag: str,
                 name: str, tls: TlsSource | None = None,
                 authorize: Callable[[Request], Response | None] | None = None,
                 limits: HttpLimits | None = None,
                 logger: logging.Logger | None = None) -> None:
        self._address = address
        self._routes = dict(routes)
        self._flag = flag
        self._name = name
        self._tls = tls
        self._authorize = authorize
        self._limits = limits if limits is not None else HttpLimits()
        self._log = logger if logger is not None else logging.getLogger("spiffe_delegate.http")
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._overload_reported = False
        self._handshake_failures: set[tuple[str, str]] = set()

    @property
    def scheme(self) -> str:
        return "http" if self._tls is None else "https"

    @property
    def address(self) -> HostPort:
        """The bound address (the real port when port 0 was asked), once started."""
        if self._server is None or not self._server.sockets:
            return self._address
        name = self._server.sockets[0].getsockname()
        return HostPort(str(name[0]), int(name[1]))

    @property
    def bound(self) -> list[tuple[Any, ...]]:
        """``getsockname()`` of every listening socket (one per resolved address)."""
        if self._server is None:
            return []
        return [tuple(sock.getsockname()) for sock in self._server.sockets]

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        """Listens; ConfigError naming the flag when the address cannot be bound."""
        if self._server is not None:
            return
        try:
            self._server = await asyncio.start_server(
                self._on_connection, self._address.host, self._address.port,
                limit=self._limits.max_request_bytes, reuse_address=True)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            hint = "choose another HOST:PORT, or off to disable this endpoint"
            if exc.errno == errno.EADDRINUSE:
                hint = ("another process listens there (another agent on this node?); "
                        "choose another port, or off to disable this endpoint")
            elif exc.errno == errno.EADDRNOTAVAIL:
                hint = "that address is not on this host; use 127.0.0.1, [::1] or 0.0.0.0"
            raise ConfigError(f"{self._flag} {self._address}: cannot listen: {reason}",
                              hint) from None
        self._log.info("serving %s on %s://%s", self._name, self.scheme, self.address)

    async def close(self) -> None:
        """Stops listening and ends every connection still open."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self._limits.max_connections:
            if not self._overload_reported:
                self._overload_reported = True
                self._log.warning("%s: %d connections open; refusing more until some end",
                                  self._name, len(self._connections))
            writer.transport.abort()
            return
        self._overload_reported = False
        self._connections.add(task)
        peer = _peer(writer)
        try:
            connection = await self._serve(reader, writer, peer)
            if connection is None:
                writer.transport.abort()
            else:
                async with asyncio.timeout(self._limits.write_timeout):
                    await connection.close()
        except asyncio.CancelledError:
            # Only close() cancels these; ending quietly keeps asyncio's stream callback
            # from reporting the cancellation as an error (Python 3.11 does).
            writer.transport.abort()
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:  # TimeoutError too
            self._log.debug("%s: connection from %s ended: %s", self._name, peer, exc)
            writer.transport.abort()
        finally:
            self._connections.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer: str) -> Connection | None:
        """Reads one request and answers it; None when the connection is to be dropped."""
        limits = self._limits
        connection: Connection = PlainConnection(reader, writer)
        established = self._tls is None
        try:
            async with asyncio.timeout(limits.read_timeout):
                if self._tls is not None:
                    context = self._tls.context()
                    if context is None:
                        return None  # the source has said why, once
                    tls = TlsConnection(reader, writer, context)
                    await tls.handshake()
                    connection, established = tls, True
                head = await connection.read_head(limits.max_request_bytes)
        except TimeoutError:
            self._log.debug("%s: %s sent no complete request within %gs", self._name, peer,
                            limits.read_timeout)
            if not established:
                return None
            await self._send(connection, "GET", Response.text(
                HTTPStatus.REQUEST_TIMEOUT, "request timeout"))
            return connection
        except HeadTooLarge:
            await self._send(connection, "GET", Response.text(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"request head larger than {limits.max_request_bytes} bytes"))
            return connection
        except ssl.SSLError as exc:
            self._report_handshake_failure(peer, str(exc.reason or exc))
            await self._linger(reader, writer)
            return None
        await self._send(connection, self._method_of(head),
                         self._respond(head, connection.peer_uris, peer))
        return connection

    def _report_handshake_failure(self, peer: str, reason: str) -> None:
        """INFO the first time a host fails for a reason (a scraper retrying every 30 s
        must not flood the log), DEBUG after that."""
        key = (peer.rpartition(":")[0], reason)
        first = key not in self._handshake_failures
        if first and len(self._handshake_failures) < 256:
            self._handshake_failures.add(key)
        self._log.log(logging.INFO if first else logging.DEBUG,
                      "%s: TLS handshake with %s failed: %s", self._name, peer, reason)

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Closes after our last bytes (a TLS alert) have left: half-close, drop what the
        peer still sends until it closes too, briefly. Closing with unread data would reset
        the connection and could lose the alert."""
        with contextlib.suppress(OSError):  # TimeoutError too
            writer.write_eof()
            async with asyncio.timeout(min(self._limits.read_timeout, 1.0)):
                while await reader.read(65536):
                    pass
        writer.close()

    @staticmethod
    def _method_of(head: bytes) -> str:
        return head.split(b" ", 1)[0].decode("ascii", "replace")

    def _respond(self, head: bytes, peer_uris: tuple[str, ...], peer: str) -> Response:
        try:
            method, path, query, headers = parse_head(head)
        except _BadRequest as exc:
            return Response.text(exc.status, f"bad request: {exc}")
        request = Request(method, path, query, headers, peer, peer_uris)
        if self._authorize is not None:
            refusal = self._authorize(request)
            if refusal is not None:
                return refusal
        if method not in _ALLOWED_METHODS:
            return Response.text(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed",
                                 headers=(("Allow", ", ".join(_ALLOWED_METHODS)),))
        handler = self._routes.get(path)
        if handler is None:
            return Response.text(HTTPStatus.NOT_FOUND,
                                 f"not found; try {', '.join(sorted(self._routes))}")
        try:
            response = handler(request)
        except Exception:
            self._log.exception("%s: handler for %s failed", self._name, path)
            return Response.text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
        self._log.debug("%s: %s %s from %s -> %d", self._name, method, path, peer,
                        response.status)
        return response

    async def _send(self, connection: Connection, method: str, response: Response) -> None:
        status = HTTPStatus(response.status)
        lines = [f"HTTP/1.1 {status.value} {status.phrase}",
                 f"Content-Type: {response.content_type}",
                 f"Content-Length: {len(response.body)}",
                 "Cache-Control: no-store",
                 "Connection: close",
                 *(f"{name}: {value}" for name, value in response.headers)]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if method != "HEAD":
            data += response.body
        async with asyncio.timeout(self._limits.write_timeout):
            await connection.send(data)

"""Abusers of the SDS socket for tests/reliability/test_sds_abuse.py: raw bytes, HTTP/1.1,
a real TLS ClientHello, a hand-made HTTP/2 gRPC client that says exactly what the test
wants and reads only when told, fleets of grpc.aio streams, and the agent's footprint
(descriptors, tasks, connections, streams) to show that abusers leave nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from agent.sds.resources import SECRET_TYPE_URL
from agent.sds.server import SdsServer
from tests.sds_server.clients import NODE

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STREAM_SECRETS = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"


# --- the agent's footprint ----------------------------------------------------------------

@dataclass(frozen=True)
class Footprint:
    """What abusers could leak: open descriptors and asyncio tasks of this process, the
    SDS socket's connections (accepted, and relayed to gRPC) and open SDS calls."""

    fds: int
    tasks: int
    accepted: int
    relayed: int
    streams: int


def footprint(server: SdsServer) -> Footprint:
    return Footprint(fds=len(os.listdir("/proc/self/fd")), tasks=len(asyncio.all_tasks()),
                     accepted=server.accepted_connections, relayed=server.connections,
                     streams=server.stats.streams_active)


async def back_to(server: SdsServer, baseline: Footprint, timeout: float = 20.0,  # noqa: ASYNC109
                  fd_slack: int = 0) -> Footprint:
    """Waits until the footprint is ``baseline`` again (descriptors within ``fd_slack``:
    gRPC's own pollers may come and go); fails naming what stayed behind."""
    deadline = time.monotonic() + timeout
    while True:
        now = footprint(server)
        same = (now.tasks, now.accepted, now.relayed, now.streams) == (
            baseline.tasks, baseline.accepted, baseline.relayed, baseline.streams)
        if same and abs(now.fds - baseline.fds) <= fd_slack:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"the agent did not return to its footprint before the "
                                 f"abuse within {timeout}s: now {now}, before {baseline}")
        await asyncio.sleep(0.05)


# --- raw bytes ----------------------------------------------------------------------------

@dataclass
class RawResult:
    """What a raw connection got back: the bytes, and how it ended ("eof", "reset", or
    "open" when the server still held it when the client gave up)."""

    data: bytes
    end: str
    seconds: float


async def raw_exchange(path: Path | str, payload: bytes, *, shut_write: bool = False,
                       wait: float = 10.0) -> RawResult:
    """Connects, sends ``payload`` (then half-closes, with ``shut_write``), and reads until
    the server closes or ``wait`` seconds pass."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    started = time.monotonic()
    data = b""
    try:
        if payload:
            writer.write(payload)
            await writer.drain()
        if shut_write:
            writer.write_eof()
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                data += chunk
        return RawResult(data, "eof", time.monotonic() - started)
    except TimeoutError:
        return RawResult(data, "open", time.monotonic() - started)
    except OSError:
        return RawResult(data, "reset", time.monotonic() - started)
    finally:
        writer.close()


def http1_request() -> bytes:
    """What Envoy sends on an SDS cluster without http2_protocol_options."""
    body = grpc_frame(discovery_pb2.DiscoveryRequest(
        resource_names=["default"], type_url=SECRET_TYPE_URL).SerializeToString())
    return (f"POST {STREAM_SECRETS} HTTP/1.1\r\nhost: sds\r\ncontent-type: application/grpc\r\n"
            f"te: trailers\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


def tls_client_hello(server_name: str = "sds.local") -> bytes:
    """A real TLS ClientHello, as Python's ssl module writes it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", "not a TLS handshake record"
    return hello


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


def sotw_request(names: Sequence[str], type_url: str = SECRET_TYPE_URL) -> bytes:
    request = discovery_pb2.DiscoveryRequest(resource_names=list(names), type_url=type_url)
    request.node.CopyFrom(NODE)
    return request.SerializeToString()


# --- a hand-made HTTP/2 client --------------------------------------------------------------

def _hpack_int(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out = [limit]
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: str, value: str) -> bytes:
    """HPACK: a literal header field without indexing, new name, no Huffman coding."""
    n, v = name.encode(), value.encode()
    return b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(
        ">I", stream) + payload


DATA, HEADERS, SETTINGS, WINDOW_UPDATE = 0x0, 0x1, 0x4, 0x8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
MAX_WINDOW = 2**31 - 1


def client_settings(window: int = MAX_WINDOW) -> bytes:
    """The preface, SETTINGS (no push; stream window ``window``), an ACK of the server's
    SETTINGS (sent blindly: the server always sends its SETTINGS first) and a connection
    WINDOW_UPDATE to ``window``."""
    settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, window)
    out = PREFACE + h2_frame(SETTINGS, 0, 0, settings) + h2_frame(SETTINGS, ACK, 0)
    if window > 65535:
        out += h2_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", window - 65535))
    return out


def call_headers(stream: int, path: str = STREAM_SECRETS, *, end_stream: bool = False) -> bytes:
    block = b"".join(_literal(k, v) for k, v in (
        (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "sds"),
        ("content-type", "application/grpc"), ("te", "trailers")))
    return h2_frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream, block)


def call_message(stream: int, message: bytes, *, end_stream: bool = False) -> bytes:
    return h2_frame(DATA, END_STREAM if end_stream else 0, stream, grpc_frame(message))


class RawH2:
    """One HTTP/2 connection to the SDS socket, driven byte by byte. It reads only when
    told to, so it can be a client that never reads, or one that vanishes mid-push."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The smallest buffers the kernel allows: a client that does not read stalls soon.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        self.sock.setblocking(False)
        self.received = 0

    async def connect(self) -> RawH2:
        await asyncio.get_running_loop().sock_connect(self.sock, self.path)
        return self

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def open_stream(self, message: bytes, stream: int = 1,
                          window: int = MAX_WINDOW) -> None:
        """Handshake (unless done) and one StreamSecrets call carrying ``message``."""
        await self.send(client_settings(window) + call_headers(stream)
                        + call_message(stream, message))

    async def read_some(self, at_least: int, timeout: float = 10.0) -> int:  # noqa: ASYNC109
        """Reads until ``at_least`` more bytes came (or EOF); returns how many came."""
        loop = asyncio.get_running_loop()
        got = 0
        async with asyncio.timeout(timeout):
            while got < at_least:
                chunk = await loop.sock_recv(self.sock, 65536)
                if not chunk:
                    break
                got += len(chunk)
        self.received += got
        return got

    async def wait_closed(self, timeout: float = 10.0) -> bool:  # noqa: ASYNC109
        """Reads (discarding) until the server closes; False if it is still open."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while await loop.sock_recv(self.sock, 65536):
                    pass
        except TimeoutError:
            return False
        except OSError:
            return True
        return True

    def vanish(self) -> None:
        """Gone at once, with unread data in its buffers (as a killed process)."""
        self.sock.close()

    close = vanish


# --- fleets of well-behaved streams ---------------------------------------------------------

@dataclass
class Stream:
    """One StreamSecrets call that ACKs every response; ``seen`` maps each version_info
    received to ``time.monotonic()`` of its arrival."""

    call: Any
    names: Sequence[str]
    seen: dict[str, float] = field(default_factory=dict)
    last: Any = None
    error: BaseException | None = None


class StreamFleet:
    """``count`` StreamSecrets calls spread over ``channels`` channels, each asking for
    ``names`` and ACKing whatever it gets."""

    def __init__(self, path: Path | str, count: int, names: Sequence[str], *,
                 channels: int = 4) -> None:
        self.channels = [grpc.aio.insecure_channel(f"unix:{path}") for _ in range(channels)]
        stubs = [sds_pb2_grpc.SecretDiscoveryServiceStub(c) for c in self.channels]
        self.streams = [Stream(stubs[i % channels].StreamSecrets(), names)
                        for i in range(count)]
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> StreamFleet:
        self._tasks = [asyncio.create_task(self._run(s)) for s in self.streams]
        return self

    async def _run(self, stream: Stream) -> None:
        request = discovery_pb2.DiscoveryRequest(resource_names=list(stream.names),
                                                 type_url=SECRET_TYPE_URL, node=NODE)
        try:
            await stream.call.write(request)
            while (response := await stream.call.read()) is not grpc.aio.EOF:
                stream.seen[response.version_info] = time.monotonic()
                stream.last = response
                await stream.call.write(discovery_pb2.DiscoveryRequest(
                    resource_names=list(stream.names), type_url=SECRET_TYPE_URL,
                    version_info=response.version_info, response_nonce=response.nonce))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the test reports it
            stream.error = exc

    def count_having(self, predicate: Callable[[Stream], bool]) -> int:
        return sum(1 for s in self.streams if predicate(s))

    def errors(self) -> list[str]:
        return [repr(s.error) for s in self.streams if s.error is not None]

    async def close(self) -> None:
        for stream in self.streams:
            stream.call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()

"""The HTTP server itself: request parsing, limits, and clients that are slow, send garbage
or pile up, none of which may delay a well-behaved client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from agent.config import HostPort
from agent.http.server import HttpLimits, HttpServer, Request, Response, parse_head
from tests.http.conftest import get

LIMITS = HttpLimits(max_request_bytes=1024, read_timeout=2.0, write_timeout=2.0,
                    max_connections=16)


def hello(request: Request) -> Response:
    return Response.text(200, f"hello {request.query}".strip())


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    made = HttpServer(HostPort("127.0.0.1", 0), {"/hello": hello}, flag="--test-address",
                      name="test", limits=LIMITS)
    await made.start()
    yield made
    await made.close()


async def raw(address: HostPort, data: bytes, *, close_write: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(data)
    if close_write:
        writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_parsing() -> None:
    method, path, query, headers = parse_head(
        b"GET /hello?x=1 HTTP/1.1\r\nHost: a\r\nX-Thing:  v \r\n\r\n")
    assert (method, path, query, headers) == ("GET", "/hello", "x=1",
                                              {"host": "a", "x-thing": "v"})
    assert parse_head(b"GET http://agent:8086/hello HTTP/1.1\r\n\r\n")[1] == "/hello"


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", b"400"),
    (b"GET /hello\r\n\r\n", b"400"),
    (b"GET /hello HTTP/2.0\r\n\r\n", b"505"),
    (b"GET /hello HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
    (b"GET hello HTTP/1.1\r\n\r\n", b"400"),
    (b"DELETE /hello HTTP/1.1\r\n\r\n", b"405"),
    (b"GET /other HTTP/1.1\r\n\r\n", b"404"),
    (b"GET /hello?you HTTP/1.0\r\n\r\n", b"200"),
    (b"GET /hello HTTP/1.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n", b"431"),
])
async def test_answers(server: HttpServer, request_bytes: bytes, status: bytes) -> None:
    answer = await raw(server.address, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:80]
    assert b"Connection: close" in answer


async def test_slow_and_garbage_clients_do_not_block_others(server: HttpServer) -> None:
    address = server.address
    idle, trickling = [], []
    for _ in range(5):  # connect and say nothing
        idle.append(await asyncio.open_connection(address.host, address.port))
    for _ in range(5):  # start a request and never finish it
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: a\r\n")
        trickling.append((reader, writer))
    garbage = asyncio.create_task(raw(address, b"\x00\xff" * 400))  # no end of head, ever
    endless = asyncio.create_task(raw(address, b"A" * 100_000))
    started = time.monotonic()
    reply = await get(address, "/hello?world")
    assert (reply.status, reply.body) == (200, b"hello world\n")
    assert time.monotonic() - started < 1.0, "a good client waited behind bad ones"

    assert (await endless).startswith(b"HTTP/1.1 431")
    for reader, writer in [*idle, *trickling]:  # each is cut off after read_timeout
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:40]
        writer.close()
    assert (await garbage).startswith(b"HTTP/1.1 408")
    assert (await get(address, "/hello")).status == 200


async def test_connection_cap_refuses_extra_connections(server: HttpServer) -> None:
    address = server.address
    held = [await asyncio.open_connection(address.host, address.port)
            for _ in range(LIMITS.max_connections)]
    async def count() -> None:
        while server.connections < LIMITS.max_connections:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await asyncio.wait_for(count(), 5)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        data = await asyncio.wait_for(reader.read(), 5)
        if not data:
            raise asyncio.IncompleteReadError(b"", None)
    writer.close()
    for _, w in held:
        w.close()
    # Once they go, service resumes.
    deadline = time.monotonic() + 5
    while server.connections and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    assert (await get(address, "/hello")).status == 200


async def test_close_ends_open_connections_at_once() -> None:
    made = HttpServer(HostPort("127.0.0.1", 0), {"/hello": hello}, flag="--test-address",
                      name="test", limits=HttpLimits(read_timeout=30.0))
    await made.start()
    address = made.address
    reader, writer = await asyncio.open_connection(address.host, address.port)
    while made.connections == 0:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    started = time.monotonic()
    await made.close()
    assert time.monotonic() - started < 2
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection(address.host, address.port)


async def test_handler_errors_are_500() -> None:
    def broken(_: Request) -> Response:
        raise RuntimeError("boom")

    made = HttpServer(HostPort("127.0.0.1", 0), {"/broken": broken}, flag="--test-address",
                      name="test")
    await made.start()
    try:
        assert (await get(made.address, "/broken")).status == 500
    finally:
        await made.close()

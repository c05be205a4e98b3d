"""One HTTP connection's byte stream, plain or TLS, behind the same three calls.

TLS runs over ``ssl.MemoryBIO`` rather than asyncio's ``start_tls``: asyncio aborts the
connection on a failed handshake without sending the TLS alert it holds, so a scraper with
no or the wrong client certificate would see only "connection reset". Here the alert goes
out first, and curl or Prometheus report "certificate required" or "unknown ca".
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Protocol

__all__ = ["Connection", "HeadTooLarge", "PlainConnection", "TlsConnection"]

_CHUNK = 16384
_END_OF_HEAD = b"\r\n\r\n"


class HeadTooLarge(Exception):
    """The request head did not end within the limit."""


class Connection(Protocol):
    @property
    def peer_uris(self) -> tuple[str, ...]:
        """URI SANs of the verified client certificate (empty without TLS)."""

    async def read_head(self, limit: int) -> bytes:
        """Up to and including CRLF CRLF; HeadTooLarge, or IncompleteReadError on EOF."""

    async def send(self, data: bytes) -> None: ...

    async def close(self) -> None:
        """Ends the connection cleanly (TLS close_notify included)."""


class PlainConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @property
    def peer_uris(self) -> tuple[str, ...]:
        return ()

    async def read_head(self, limit: int) -> bytes:
        # The reader's own limit (start_server's ``limit``) bounds the buffer.
        try:
            head = await self._reader.readuntil(_END_OF_HEAD)
        except asyncio.LimitOverrunError:
            raise HeadTooLarge() from None
        if len(head) > limit:
            raise HeadTooLarge()
        return head

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


class TlsConnection:
    """Server-side TLS over a plain stream. ``handshake`` raises ssl.SSLError after the
    alert has been sent (or OSError / IncompleteReadError when the peer went away)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 context: ssl.SSLContext) -> None:
        self._reader = reader
        self._writer = writer
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._plain = bytearray()

    @property
    def tls_object(self) -> ssl.SSLObject:
        return self._tls

    @property
    def peer_uris(self) -> tuple[str, ...]:
        cert = self._tls.getpeercert()
        if not cert:
            return ()
        names = cert.get("subjectAltName", ())
        return tuple(str(pair[1]) for pair in names if pair[0] == "URI")

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _fill(self) -> None:
        data = await self._reader.read(_CHUNK)
        if not data:
            self._incoming.write_eof()
            raise asyncio.IncompleteReadError(b"", None)
        self._incoming.write(data)

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except ssl.SSLError:
                # The alert (e.g. certificate required) is in the outgoing buffer: send it.
                with contextlib.suppress(OSError):
                    await self._flush()
                raise
            else:
                await self._flush()
                return

    async def read_head(self, limit: int) -> bytes:
        while True:
            end = self._plain.find(_END_OF_HEAD)
            if end >= 0:
                head = bytes(self._plain[:end + len(_END_OF_HEAD)])
                del self._plain[:end + len(_END_OF_HEAD)]
                if len(head) > limit:
                    raise HeadTooLarge()
                return head
            if len(self._plain) > limit:
                raise HeadTooLarge()
            try:
                self._plain += self._tls.read(_CHUNK)
            except ssl.SSLWantReadError:
                await self._flush()  # e.g. TLS 1.3 session tickets
                await self._fill()
            except ssl.SSLZeroReturnError:
                raise asyncio.IncompleteReadError(bytes(self._plain), None) from None

    async def send(self, data: bytes) -> None:
        self._tls.write(data)
        await self._flush()

    async def close(self) -> None:
        # Queues our close_notify; the peer's is not awaited (SSLWantReadError).
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()
        try:
            await self._flush()
        finally:
            self._writer.close()
            await self._writer.wait_closed()

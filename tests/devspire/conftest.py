"""Fixtures for dev-spire tests: a running server on a real Unix socket, and the raw stub."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb
from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2_grpc as pb_grpc
from agent._proto.spire.api.types import selector_pb2
from agent.devspire import DevSpire, DevSpireSettings

TD = "example.org"
DELEGATE = f"spiffe://{TD}/delegate"
MAX_MESSAGE = 64 * 1024 * 1024
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs


def delegate_entry(uid: int = 0, spiffe_id: str = DELEGATE) -> dict[str, Any]:
    """The entry that makes this test process (root) the authorized delegate."""
    return {"spiffe_id": spiffe_id, "selectors": [{"type": "unix", "value": f"uid:{uid}"}]}


def entry(spiffe_id: str, *selectors: str, **extra: Any) -> dict[str, Any]:
    sels = [dict(zip(("type", "value"), s.split(":", 1), strict=True)) for s in selectors]
    return {"spiffe_id": spiffe_id, "selectors": sels, **extra}


def write_json(path: Path, document: object) -> None:
    """Replaces the file atomically, so a poller never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document))
    os.replace(tmp, path)


def sel(text: str) -> selector_pb2.Selector:
    kind, _, value = text.partition(":")
    return selector_pb2.Selector(type=kind, value=value)


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Polls until ``predicate()`` holds; fails the test at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


class Stream:
    """A server stream read by a background task, so a test can wait for "nothing more"
    without cancelling the call."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        try:
            while True:
                message = await self.call.read()
                await self._queue.put(message)
                if message is EOF:
                    return
        except grpc.aio.AioRpcError as exc:
            await self._queue.put(exc)
        except asyncio.CancelledError:
            await self._queue.put(EOF)

    async def next(self, within: float = 5.0) -> Any:
        item = await asyncio.wait_for(self._queue.get(), within)
        if isinstance(item, grpc.aio.AioRpcError):
            raise item
        assert item is not EOF, "stream ended"
        return item

    def cancel(self) -> None:
        self.call.cancel()


async def read(stream: Stream, within: float = 5.0) -> Any:
    """The next message of a server stream; fails on end-of-stream, error or timeout."""
    return await stream.next(within)


async def read_error(stream: Stream, within: float = 5.0) -> grpc.aio.AioRpcError:
    """Reads until the stream fails; returns the error."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with asyncio.timeout(within):
            while True:
                await stream.next(within)
    return info.value


async def no_message(stream: Stream, within: float = 0.3) -> None:
    """Asserts that nothing arrives for a short while (used sparingly, for negative checks)."""
    with pytest.raises(TimeoutError):
        message = await stream.next(within)
        raise AssertionError(f"unexpected message: {message!r}")


def exists(path: str | Path) -> bool:
    return os.path.exists(path)


def split_der(blob: bytes) -> list[x509.Certificate]:
    """Parses concatenated DER certificates (what SPIRE's marshalBundle produces)."""
    certs = []
    pos = 0
    while pos < len(blob):
        assert blob[pos] == 0x30, "not a DER SEQUENCE"
        first = blob[pos + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            n = first & 0x7F
            header, length = 2 + n, int.from_bytes(blob[pos + 2:pos + 2 + n], "big")
        certs.append(x509.load_der_x509_certificate(blob[pos:pos + header + length]))
        pos += header + length
    return certs


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


@dataclass
class Harness:
    """A running dev-spire and a stub connected to it."""

    dev: DevSpire
    stub: pb_grpc.DelegatedIdentityAsyncStub
    channel: grpc.aio.Channel
    entries_path: Path
    workload_entries: list[dict[str, Any]] = field(default_factory=list)

    async def set_entries(self, entries: list[dict[str, Any]], *,
                          with_delegate: bool = True) -> None:
        """Rewrites the entries file and waits until the poller has loaded it."""
        before = self.dev.stats.entries_reloads
        document = {"entries": ([delegate_entry()] if with_delegate else []) + entries}
        write_json(self.entries_path, document)
        await eventually(lambda: self.dev.stats.entries_reloads > before)

    def x509(self, *, pid: int = 0, selectors: tuple[str, ...] = ()) -> Stream:
        return Stream(self.stub.SubscribeToX509SVIDs(pb.SubscribeToX509SVIDsRequest(
            pid=pid, selectors=[sel(s) for s in selectors])))

    def x509_bundles(self) -> Stream:
        return Stream(self.stub.SubscribeToX509Bundles(pb.SubscribeToX509BundlesRequest()))

    def jwt_bundles(self) -> Stream:
        return Stream(self.stub.SubscribeToJWTBundles(pb.SubscribeToJWTBundlesRequest()))


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """A short directory under /tmp (Unix socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="devspire-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def make_harness(work_dir: Path) -> AsyncIterator[MakeHarness]:
    started: list[Harness] = []

    async def make(entries: list[dict[str, Any]] | None = None, *, with_delegate: bool = True,
                   clock: Callable[[], float] | None = None, **overrides: Any) -> Harness:
        index = len(started)
        entries_path = work_dir / f"entries{index}.json"
        document = {"entries": ([delegate_entry()] if with_delegate else []) + (entries or [])}
        write_json(entries_path, document)
        settings = DevSpireSettings(
            socket_path=str(work_dir / f"admin{index}.sock"), trust_domain=TD,
            entries_path=str(entries_path), authorized_delegates=(DELEGATE,),
            reload_interval=0.05)
        settings = replace(settings, **overrides)
        dev = DevSpire(settings, clock=clock) if clock else DevSpire(settings)
        await dev.start()
        channel = grpc.aio.insecure_channel(
            "unix:" + settings.socket_path,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
        harness = Harness(dev, pb_grpc.DelegatedIdentityStub(channel), channel, entries_path)
        started.append(harness)
        return harness

    yield make
    for harness in started:
        await harness.channel.close(None)
        await harness.dev.stop(grace=0)


@pytest.fixture
async def harness(make_harness: MakeHarness) -> Harness:
    return await make_harness()


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

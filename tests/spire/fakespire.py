"""A scripted Delegated Identity servicer on a Unix socket, standing in for a SPIRE agent."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb
from agent._proto.spire.api.agent.delegatedidentity.v1 import (
    delegatedidentity_pb2_grpc as pb_grpc,
)
from agent.spire import BackoffPolicy, convert

# Fast but real back-off for tests that reconnect.
FAST = BackoffPolicy(initial=0.01, maximum=0.05, reset_after=30.0)


@dataclass(frozen=True)
class Abort:
    code: grpc.StatusCode
    details: str = ""


@dataclass(frozen=True)
class End:
    """The server returns from the stream handler (status OK)."""


Step = Any  # a response message, Abort or End


@dataclass
class Scripts:
    """One list of steps per call of a method; once a stream's steps run out it stays open."""

    x509_svids: collections.deque[list[Step]] = field(default_factory=collections.deque)
    x509_bundles: collections.deque[list[Step]] = field(default_factory=collections.deque)
    jwt_bundles: collections.deque[list[Step]] = field(default_factory=collections.deque)
    jwt_svids: collections.deque[Step] = field(default_factory=collections.deque)


class FakeSpire(pb_grpc.DelegatedIdentityServicer):
    """Plays back scripted answers and records what the client asked for."""

    def __init__(self, scripts: Scripts | None = None) -> None:
        self.scripts = scripts or Scripts()
        self.requests: list[Any] = []
        self.streams_open = 0
        self.streams_cancelled = 0
        self.changed = asyncio.Event()

    def _note(self) -> None:
        self.changed.set()

    async def _play(self, queue: collections.deque[list[Step]],
                    context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        steps = queue.popleft() if queue else []
        self.streams_open += 1
        self._note()
        try:
            for step in steps:
                if isinstance(step, Abort):
                    await context.abort(step.code, step.details)
                if isinstance(step, End):
                    return
                yield step
            await asyncio.Event().wait()  # stay open, as SPIRE does
        except asyncio.CancelledError:
            self.streams_cancelled += 1
            raise
        finally:
            self.streams_open -= 1
            self._note()

    async def SubscribeToX509SVIDs(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.requests.append(request)
        async for item in self._play(self.scripts.x509_svids, context):
            yield item

    async def SubscribeToX509Bundles(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.requests.append(request)
        async for item in self._play(self.scripts.x509_bundles, context):
            yield item

    async def SubscribeToJWTBundles(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.requests.append(request)
        async for item in self._play(self.scripts.jwt_bundles, context):
            yield item

    async def FetchJWTSVIDs(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        step = self.scripts.jwt_svids.popleft() if self.scripts.jwt_svids else Abort(
            grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        if isinstance(step, Abort):
            await context.abort(step.code, step.details)
        return step


class SpireServer:
    """A grpc.aio server for a FakeSpire on a Unix socket; can be stopped and restarted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server: grpc.aio.Server | None = None
        self.spire = FakeSpire()

    async def start(self, spire: FakeSpire | None = None) -> FakeSpire:
        if spire is not None:
            self.spire = spire
        server = grpc.aio.server()
        pb_grpc.add_DelegatedIdentityServicer_to_server(self.spire, server)
        server.add_insecure_port(f"unix:{self.path}")
        await server.start()
        self.server = server
        return self.spire

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=None)
            self.server = None
        self.path.unlink(missing_ok=True)  # as a stopped SPIRE agent leaves no socket


def x509_response(
    *svids: Any, federates_with: tuple[str, ...] = ()
) -> pb.SubscribeToX509SVIDsResponse:
    return pb.SubscribeToX509SVIDsResponse(
        x509_svids=[convert.x509_svid_to_proto(s) for s in svids],
        federates_with=list(federates_with),
    )

"""Hand-driven SDS clients (grpc.aio) for protocol tests: every request is explicit."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

from agent.sds.resources import SECRET_TYPE_URL

NODE = base_pb2.Node(id="test-client", cluster="test")


def secrets_of(response: Any) -> dict[str, Any]:
    """Name -> Secret of a DiscoveryResponse or DeltaDiscoveryResponse."""
    out = {}
    for item in response.resources:
        packed = item.resource if isinstance(item, discovery_pb2.Resource) else item
        secret = secret_pb2.Secret()
        packed.Unpack(secret)
        out[secret.name] = secret
    return out


class _StreamClient:
    """What both stream clients share: the channel, the call, and reading responses."""

    channel: grpc.aio.Channel
    call: Any
    last: Any = None

    async def read(self, timeout: float = 5.0) -> Any:  # noqa: ASYNC109
        response = await asyncio.wait_for(self.call.read(), timeout)
        assert response is not grpc.aio.EOF, "the stream ended"
        self.last = response
        return response

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


class SotwClient(_StreamClient):
    """One StreamSecrets stream. ``options``: channel options (grpc.aio)."""

    def __init__(self, socket: Path | str, options: Sequence[tuple[str, Any]] = ()) -> None:
        self.channel = grpc.aio.insecure_channel(f"unix:{socket}", options=list(options))
        self.call = sds_pb2_grpc.SecretDiscoveryServiceStub(self.channel).StreamSecrets()
        self.last: Any = None

    async def request(self, names: Sequence[str], *, nonce: str = "", version: str = "",
                      error: str | None = None, type_url: str = SECRET_TYPE_URL,
                      node: bool = True) -> None:
        request = discovery_pb2.DiscoveryRequest(
            resource_names=list(names), response_nonce=nonce, version_info=version,
            type_url=type_url)
        if node:
            request.node.CopyFrom(NODE)
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
        await self.call.write(request)


    async def ack(self, names: Sequence[str]) -> None:
        await self.request(names, nonce=self.last.nonce, version=self.last.version_info)

    async def nack(self, names: Sequence[str], version: str, error: str) -> None:
        await self.request(names, nonce=self.last.nonce, version=version, error=error)

    async def status(self, timeout: float = 5.0) -> tuple[grpc.StatusCode, str]:  # noqa: ASYNC109
        """Reads until the stream ends; returns its status (responses are dropped)."""
        try:
            while await asyncio.wait_for(self.call.read(), timeout) is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
        return await self.call.code(), await self.call.details()



class DeltaClient(_StreamClient):
    """One DeltaSecrets stream."""

    def __init__(self, socket: Path | str) -> None:
        self.channel = grpc.aio.insecure_channel(f"unix:{socket}")
        self.call = sds_pb2_grpc.SecretDiscoveryServiceStub(self.channel).DeltaSecrets()
        self.last: Any = None

    async def request(self, subscribe: Sequence[str] = (), unsubscribe: Sequence[str] = (),
                      *, nonce: str = "", error: str | None = None,
                      initial: Mapping[str, str] | None = None, node: bool = False) -> None:
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=SECRET_TYPE_URL, resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe), response_nonce=nonce,
            initial_resource_versions=dict(initial or {}))
        if node:
            request.node.CopyFrom(NODE)
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
        await self.call.write(request)

    async def ack(self) -> None:
        await self.request(nonce=self.last.nonce)



async def fetch(socket: Path | str, names: Sequence[str], *,
                type_url: str = SECRET_TYPE_URL, timeout: float = 10.0) -> Any:  # noqa: ASYNC109
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        return await stub.FetchSecrets(discovery_pb2.DiscoveryRequest(
            resource_names=list(names), type_url=type_url, node=NODE), timeout=timeout)

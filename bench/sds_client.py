"""The SDS client the benchmarks run inside a pod (a real process in a pod's cgroups).

    python -m bench.sds_client --sds SOCKET [--floor SOCKET] [--names default,ROOTCA]

Prints ``ready`` once imported, then obeys one command per stdin line and answers each
with one JSON line on stdout (times in milliseconds, measured here, in the pod):

* ``first``: one new connection, one StreamSecrets stream, the first response (a cold
  first SVID when the agent has never seen this pod);
* ``warm N``: N rounds, each taking, in this order, the floor (a unary call on an open
  connection to ``--floor``), a new stream on an open connection to the agent, then the
  same two on new connections; keeps one anchor stream open on its own connection
  throughout (an Envoy holds its streams), so the pod stays watched;
* ``use SOCKET``: the agent's socket from now on;
* ``hold``: a stream for ``--names`` (the client's own SVID), kept open;
* ``workloads UID,UID,...``: a trusted proxy's streams, one per pod UID asking for
  ``workload:<uid>``, all opened at once and kept open; the time until every one has its
  first response;
* ``release``: closes the streams ``hold`` and ``workloads`` keep;
* ``quit``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
FLOOR_METHOD = "/bench.Floor/Attest"
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
NODE = base_pb2.Node(id="bench-client", cluster="bench")
_TIMEOUT = 30.0


def _request(names: list[str]) -> Any:
    return discovery_pb2.DiscoveryRequest(resource_names=names, type_url=SECRET_TYPE_URL,
                                          node=NODE)


async def first_response(channel: grpc.aio.Channel, names: list[str]) -> int:
    """Opens a stream, asks for ``names``, returns how many resources the first response
    carried; the stream is cancelled after it."""
    call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()
    try:
        await call.write(_request(names))
        response = await asyncio.wait_for(call.read(), _TIMEOUT)
        if response is EOF:
            raise RuntimeError(f"stream ended: {await call.code()} {await call.details()}")
        return len(response.resources)
    finally:
        call.cancel()


async def _stream_ms(channel: grpc.aio.Channel, names: list[str]) -> float:
    t0 = time.perf_counter()
    got = await first_response(channel, names)
    elapsed = (time.perf_counter() - t0) * 1000
    if got != len(names):
        raise RuntimeError(f"first response had {got} resources, asked {len(names)}")
    return elapsed


def _floor_call(channel: grpc.aio.Channel, payload: bytes) -> Any:
    """The floor's unary call (raw bytes both ways)."""
    method: Any = channel.unary_unary(FLOOR_METHOD)  # type: ignore[call-arg]
    return method(payload, timeout=_TIMEOUT)


async def _floor_ms(channel: grpc.aio.Channel, payload: bytes) -> float:
    t0 = time.perf_counter()
    await _floor_call(channel, payload)
    return (time.perf_counter() - t0) * 1000


async def _new_connection_ms(socket: str, what: Any) -> float:
    t0 = time.perf_counter()
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        await what(channel)
    return (time.perf_counter() - t0) * 1000


async def warm(args: argparse.Namespace, rounds: int) -> dict[str, list[float]]:
    names = args.names.split(",")
    payload = str(os.getpid()).encode()
    out: dict[str, list[float]] = {"floor": [], "stream": [], "floor_conn": [],
                                   "stream_conn": []}
    async with grpc.aio.insecure_channel(f"unix:{args.sds}") as anchor_channel, \
            grpc.aio.insecure_channel(f"unix:{args.sds}") as agent, \
            grpc.aio.insecure_channel(f"unix:{args.floor}") as floor:
        anchor = sds_pb2_grpc.SecretDiscoveryServiceStub(anchor_channel).StreamSecrets()
        await anchor.write(_request(names))
        await asyncio.wait_for(anchor.read(), _TIMEOUT)
        # One untimed round opens both connections.
        await _floor_ms(floor, payload)
        await _stream_ms(agent, names)
        for _ in range(rounds):
            out["floor"].append(await _floor_ms(floor, payload))
            out["stream"].append(await _stream_ms(agent, names))
            out["floor_conn"].append(await _new_connection_ms(
                args.floor, lambda ch: _floor_call(ch, payload)))
            out["stream_conn"].append(await _new_connection_ms(
                args.sds, lambda ch: first_response(ch, names)))
        anchor.cancel()
    return out


class Held:
    """Streams kept open between commands (a proxy holds its streams)."""

    def __init__(self) -> None:
        self.channels: list[grpc.aio.Channel] = []
        self.calls: list[Any] = []

    def channel(self, socket: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"unix:{socket}")
        self.channels.append(channel)
        return channel

    async def release(self) -> dict[str, int]:
        count = len(self.calls)
        for call in self.calls:
            call.cancel()
        for channel in self.channels:
            await channel.close(None)
        self.calls.clear()
        self.channels.clear()
        return {"released": count}


async def hold(args: argparse.Namespace, held: Held) -> dict[str, float]:
    """The client's own stream (``--names``), kept open; the time to its first response."""
    call = sds_pb2_grpc.SecretDiscoveryServiceStub(held.channel(args.sds)).StreamSecrets()
    held.calls.append(call)
    t0 = time.perf_counter()
    await call.write(_request(args.names.split(",")))
    response = await asyncio.wait_for(call.read(), _TIMEOUT)
    if response is EOF:
        raise RuntimeError(f"stream ended: {await call.code()} {await call.details()}")
    return {"ms": (time.perf_counter() - t0) * 1000}


async def workloads(args: argparse.Namespace, uids: list[str], held: Held) -> dict[str, Any]:
    """One stream per pod, all opened at once on one connection (a ztunnel-style proxy),
    kept open; the time until every one has had its first response."""
    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(held.channel(args.sds))
    calls = [stub.StreamSecrets() for _ in uids]
    held.calls.extend(calls)
    t0 = time.perf_counter()

    async def one(call: Any, uid: str) -> float:
        await call.write(_request([f"workload:{uid}"]))
        response = await asyncio.wait_for(call.read(), _TIMEOUT * 2)
        if response is EOF:
            raise RuntimeError(f"{uid}: {await call.code()} {await call.details()}")
        return (time.perf_counter() - t0) * 1000

    times = await asyncio.gather(*(one(c, u) for c, u in zip(calls, uids, strict=True)))
    return {"all_ms": max(times), "each_ms": list(times), "served": len(times)}


async def serve(args: argparse.Namespace) -> None:
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    held = Held()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if not line or line == "quit":
            return
        command, _, rest = line.partition(" ")
        result: Any
        try:
            if command == "first":
                result = {"ms": await _new_connection_ms(
                    args.sds, lambda ch: _stream_ms(ch, args.names.split(",")))}
            elif command == "warm":
                result = await warm(args, int(rest))
            elif command == "use":
                args.sds = rest
                result = {"sds": rest}
            elif command == "hold":
                result = await hold(args, held)
            elif command == "workloads":
                result = await workloads(args, rest.split(","), held)
            elif command == "release":
                result = await held.release()
            else:
                result = {"error": f"unknown command {command!r}"}
        except Exception as exc:  # reported to the benchmark, which fails with it
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sds", required=True)
    parser.add_argument("--floor", default="")
    parser.add_argument("--names", default="default,ROOTCA")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()

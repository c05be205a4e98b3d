"""The client side of the fan-out benchmark, run as its own process (``python -m
bench.fanout_client``) so that the agent and its clients never share a CPU-bound loop.

It opens one StreamSecrets stream per name given (a name may repeat), spread over
``--channels`` HTTP/2 connections, ACKs every response, and notes the moment each stream
receives each response (``time.monotonic()``: CLOCK_MONOTONIC, the same clock in every
process of the machine). Once every stream has its n-th response it prints one JSON line
for round n (0 is the first response): the earliest and latest receipt, and the client's
own CPU seconds so far. Errors are printed as ``{"error": ...}`` and end the process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from agent.sds.resources import SECRET_TYPE_URL

NODE = base_pb2.Node(id="fanout-bench", cluster="bench")


class Rounds:
    """Receipt times per round; prints a round once every stream has had it."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.times: dict[int, list[float]] = {}

    def received(self, round_number: int, at: float) -> None:
        times = self.times.setdefault(round_number, [])
        times.append(at)
        if len(times) == self.streams:
            del self.times[round_number]
            emit({"round": round_number, "first": min(times), "last": max(times),
                  "cpu": time.process_time()})


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def follow(stub: Any, name: str, rounds: Rounds) -> None:
    call = stub.StreamSecrets()
    await call.write(discovery_pb2.DiscoveryRequest(resource_names=[name],
                                                    type_url=SECRET_TYPE_URL, node=NODE))
    number = 0
    while (response := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        rounds.received(number, time.monotonic())
        number += 1
        await call.write(discovery_pb2.DiscoveryRequest(
            resource_names=[name], type_url=SECRET_TYPE_URL,
            version_info=response.version_info, response_nonce=response.nonce))
    raise RuntimeError(f"the stream for {name} ended: {await call.code()}")


async def main(socket: str, names: Sequence[str], channels: int) -> None:
    # A local subchannel pool: each channel is its own connection (gRPC would otherwise
    # share one subchannel between channels with the same target and options).
    opened = [grpc.aio.insecure_channel(f"unix:{socket}",
                                        options=[("grpc.use_local_subchannel_pool", 1)])
              for _ in range(channels)]
    stubs = [sds_pb2_grpc.SecretDiscoveryServiceStub(c) for c in opened]
    rounds = Rounds(len(names))
    tasks = [asyncio.create_task(follow(stubs[i % channels], name, rounds))
             for i, name in enumerate(names)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in opened:
            await channel.close(None)


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="streams per name")
    parser.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    names = [name for name in args.names for _ in range(args.repeat)]
    try:
        asyncio.run(main(args.socket, names, args.channels))
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # reported to the benchmark, which fails with it
        emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())

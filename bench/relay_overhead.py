"""Measures what the peer-credential relay costs: gRPC round trips direct vs through it.

Run: python bench/relay_overhead.py [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from grpc import aio

from agent.uds.relay import PeerCredentialRelay

SERVICE = "bench.Echo"


async def _server(relay: PeerCredentialRelay, direct: Path) -> aio.Server:
    async def echo(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        relay.lookup(context.peer())
        return request

    async def stream(request: bytes, context: aio.ServicerContext[bytes, bytes]):  # type: ignore[no-untyped-def]
        for _ in range(int(request)):
            yield b"x" * 2048

    server = aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Stream": grpc.unary_stream_rpc_method_handler(stream)}),))
    server.add_insecure_port(relay.inner_target)
    server.add_insecure_port(f"unix:{direct}")
    await server.start()
    await relay.start()
    return server


async def _unary(path: Path, calls: int) -> list[float]:
    async with aio.insecure_channel(f"unix:{path}") as channel:
        call = channel.unary_unary(f"/{SERVICE}/Echo")
        await call(b"warm")
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await call(b"x" * 256)
            times.append(time.perf_counter() - t0)
        return times


async def _connect(path: Path, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        async with aio.insecure_channel(f"unix:{path}") as channel:
            await channel.unary_unary(f"/{SERVICE}/Echo")(b"x")
        times.append(time.perf_counter() - t0)
    return times


async def _stream(path: Path, messages: int) -> float:
    async with aio.insecure_channel(f"unix:{path}") as channel:
        t0 = time.perf_counter()
        async for _ in channel.unary_stream(f"/{SERVICE}/Stream")(str(messages).encode()):
            pass
        return time.perf_counter() - t0


def _row(name: str, direct: list[float], relayed: list[float]) -> str:
    d50, r50 = statistics.median(direct), statistics.median(relayed)
    d99 = statistics.quantiles(direct, n=100)[98]
    r99 = statistics.quantiles(relayed, n=100)[98]
    return (f"| {name} | {d50 * 1e6:.0f} us | {r50 * 1e6:.0f} us | {r50 / d50:.2f}x "
            f"| {d99 * 1e6:.0f} us | {r99 * 1e6:.0f} us |")


async def main(calls: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        relay = PeerCredentialRelay(Path(tmp) / "pub.sock")
        server = await _server(relay, Path(tmp) / "direct.sock")
        try:
            print("| measure | direct p50 | relayed p50 | ratio | direct p99 | relayed p99 |")
            print("|---|---|---|---|---|---|")
            print(_row("unary round trip", await _unary(Path(tmp) / "direct.sock", calls),
                       await _unary(relay.public_path, calls)))
            print(_row("connect + first call", await _connect(Path(tmp) / "direct.sock", 200),
                       await _connect(relay.public_path, 200)))
            d = await _stream(Path(tmp) / "direct.sock", 20000)
            r = await _stream(relay.public_path, 20000)
            print(f"| 20,000 x 2 KiB streamed | {d * 1e3:.0f} ms | {r * 1e3:.0f} ms "
                  f"| {r / d:.2f}x | | |")
        finally:
            await relay.close()
            await server.stop(None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    asyncio.run(main(parser.parse_args().calls))

"""The transport floor of the fan-out benchmark: the least a Python SDS server on the
agent's transport must do to push one response to each of many streams.

Run as its own process (``python -m bench.fanout_peer --socket PATH``): a grpc.aio server
behind the agent's own peer-credential relay (agent/uds/relay.py), with the agent's server
options, serving StreamSecrets. Every stream is answered at once, its ACKs are read and
dropped, and on SIGUSR1 every stream is sent a new response: a DiscoveryResponse packing a
Secret built once per resource name (from an SVID minted at start), serialized by gRPC.
No attestation, no cache, no re-checks, no bookkeeping: what is left is gRPC, the relay and
one task per stream on one event loop, as in the agent. Prints ``ready`` once serving.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from agent.sds.resources import SECRET_TYPE_URL, tls_certificate_secret
from agent.uds.relay import PeerCredentialRelay


class Peer(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        from tests.sds.pki import make_ca, make_svid

        self._ca = make_ca("example.org")
        self._make_svid = make_svid
        self._secrets: dict[str, secret_pb2.Secret] = {}
        self._round = 0
        self._changed = asyncio.Event()

    def rotate(self) -> None:
        self._round += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _secret(self, name: str) -> secret_pb2.Secret:
        secret = self._secrets.get(name)
        if secret is None:
            svid = self._make_svid(self._ca, f"spiffe://example.org/peer/{len(self._secrets)}")
            secret = self._secrets[name] = tls_certificate_secret(name, svid)
        return secret

    async def StreamSecrets(self, request_iterator: Any, context: Any) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:  # type: ignore[attr-defined]
            return
        secret = self._secret(first.resource_names[0] if first.resource_names else "")

        async def drain() -> None:
            while await context.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass

        reader = asyncio.create_task(drain())
        try:
            while True:
                changed = self._changed
                response = discovery_pb2.DiscoveryResponse(
                    version_info=str(self._round), nonce=os.urandom(4).hex(),
                    type_url=SECRET_TYPE_URL)
                response.resources.add().Pack(secret)
                await context.write(response)
                await changed.wait()
        finally:
            reader.cancel()


async def main(socket: Path) -> None:
    relay = PeerCredentialRelay(socket)
    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 1024)])
    peer = Peer()
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(peer, server)
    server.add_insecure_port(relay.inner_target)
    await server.start()
    await relay.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, peer.rotate)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await relay.close()
        await server.stop(None)


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True, type=Path)
    asyncio.run(main(parser.parse_args(argv).socket))
    return 0


if __name__ == "__main__":
    sys.exit(cli())

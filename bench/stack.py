"""dev-spire (in-process) for the benchmarks, its entries, a raw gRPC floor server, and the
agent as a child process."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from agent.devspire import DevSpire, DevSpireSettings
from tests.reliability.endurance_support import AgentProcess

TD = "example.org"
DELEGATE = f"spiffe://{TD}/spiffe-delegate"
PARENT = f"spiffe://{TD}/spire/agent/dev"
FLOOR_SERVICE = "bench.Floor"


def entry(spiffe_id: str, *selectors: str) -> dict[str, Any]:
    """A registration entry in `spire-server entry create -data` shape."""
    pairs = [dict(zip(("type", "value"), s.split(":", 1), strict=True)) for s in selectors]
    return {"spiffe_id": spiffe_id, "parent_id": PARENT, "selectors": pairs}


def delegate_entry() -> dict[str, Any]:
    """The agent's own entry: root, group 0, this Python (pod clients run with another
    group, see bench/pods.py, so they never match it)."""
    return entry(DELEGATE, f"unix:uid:{os.getuid()}", f"unix:gid:{os.getgid()}",
                 f"unix:path:{os.readlink('/proc/self/exe')}")


def write_json(path: Path, document: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document))
    os.replace(tmp, path)


async def start_dev_spire(work: Path, entries: Sequence[dict[str, Any]],
                          pods: Sequence[dict[str, Any]] = ()) -> DevSpire:
    """dev-spire on ``work/admin.sock`` with the delegate's entry and ``entries``."""
    entries_path, pods_path = work / "entries.json", work / "pods.json"
    write_json(entries_path, {"entries": [delegate_entry(), *entries]})
    write_json(pods_path, {"pods": list(pods)})
    spire = DevSpire(DevSpireSettings(
        socket_path=str(work / "admin.sock"), trust_domain=TD,
        entries_path=str(entries_path), pods_path=str(pods_path),
        authorized_delegates=(DELEGATE,)))
    await spire.start()
    return spire


def read_stat_and_cgroup(pid: int) -> None:
    """What attesting a PID reads at least (the agent, too, reads /proc on its loop)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        stat.read()
    with open(f"/proc/{pid}/cgroup", "rb") as cgroup:
        cgroup.read()


async def start_floor(socket: Path) -> grpc.aio.Server:
    """The floor: a raw gRPC unary method on a Unix socket that does the /proc reads
    attestation needs (stat and cgroup of the PID the request names: the caller's)."""

    async def attest(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
                     ) -> bytes:
        read_stat_and_cgroup(int(request))
        return b"ok"

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(FLOOR_SERVICE, {
        "Attest": grpc.unary_unary_rpc_method_handler(attest)}),))
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    return server


class AgentChild(AgentProcess):
    """``spiffe-delegate run`` as a child process (its RSS and CPU are its own): the
    endurance suite's :class:`AgentProcess`, plus sums of the agent's metrics."""

    def metric_sum(self, name: str) -> float:
        """The sum of every sample of metric ``name`` (all labels), from one scrape."""
        return sum(sample.value
                   for family in text_string_to_metric_families(self.metrics_text())
                   for sample in family.samples if sample.name == name)


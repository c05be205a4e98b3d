"""dev-spire (in-process) for the benchmarks, its entries, a raw gRPC floor server, and the
agent as a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from agent.devspire import DevSpire, DevSpireSettings
from bench.procstack import stop_process

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


@dataclass
class AgentChild:
    """``spiffe-delegate run`` as a child process (its RSS and CPU are its own).

    ``args`` are the options after ``run``; its log goes to ``log_path``; its metrics are
    served on ``metrics_port``. ``prelude``: Python run in it before the agent starts."""

    args: Sequence[str]
    log_path: Path
    metrics_port: int
    prelude: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        options = [*self.args, "--metrics-address", f"127.0.0.1:{self.metrics_port}"]
        if self.prelude is None:
            command = [sys.executable, "-m", "agent", "run", *options]
        else:
            code = (self.prelude + "\nimport sys\nfrom agent.cli import main\n"
                    "sys.argv = ['spiffe-delegate', *sys.argv[1:]]\nsys.exit(main())\n")
            command = [sys.executable, "-c", code, "run", *options]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.process is not None, "the agent was not started"
        return self.process.pid

    def check_alive(self) -> None:
        assert self.process is not None, "the agent was not started"
        if self.process.poll() is not None:
            raise RuntimeError(f"the agent exited with status {self.process.returncode}"
                               + self.log_tail())

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n--- agent log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    def metric_sum(self, name: str) -> float:
        """The sum of every sample of metric ``name`` (all labels), from one scrape."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples if sample.name == name)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``. Idempotent."""
        stop_process(self.process, timeout)


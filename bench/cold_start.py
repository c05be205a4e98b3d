"""Cold start: from exec of ``spiffe-delegate run`` to a waiting Envoy holding its SVID.

dev-spire runs as a subprocess and stays up. One Envoy, under its own uid (its entry is
``unix:uid:<uid>``), runs for the whole benchmark with the SDS config source of the shipped
configs (``retry_back_off`` 0.1 s base, 0.5 s max) and asks for ``default`` and ``ROOTCA``.
Each round: the agent is not running (Envoy has been backing off for 1-1.5 s, a random gap
so the exec does not fall in step with Envoy's retry timers), the agent is exec'd, and this
process polls, every ~2 ms, for the SDS socket file and Envoy's admin ``/stats``
(``sds.default.update_success``): done when Envoy has accepted a new ``default``. The
agent logs (JSON, INFO as shipped, millisecond timestamps) when it first served
``default`` on a stream: the time between the socket appearing and that is Envoy's wait
for its next reconnect of that stream (Envoy runs one SDS stream, with its own back-off
timer, per secret) plus the attestation. Then the agent gets SIGTERM, the next round starts.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path

from bench.harness import BenchResult, Context, Row, percentile
from bench.procstack import (
    ENVOY_UID,
    TD,
    Child,
    agent_command,
    dev_spire,
    entry,
    python_env,
    stopping,
    wait_for,
    write_entries,
)

TITLE = "Cold start to Envoy holding its certificate"
ENVOY_ID = f"spiffe://{TD}/ns/bench/sa/envoy"
TARGET_MS = 500.0
# What is polled: `default` updates Envoy accepted.
_STATS = r"^sds\.default\.update_success$"
# The agent's INFO line for a stream's first push of `default`.
_SERVED = re.compile(r'^\{"time": "([^"]+)Z".*"msg": "SDS serving \\"default\\" to ')


class EnvoyStats:
    """Envoy's admin /stats over one kept-alive connection (a poll costs ~1 ms)."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._conn = http.client.HTTPConnection(host, int(port), timeout=5)
        self._path = "/stats?filter=" + urllib.parse.quote(_STATS, safe="")

    def read(self) -> int:
        """`default` updates accepted."""
        self._conn.request("GET", self._path)
        body = self._conn.getresponse().read().decode()
        values = {}
        for line in body.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                values[name] = int(value)
        return values.get("sds.default.update_success", 0)

    def close(self) -> None:
        self._conn.close()


def _envoy_config(sds_socket: Path) -> dict[str, object]:
    from tests.envoyproc import sds_bootstrap  # the shipped SDS config source's shape

    return sds_bootstrap(sds_socket, tls_certificates=["default"],
                         validation_contexts=["ROOTCA"], node_id="bench-cold-start",
                         initial_fetch_timeout="5s", retry_base="0.1s", retry_max="0.5s")


def _start_envoy(work: Path) -> tuple[Child, str]:
    from agent.demo.envoy import envoy_binary
    from tests.reliability.endurance_support import setpriv_wrapper

    directory = work / "envoy"
    directory.mkdir(mode=0o755)
    os.chown(directory, ENVOY_UID, ENVOY_UID)
    config = directory / "bootstrap.json"
    config.write_text(json.dumps(_envoy_config(work / "sds.sock")))
    address_file = directory / "admin-address"
    wrapper = setpriv_wrapper(directory, envoy_binary(), ENVOY_UID)
    envoy = Child([str(wrapper), "-c", str(config), "--disable-hot-restart",
                   "--concurrency", "1", "--use-dynamic-base-id", "--admin-address-path",
                   str(address_file), "-l", "warning"], directory / "envoy.log").start()
    try:
        wait_for(lambda: envoy.alive() and address_file.exists()
                 and bool(address_file.read_text().strip()), 30, "Envoy's admin address")
    except BaseException:
        envoy.stop()
        raise
    return envoy, address_file.read_text().strip()


def _exec_floor(code: str, runs: int) -> list[float]:
    """Milliseconds from exec to exit of ``python -c code`` (this venv's interpreter)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=python_env())
        times.append((time.perf_counter() - started) * 1000)
    return times



def _one_round(work: Path, stats: EnvoyStats, log: Path) -> dict[str, float]:
    """Exec the agent, poll until Envoy accepted a new `default`; ms from exec to: the
    socket file, the agent serving `default`, Envoy's accepted update. The agent is
    stopped after."""
    socket = work / "sds.sock"
    if socket.exists():
        raise RuntimeError(f"{socket} is still there before the agent starts")
    updates0 = stats.read()
    agent = Child(agent_command(work, "--health-address", "127.0.0.1:0",
                                "--metrics-address", "127.0.0.1:0", "--log-level", "info",
                                "--log-format", "json"), log, python_env())
    marks: dict[str, float] = {}
    with stopping(agent):
        wall = time.time()
        agent.start()
        started = agent.started_at
        deadline = started + 30
        while True:
            now = time.perf_counter()
            if "socket" not in marks and socket.exists():
                marks["socket"] = now
            updates = stats.read()
            now = time.perf_counter()
            if updates > updates0:
                marks["held"] = now
                marks.setdefault("socket", now)
                break
            if now > deadline:
                agent.check_alive()
                raise TimeoutError("Envoy got no new `default` within 30 s:\n" + agent.tail())
            time.sleep(0.002)
    out = {key: (value - started) * 1000 for key, value in marks.items()}
    out["served"] = min(_served_at(log, wall), out["held"])
    return out


def _served_at(log: Path, wall_start: float) -> float:
    """Milliseconds from exec to the agent's first push of `default` (from its log)."""
    for line in log.read_text(errors="replace").splitlines():
        found = _SERVED.match(line)
        if found:
            moment = datetime.strptime(found.group(1), "%Y-%m-%dT%H:%M:%S.%f")
            return (moment.replace(tzinfo=UTC).timestamp() - wall_start) * 1000
    raise RuntimeError(f"no 'SDS serving \"default\"' line in {log}")


def run(ctx: Context) -> BenchResult:
    from agent.podsim import PodCgroupsUnavailable  # noqa: F401  (root check below)

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        raise RuntimeError("needs root and setpriv (Envoy runs under its own uid)")
    rounds = ctx.size(12, 3)
    work = ctx.workdir
    work.chmod(0o755)
    entries = work / "entries.json"
    write_entries(entries, [entry(ENVOY_ID, f"unix:uid:{ENVOY_UID}")])
    spire = dev_spire(work, entries)
    envoy: Child | None = None
    results: list[dict[str, float]] = []
    with stopping(spire):
        envoy, admin = _start_envoy(work)
        with stopping(envoy):
            stats = EnvoyStats(admin)
            try:
                for number in range(rounds):
                    time.sleep(random.uniform(1.0, 1.5))  # Envoy backs off meanwhile
                    envoy.check_alive()
                    results.append(_one_round(work, stats, work / f"agent-{number}.log"))
            finally:
                stats.close()
    floor_pass = _exec_floor("pass", ctx.size(10, 3))
    floor_imports = _exec_floor("import grpc, cryptography", ctx.size(10, 3))
    return _result(results, floor_pass, floor_imports)


def _result(results: list[dict[str, float]], floor_pass: list[float],
            floor_imports: list[float]) -> BenchResult:
    held = [r["held"] for r in results]
    socket = [r["socket"] for r in results]
    envoy_wait = [max(r["served"] - r["socket"], 0.0) for r in results]
    applied = [max(r["held"] - r["served"], 0.0) for r in results]
    pass_row = Row.of("python -c pass (exec to exit)", "ms", floor_pass)
    import_row = Row.of("python -c 'import grpc, cryptography' (exec to exit)", "ms",
                        floor_imports)
    held_row = Row.of("exec of run -> Envoy holds its SVID", "ms", held).against(
        import_row, target=f"p50 < {TARGET_MS:.0f} ms",
        met=percentile(held, 50) < TARGET_MS)
    rows = [
        pass_row,
        import_row,
        Row.of("exec of run -> SDS socket exists", "ms", socket).against(import_row),
        Row.of("socket exists -> agent serves `default` (rest of start-up, Envoy's "
               "back-off, attestation)",
               "ms", envoy_wait),
        Row.of("agent serves `default` -> Envoy has applied it", "ms", applied),
        held_row,
    ]
    wait_share = sum(envoy_wait) / sum(held) if sum(held) else 0.0
    socket_share = sum(socket) / sum(held) if sum(held) else 0.0
    details = {
        "cold_start_p50_ms": round(percentile(held, 50), 1),
        "cold_start_p99_ms": round(percentile(held, 99), 1),
        "socket_ready_p50_ms": round(percentile(socket, 50), 1),
        "python_floor_ms": round(percentile(floor_imports, 50), 1),
        "python_pass_ms": round(percentile(floor_pass, 50), 1),
        "envoy_wait_p50_ms": round(percentile(envoy_wait, 50), 1),
        "envoy_wait_share": round(wait_share, 3),
        "socket_share": round(socket_share, 3),
        "rounds": len(results),
    }
    notes = [
        "**Cold start.** Each round execs `python -m agent run` (health and metrics "
        "served, INFO logs as JSON) while dev-spire is up and one Envoy is already running "
        "with the shipped SDS config source (`retry_back_off` 0.1 s base, 0.5 s max) and has "
        "been backing off for a random 1-1.5 s; the benchmark polls every ~2 ms for the "
        "socket file and Envoy's `sds.default.update_success`, and stops at Envoy's first "
        "accepted `default` from the new agent. The rows split that time at the socket "
        "file appearing (the interpreter and the command line's imports: `run` binds the "
        "socket before it imports grpc and the agent, so that an Envoy reconnecting "
        "meanwhile waits in the listen backlog; "
        f"{socket_share:.0%} of the total) and at the agent's first push of `default` "
        "(its log): between the two, overlapping, are the rest of the agent's start-up "
        "(imports, connecting to SPIRE), Envoy's wait for the next reconnect of that "
        "stream, and the attestation "
        f"(together {wait_share:.0%} of the total). Envoy runs one SDS stream per secret, "
        "each with its own back-off timer, so `ROOTCA` often reconnects well before "
        "`default`. Floors: `python -c pass` and `python -c 'import grpc, "
        "cryptography'`, exec to exit, in the same run.",
    ]
    p50, p99 = percentile(held, 50), percentile(held, 99)
    done = (
        "What it took: `run` binds the SDS socket right after argument parsing, before "
        "grpc and the agent's modules are imported, and hands the listening socket to the "
        "SDS server, so an Envoy reconnecting meanwhile waits in the listen backlog "
        "instead of backing off again; and nothing on the command line's path imports "
        "py-spiffe any more (its package `__init__` loads its Workload API client, gRPC "
        "stubs, PyJWT and pyasn1's RFC 5280 module, ~130 ms: "
        "`docs/profiles/cold_start-importtime.txt`), so `import agent.cli` fell from "
        "~200 ms to ~70 ms and the socket exists at "
        f"{percentile(socket, 50):.0f} ms (p50) instead of ~380 ms before this issue. "
        "`yaml` and `importlib.metadata` are off `run`'s path too.")
    left = (
        "What is left, in order: the rest of the agent's start-up after the socket is bound "
        "(importing grpc, cryptography, the xDS protos, py-spiffe and prometheus_client, "
        "then connecting to SPIRE: `python -c 'import agent.runner'` alone takes about "
        "340 ms of wall time on this machine), which sets the p50; then, when Envoy's "
        "retry of the `default` stream fell before the socket appeared, Envoy's own "
        "back-off (its timer, not the agent, decides when it tries again: up to the "
        "shipped 0.5 s `max_interval`), which sets the tail. "
        f"Socket to first push: {percentile(envoy_wait, 50):.0f} ms p50, "
        f"{percentile(envoy_wait, 99):.0f} ms p99; the agent's answer and Envoy applying "
        f"it: {percentile(applied, 50):.0f} ms after the push.")
    if p50 >= TARGET_MS or p99 >= TARGET_MS:
        verdict = (f"**Cold-start target missed** by {p50 - TARGET_MS:.0f} ms at p50 "
                   f"({p50:.0f} ms; p99 {p99:.0f} ms)" if p50 >= TARGET_MS else
                   f"**The p50 meets the target ({p50:.0f} ms); the p99 does not** "
                   f"({p99:.0f} ms, {p99 - TARGET_MS:.0f} ms over)")
        notes.append(f"{verdict}. {left} {done} What would close the rest: a lower "
                     "`max_interval` in Envoy's SDS `retry_back_off` for the tail (a config "
                     "choice); for the p50, lighter imports on the serving path: loading "
                     "prometheus_client and the HTTP endpoints after the first SVID is "
                     "served (~35 ms), skipping py-spiffe's package `__init__` (~30 ms); "
                     "grpc, cryptography and the xDS protos themselves are the floor row's "
                     "~80 ms and stay.")
    else:
        notes.append(f"**Met** at p50 ({p50:.0f} ms) and p99 ({p99:.0f} ms). {done} {left}")
    return BenchResult("cold_start", TITLE, rows, details, notes)

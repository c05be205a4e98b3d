"""Memory and idle cost: the agent's RSS empty, with 110 pods served, with 1,000 SVIDs
cached, and its CPU while idle with every stream open; floor: a bare interpreter that
imports the same third-party modules the agent has loaded.

The agent (``python -m agent run``), dev-spire and the Envoys are separate processes, so
every figure read from /proc is the agent's own. Pods are real processes in real kubepods
cgroups (agent/podsim.py), each with its own registration entry (``k8s:pod-uid``, one
SPIFFE ID per pod). They are served the trusted-proxy way (a node proxy such as ztunnel):
an Envoy under its own uid, whose entry is a ``--trusted-proxy``, holds every pod's SVID
as ``workload:<pod uid>`` (a downstream TLS context per pod, SNI-selected) plus its own
``default`` and the ``ALL`` bundles (tests/reliability/endurance_support.py's proxy
config). Envoy opens one SDS stream per secret name, so N pods are N + 2 streams.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from agent.demo.chain import free_port
from bench.harness import BenchResult, Context, Row
from bench.procstack import (
    ENVOY_UID,
    PROXY_ID,
    TD,
    Child,
    agent_command,
    cpu_seconds,
    dev_spire,
    entry,
    python_env,
    status_kb,
    stopping,
    wait_for,
    write_entries,
)

TITLE = "Memory and idle cost"
RSS_TARGET_MB = 80.0
CPU_TARGET_PERCENT = 0.5

# Run in the agent's process before it starts: SIGUSR2 writes the names of the modules it
# has loaded (the floor process imports the same third-party ones).
MODULES_PRELUDE = """
import signal as _signal, sys as _sys, os as _os
def _dump_modules(signum, frame):
    path = _os.environ["BENCH_MODULES_FILE"]
    with open(path + ".tmp", "w") as out:
        out.write("\\n".join(sorted(_sys.modules)))
    _os.replace(path + ".tmp", path)
_signal.signal(_signal.SIGUSR2, _dump_modules)
"""

# The floor: a bare interpreter importing the modules named in argv[1], then idle.
FLOOR_CODE = """
import importlib, sys, time
for name in open(sys.argv[1]).read().split():
    try:
        importlib.import_module(name)
    except Exception:
        pass
print("ready", flush=True)
time.sleep(600)
"""


class Metrics:
    """The agent's /metrics, read as {sample name: summed value}."""

    def __init__(self, port: int) -> None:
        self._url = f"http://127.0.0.1:{port}/metrics"

    def read(self) -> dict[str, float]:
        with urllib.request.urlopen(self._url, timeout=10) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            base = name.split("{", 1)[0]
            try:
                values[base] = values.get(base, 0.0) + float(value)
            except ValueError:
                continue
        return values


_ACTIVITY = ("spiffe_delegate_sds_streams_open", "spiffe_delegate_svids_cached",
             "spiffe_delegate_sds_pushes_total", "spiffe_delegate_sds_acks_total")


def settle(agent: Child, metrics: Metrics, timeout: float) -> dict[str, float]:
    """Waits until two scrapes 0.5 s apart agree on streams, cached SVIDs, pushes, ACKs."""
    deadline = time.monotonic() + timeout
    previous: tuple[float, ...] | None = None
    while True:
        agent.check_alive()
        values = metrics.read()
        current = tuple(values.get(name, -1.0) for name in _ACTIVITY)
        if current == previous:
            return values
        if time.monotonic() > deadline:
            raise TimeoutError(f"the agent did not settle in {timeout:g}s: {current}")
        previous = current
        time.sleep(0.5)


def rss_samples(pid: int, count: int) -> list[dict[str, int]]:
    out = []
    for _ in range(count):
        out.append(status_kb(pid))
        time.sleep(0.1)
    return out


@contextlib.contextmanager
def running_pods(count: int) -> Iterator[list[tuple[str, str]]]:
    """``count`` pods, one sleeping process each: [(pod uid, SPIFFE ID)]; all closed after."""
    from agent.podsim import FakePod, create_pod

    made: list[FakePod] = []
    try:
        for _ in range(count):
            pod = create_pod()
            made.append(pod)
            pod.spawn(["sleep", "3600"])
        yield [(pod.pod_uid, f"spiffe://{TD}/ns/bench/sa/pod-{index:04d}")
               for index, pod in enumerate(made)]
    finally:
        errors = []
        for pod in made:
            try:
                pod.close()
            except RuntimeError as err:
                errors.append(err)
        if errors:
            raise errors[0]


def start_proxy(work: Path, name: str, pods: list[tuple[str, str]], first_index: int) -> Child:
    """A trusted-proxy Envoy asking for every pod's SVID; returns once it is LIVE (every
    secret arrived: the config has no initial fetch timeout)."""

    from agent.demo.envoy import envoy_binary

    # The endurance suite's trusted-proxy config (imported by name: its test helpers are
    # not this package's to type-check).
    support = importlib.import_module("tests.reliability.endurance_support")
    PodIdentity, proxy_config = support.PodIdentity, support.proxy_config
    setpriv_wrapper = support.setpriv_wrapper

    directory = work / name
    directory.mkdir(mode=0o755)
    os.chown(directory, ENVOY_UID, ENVOY_UID)
    identities = [PodIdentity(first_index + i, uid, spiffe_id)
                  for i, (uid, spiffe_id) in enumerate(pods)]
    config = proxy_config(sds_socket=work / "sds.sock", front_port=free_port(),
                          pods_port=free_port(), proxy_id=PROXY_ID, pods=identities)
    config["node"] = {"id": f"bench-{name}", "cluster": "bench"}
    path = directory / "bootstrap.json"
    path.write_text(json.dumps(config))
    address_file = directory / "admin-address"
    wrapper = setpriv_wrapper(directory, envoy_binary(), ENVOY_UID)
    envoy = Child([str(wrapper), "-c", str(path), "--disable-hot-restart", "--concurrency",
                   "1", "--use-dynamic-base-id", "--admin-address-path", str(address_file),
                   "-l", "error"], directory / "envoy.log").start()

    def live() -> bool:
        envoy.check_alive()
        if not address_file.exists() or not address_file.read_text().strip():
            return False
        url = f"http://{address_file.read_text().strip()}/ready"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return bool(response.read().decode().strip() == "LIVE")
        except OSError:
            return False

    try:
        wait_for(live, 120, f"Envoy {name} to hold every pod's SVID (/ready LIVE)",
                 pause=0.1)
    except BaseException:
        envoy.stop()
        raise
    return envoy


def floor_rss(work: Path, modules_file: Path) -> tuple[list[dict[str, int]], int]:
    """RSS of a bare interpreter that imported the agent's third-party modules."""
    names = [line for line in modules_file.read_text().split()
             if line.split(".")[0] not in {"agent", "__main__", "_bench"}]
    listing = work / "floor-modules.txt"
    listing.write_text("\n".join(names))
    process = subprocess.Popen([sys.executable, "-c", FLOOR_CODE, str(listing)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env=python_env())
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            raise RuntimeError("the floor interpreter did not start")
        time.sleep(0.3)
        return rss_samples(process.pid, 5), len(names)
    finally:
        process.kill()
        process.wait(10)


def run(ctx: Context) -> BenchResult:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        raise RuntimeError("needs root (pods are real cgroups) and setpriv (Envoy's uid)")
    small, large = ctx.size(110, 10), ctx.size(1000, 40)
    idle_seconds = float(ctx.size(12, 2))
    quiet = float(ctx.size(6, 1))
    work = ctx.workdir
    work.chmod(0o755)
    modules_file = work / "agent-modules.txt"
    stages: dict[str, list[dict[str, int]]] = {}
    with running_pods(large) as pods:
        entries = work / "entries.json"
        write_entries(entries, [entry(PROXY_ID, f"unix:uid:{ENVOY_UID}"),
                                *(entry(spiffe_id, f"k8s:pod-uid:{uid}")
                                  for uid, spiffe_id in pods)])
        spire = dev_spire(work, entries)
        metrics_port = free_port()
        agent = Child(agent_command(work, "--trusted-proxy", PROXY_ID, "--health-address",
                                    "127.0.0.1:0", "--metrics-address",
                                    f"127.0.0.1:{metrics_port}", prelude=MODULES_PRELUDE),
                      work / "agent.log",
                      {**python_env(), "BENCH_MODULES_FILE": str(modules_file)})
        envoys: list[Child] = []
        with stopping(spire, agent):
            agent.start()
            wait_for(lambda: agent.alive() and (work / "sds.sock").exists(),
                     60, "the agent's SDS socket")
            metrics = Metrics(metrics_port)
            wait_for(lambda: metrics.read().get("spiffe_delegate_spire_connected", 0) >= 1
                     if _port_open(metrics_port) else False, 60,
                     "the agent's connection to SPIRE", pause=0.1)
            time.sleep(1.0)  # its own SVID and the bundles arrive on that connection
            settle(agent, metrics, 30)
            stages["empty"] = rss_samples(agent.pid, 5)
            try:
                envoys.append(start_proxy(work, "envoy-a", pods[:small], 0))
                values = settle(agent, metrics, 60)
                streams_small = values.get("spiffe_delegate_sds_streams_open", 0)
                time.sleep(quiet)  # the agent's heap trimmer runs every 5 s
                stages["small"] = rss_samples(agent.pid, 5)
                envoys.append(start_proxy(work, "envoy-b", pods[small:], small))
                values = settle(agent, metrics, 120)
                streams_large = values.get("spiffe_delegate_sds_streams_open", 0)
                cached = values.get("spiffe_delegate_svids_cached", 0)
                time.sleep(1.0)
                agent_cpu0 = cpu_seconds(agent.pid)
                envoy_cpu0 = sum(cpu_seconds(e.pid) for e in envoys)
                started = time.perf_counter()
                time.sleep(idle_seconds)
                elapsed = time.perf_counter() - started
                agent_cpu = cpu_seconds(agent.pid) - agent_cpu0
                envoy_cpu = sum(cpu_seconds(e.pid) for e in envoys) - envoy_cpu0
                stages["large"] = rss_samples(agent.pid, 5)
                modules_file.unlink(missing_ok=True)
                os.kill(agent.pid, signal.SIGUSR2)
                wait_for(modules_file.exists, 10, "the agent's module list")
            finally:
                for envoy in envoys:
                    envoy.stop()
    floor, floor_modules = floor_rss(work, modules_file)
    return _result(stages, floor, floor_modules, small=small, large=large,
                   cached=cached, streams=(streams_small, streams_large),
                   cpu=(agent_cpu, envoy_cpu, elapsed, len(envoys)))


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _mb(samples: list[dict[str, int]], key: str = "VmRSS") -> list[float]:
    return [sample[key] / 1024 for sample in samples]


def _result(stages: dict[str, list[dict[str, int]]], floor: list[dict[str, int]],
            floor_modules: int, *, small: int, large: int, cached: float,
            streams: tuple[float, float],
            cpu: tuple[float, float, float, int]) -> BenchResult:
    agent_cpu, envoy_cpu, elapsed, envoy_count = cpu
    floor_row = Row.of("floor: python importing the agent's third-party modules", "MB",
                       _mb(floor))
    empty = Row.of("agent, connected, nothing served", "MB", _mb(stages["empty"]))
    small_row = Row.of(f"agent, {small} pods served ({streams[0]:.0f} SDS streams)", "MB",
                       _mb(stages["small"]))
    large_mb = _mb(stages["large"])
    large_row = Row.of(f"agent, {cached:.0f} SVIDs cached ({large} pods, "
                       f"{streams[1]:.0f} SDS streams)", "MB", large_mb).against(
        floor_row, target=f"< {RSS_TARGET_MB:.0f} MB", met=max(large_mb) < RSS_TARGET_MB)
    per_svid_kb = ((sum(large_mb) / len(large_mb) - sum(_mb(stages["small"]))
                    / len(stages["small"])) * 1024 / max(large - small, 1))
    idle_percent = agent_cpu / elapsed * 100
    envoy_percent = envoy_cpu / elapsed * 100
    envoy_row = Row.of(f"peer: the {envoy_count} Envoys holding the streams, idle CPU",
                       "% of a core", [envoy_percent])
    cpu_row = Row.of("agent idle CPU, every stream open", "% of a core",
                     [idle_percent]).against(envoy_row, target=f"< {CPU_TARGET_PERCENT}%",
                                             met=idle_percent < CPU_TARGET_PERCENT)
    rows = [floor_row, empty.against(floor_row), small_row.against(floor_row), large_row,
            Row.of("agent, per SVID beyond the first pods", "kB", [per_svid_kb]),
            envoy_row, cpu_row]

    def med(samples: list[dict[str, int]], key: str = "VmRSS") -> float:
        values = sorted(sample[key] for sample in samples)
        return round(values[len(values) // 2] / 1024, 1)

    details = {
        "rss_mb_baseline_imports": med(floor),
        "rss_mb_empty_agent": med(stages["empty"]),
        "rss_mb_110_pods": med(stages["small"]),
        "rss_mb_1000_svids": med(stages["large"]),
        "rss_kb_per_svid": round(per_svid_kb, 1),
        "idle_cpu_percent": round(idle_percent, 3),
        "envoy_idle_cpu_percent": round(envoy_percent, 3),
        "rss_anon_mb": {name: med(samples, "RssAnon") for name, samples in stages.items()},
        "rss_file_mb": {name: med(samples, "RssFile") for name, samples in stages.items()},
        "floor_rss_anon_mb": med(floor, "RssAnon"),
        "floor_rss_file_mb": med(floor, "RssFile"),
        "floor_modules": floor_modules,
        "pods": [small, large],
        "sds_streams": list(streams),
        "svids_cached": cached,
        "idle_seconds": round(elapsed, 1),
    }
    notes = [
        "**Memory and idle cost.** The agent runs as `python -m agent run` (a subprocess: "
        "its /proc figures are its own) against dev-spire; pods are real processes in real "
        "kubepods cgroups, one registration entry (one SPIFFE ID) each, served the "
        "trusted-proxy way: an Envoy under its own uid holds every pod's SVID as "
        "`workload:<pod uid>` plus its own `default` and `ALL`, one SDS stream per name. "
        f"RSS (`VmRSS` of /proc/<pid>/status; `RssAnon`/`RssFile` in the details) is "
        f"read once the agent is idle (two scrapes agree on streams, cached SVIDs, pushes "
        f"and ACKs): connected with nothing served, with {small} pods served (the "
        f"Kubernetes default pod limit per node), and with {large} pods ({cached:.0f} "
        "SVIDs cached, the proxy's and the agent's own included). A thousand pods on one "
        "node is beyond Kubernetes' supported maximum (110 by default, 250-ish where "
        "raised): it is the upper bound, one SPIRE subscription, one attestation and one "
        "stream per SVID, heavier than 1,000 SVIDs spread over fewer pods. Idle CPU is "
        f"utime+stime from /proc/<pid>/stat over {elapsed:.0f} s with every stream open "
        "and nothing asked. The floor is a bare interpreter that imports the "
        f"{floor_modules} non-agent modules the agent had loaded at the end (grpc, "
        "cryptography, protobuf and the xDS protos, prometheus_client, ...) and does "
        "nothing: what is above it is the agent's own code and state. The agent's heap "
        "trimmer (agent/malloc.py, every 5 s) has had a pass before each figure "
        "(RSS at 110 pods is read 6 s after the agent settled, at 1,000 pods after the idle "
        "window).",
    ]
    large_p50 = large_row.p50 or 0.0
    if large_p50 >= RSS_TARGET_MB:
        budget_kb = max(RSS_TARGET_MB - med(stages["empty"]), 0) * 1024 / large
        notes.append(
            f"**RSS target missed** by {large_p50 - RSS_TARGET_MB:.0f} MB "
            f"({large_p50 / RSS_TARGET_MB:.1f}x the 80 MB) at {large} pods: "
            f"{per_svid_kb:.0f} kB per served pod, where 80 MB leaves "
            f"{budget_kb:.0f} kB per pod above the empty agent. Why, from the profiles: "
            "(1) `docs/profiles/memory-sds-node.txt` (memray, native traces): each SDS "
            "stream kept Envoy's first request alive, because `SotwProtocol.on_request` "
            "(and `DeltaProtocol`) store `request.node` and a upb sub-message pins its "
            "whole arena: Envoy's Node is 61 kB on the wire (516 extension entries), "
            "~180 kB decoded, 17.9 of the 29.4 MB a 100-stream Envoy left alive. Copying "
            "only the fields `agent/sds/resources.py` reads (id, cluster, user agent, "
            "metadata) cut that to 11.7 MB; with the heap trimmer, 1,000 pods measured "
            "176 MB instead of 333 MB (`slim_node` in `agent/sds/sotw.py`, used by "
            "`delta.py` too: in the figures above). (2) What is left, "
            "about 100 kB a pod, is the shape of the code rather than a leak "
            "(`docs/profiles/memory-python-objects.txt`): per pod the agent holds an SDS "
            "stream and a SPIRE subscription, each a gRPC call (C-core call arena, HTTP/2 "
            "stream, ~35 kB together, memray's frames without Python), and ~10 live "
            "asyncio tasks with ~37 coroutines, 11 futures, 5 events and their queues "
            "(~50 kB of Python objects: the SDS reader, two view followers, grpc-aio's "
            "three call tasks, the verifier's loop and the two futures it waits on, the "
            "cache's per-pod server). "
            "What would close it: far fewer tasks per stream and per subscription (one "
            "task per SDS stream reading and writing, watches as callbacks rather than "
            "waiting tasks), one SPIRE subscription per SPIFFE ID where pods share one "
            "(`--cache-key identity`); even then ~1,000 gRPC "
            "calls on each side stay at roughly 35 MB, so 80 MB at 1,000 pods would "
            "need SPIRE subscriptions shared across pods, not just leaner Python.")
    return BenchResult("memory", TITLE, rows, details, notes)

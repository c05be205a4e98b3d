"""Parts of the endurance test: the agent as a real subprocess and what can be read of it
from outside (RSS, descriptors, threads, asyncio tasks), a trusted-proxy Envoy that uses
every pod's SVID, and a request loop through that Envoy.

The Envoy (``proxy_config``) is one trusted proxy serving many pods, the ztunnel model:

    request loop --HTTP--> front listener --route /pod/<i>--> cluster pod_<i>
        --mTLS: client cert `default` (the proxy's own SVID), server SAN pinned to pod i's
          SPIFFE ID, chain checked against `ALL`, a new connection per request-->
    pods listener, filter chain chosen by SNI pod-<i>: server cert `workload:<pod i uid>`,
        client cert required (SAN pinned to the proxy's SPIFFE ID) --> direct 200 "pod <i>"

so every request performs two TLS handshakes with the certificates Envoy holds at that
moment: a stale, missing or wrong pod certificate fails a request.
"""

from __future__ import annotations

import http.client
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.envoyproc import sds_config_source, stop_process
from tests.sds_server.clients import SotwClient

__all__ = [
    "PLANTED_LEAK",
    "AgentProcess",
    "PodIdentity",
    "ProcSample",
    "RequestLoop",
    "churn_streams",
    "proxy_config",
    "setpriv_wrapper",
    "tracing_prelude",
]


@dataclass(frozen=True)
class PodIdentity:
    index: int
    pod_uid: str
    spiffe_id: str

    @property
    def sni(self) -> str:
        return f"pod-{self.index}.endurance.test"


# --- the agent as a subprocess -----------------------------------------------------------

@dataclass(frozen=True)
class ProcSample:
    """What the agent process holds at one moment."""

    rss_kb: int
    fds: int
    threads: int
    tasks: int

    @property
    def rss_mb(self) -> float:
        return self.rss_kb / 1024


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {name}")


@dataclass
class AgentProcess:
    """``spiffe-delegate run`` as a child process (its RSS and descriptors are its own).

    ``args`` are the options after ``run``; the log goes to ``log_path``. ``prelude``:
    Python run in the agent's process before it starts (a test planting a leak)."""

    args: Sequence[str]
    log_path: Path
    metrics_port: int
    prelude: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        options = [*self.args, "--metrics-address", f"127.0.0.1:{self.metrics_port}"]
        if self.prelude is None:
            command = [sys.executable, "-m", "agent", "run", *options]
        else:
            code = (self.prelude + "\nimport sys\nfrom agent.cli import main\n"
                    "sys.argv = ['spiffe-delegate', *sys.argv[1:]]\nsys.exit(main())\n")
            command = [sys.executable, "-c", code, "run", *options]
        with open(self.log_path, "ab") as log:
            log.write(("+ " + shlex.join(command) + "\n").encode())
            log.flush()
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.process is not None, "the agent was not started"
        return self.process.pid

    def check_alive(self) -> None:
        assert self.process is not None, "the agent was not started"
        code = self.process.poll()
        if code is not None:
            raise AssertionError(f"the agent exited with status {code}" + self.log_tail())

    def alive_and(self, condition: bool) -> bool:
        """``condition``, after checking that the agent still runs (for polling)."""
        self.check_alive()
        return condition

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n--- agent log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body: bytes = response.read()
        return body.decode()

    def metrics(self) -> dict[str, float]:
        """Every sample of one scrape, keyed ``name{label="v",...}`` (sorted labels)."""
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def sample(self) -> ProcSample:
        """Descriptors and RSS first (from /proc: the scrape's own connection is not among
        them), then the task count, which the scrape reads on the agent's loop (its own
        connection's task included, the same at every sample)."""
        self.check_alive()
        fds = self.fds()
        rss = _status_field(self.pid, "VmRSS")
        threads = _status_field(self.pid, "Threads")
        tasks = int(self.metrics()["spiffe_delegate_asyncio_tasks"])
        return ProcSample(rss_kb=rss, fds=fds, threads=threads, tasks=tasks)

    def dump(self, path: Path, timeout: float = 120.0) -> str:
        """With :func:`tracing_prelude`: SIGUSR1, then the dump's text once written."""
        assert self.process is not None, "the agent was not started"
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while not path.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"no dump {path} within {timeout}s")
            time.sleep(0.1)
        return path.read_text()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status. Idempotent."""
        return stop_process(self.process, timeout)


# Run in the agent's process by the test that shows the checks can fail: every new cache
# state (a rotation) leaks a task that never ends, an open descriptor and 256 KiB.
PLANTED_LEAK = """
import asyncio, os
from agent.cache import watch
_kept = []
_publish = watch.StatePublisher.publish
def _leaky_publish(self, *args, **kwargs):
    state = _publish(self, *args, **kwargs)
    if state is not None:
        _kept.append(asyncio.get_running_loop().create_task(asyncio.Event().wait()))
        _kept.append(os.open("/dev/null", os.O_RDONLY))
        _kept.append(b"\\x01" * (256 * 1024))
    return state
watch.StatePublisher.publish = _leaky_publish
"""


def tracing_prelude(prefix: Path, frames: int = 25) -> str:
    """Python for ``AgentProcess(prelude=...)`` that makes the agent answer SIGUSR1 with a
    dump (``<prefix>.<n>``). The first starts tracemalloc (``frames`` deep, 0: not at all;
    from the start it would slow the agent's imports by half a minute) and counts live
    objects by type and pymalloc blocks; the next ones list which object types grew, how
    many blocks more are allocated, and what was allocated since and is still alive. Each
    gives RSS before and after ``malloc_trim(0)`` (which it calls: a baseline dump lowers
    the RSS the test measures from, so compare the dumps' numbers, not the test's). For
    finding a leak the soak reports: ``ENDURANCE_TRACE=/tmp/trace`` in the environment of
    tests/reliability/test_endurance.py."""
    return f"""
import collections, gc, os, signal, sys, tracemalloc
_first, _dumps, _blocks = [], [], []
def _counts():
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())
def _rss_kb():
    with open("/proc/self/status") as status:
        return int(next(l for l in status if l.startswith("VmRSS:")).split()[1])
def _trim():
    # What RSS is left once glibc hands free heap pages back: growth that survives this
    # is memory in use, the rest was free memory malloc kept.
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
def _mappings():
    # Rss by what is mapped (/proc/self/smaps: a file, [heap], [stack], every anonymous
    # mapping together -> kB): which kind of memory grew.
    found, name = {{}}, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                name = head[5] if len(head) > 5 else "[anon]"
            elif head[0] == "Rss:" and name is not None:
                found[name] = found.get(name, 0) + int(head[1])
    return found
_maps = []
def _dump(signum, frame):
    gc.collect()
    before = _rss_kb()
    _trim()
    lines = ["RSS %d kB, %d kB after malloc_trim(0)" % (before, _rss_kb())]
    maps = _mappings()
    if not _maps:
        _maps.append(maps)
    else:
        grown = sorted(((kb - _maps[0].get(key, 0), key) for key, kb in maps.items()),
                       reverse=True)
        lines.append("--- mappings whose RSS grew (kB) since the first dump")
        lines += ["%+8d %s" % g for g in grown[:12] if g[0] > 0]
    if not _first:
        _first.append(_counts())
        _blocks.append(sys.getallocatedblocks())
        if {frames}:
            tracemalloc.start({frames})
        lines.append("first dump; pymalloc blocks: %d" % _blocks[0])
    else:
        counts, counts0 = _counts(), _first[0]
        lines.append("pymalloc blocks: %d -> %d" % (_blocks[0], sys.getallocatedblocks()))
        lines.append("--- objects by type, growth since the first dump")
        growth = sorted(((counts[k] - counts0.get(k, 0), k) for k in counts), reverse=True)
        lines += ["%+8d %s" % g for g in growth[:30] if g[0]]
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]) if {frames} else None
        if snap is not None:
            lines.append("traced (current, peak): %s" % (tracemalloc.get_traced_memory(),))
            lines.append("--- allocated since the first dump and still alive")
        for stat in snap.statistics("traceback")[:20] if snap is not None else ():
            lines.append(str(stat))
            lines += ["    " + line for line in stat.traceback.format()[-8:]]
    _dumps.append(1)
    path = {str(prefix)!r} + ".%d" % len(_dumps)
    with open(path + ".tmp", "w") as out:
        out.write("\\n".join(lines) + "\\n")
    os.replace(path + ".tmp", path)
signal.signal(signal.SIGUSR1, _dump)
"""


async def churn_streams(sds_socket: Path, count: int) -> None:
    """``count`` short SDS streams, one after another, from this process (the agent's own
    identity: the test runs as the delegate's uid and binary): ask for ``default`` and
    ``ROOTCA``, read the answer, ACK it, hang up. Each opens and closes a stream, its watch
    and its tasks in the agent, so a per-stream leak grows with the rounds."""
    for _ in range(count):
        client = SotwClient(sds_socket)
        try:
            await client.request(["default", "ROOTCA"])
            response = await client.read(timeout=30)
            assert len(response.resources) == 2, response
            await client.ack(["default", "ROOTCA"])
        finally:
            await client.close()


def sum_samples(values: Mapping[str, float], name: str) -> float:
    """The sum of every sample of ``name`` (any labels)."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


# --- the trusted-proxy Envoy -------------------------------------------------------------

def setpriv_wrapper(directory: Path, envoy: Path, uid: int) -> Path:
    """An executable that runs ``envoy`` as ``uid`` (see tests/sds_server/conftest.py
    ``as_user`` for why not ``Popen(user=...)``)."""
    wrapper = directory / "envoy-as-user"
    wrapper.write_text("#!/bin/sh\n"
                       f"exec setpriv --reuid={uid} --regid={uid} --clear-groups "
                       f'{shlex.quote(str(envoy))} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def _tls(kind: str, context: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": f"type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}",
        "common_tls_context": context, **extra}}


def _common_tls(cert_name: str, peer_id: str, source: dict[str, Any]) -> dict[str, Any]:
    return {
        "tls_certificate_sds_secret_configs": [{"name": cert_name, "sds_config": source}],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": peer_id}}]},
            "validation_context_sds_secret_config": {"name": "ALL", "sds_config": source},
        },
    }


def _hcm(stat_prefix: str, routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "route_config": {"name": stat_prefix, "virtual_hosts": [
            {"name": stat_prefix, "domains": ["*"], "routes": routes}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }}


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def proxy_config(*, sds_socket: Path, front_port: int, pods_port: int, proxy_id: str,
                 pods: Sequence[PodIdentity]) -> dict[str, Any]:
    """The bootstrap of the module docstring. Secrets have no initial fetch timeout: the
    server turns LIVE only once every pod's certificate is there."""
    source = sds_config_source("sds", "GRPC", initial_fetch_timeout="0s")
    clusters: list[dict[str, Any]] = [{
        "name": "sds", "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                         "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "sds", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"pipe": {"path": str(sds_socket)}}}}]}]},
    }]
    routes: list[dict[str, Any]] = []
    chains: list[dict[str, Any]] = []
    for pod in pods:
        cluster = f"pod_{pod.index}"
        routes.append({"match": {"path": f"/pod/{pod.index}"},
                       "route": {"cluster": cluster, "timeout": "10s"}})
        clusters.append({
            "name": cluster, "type": "STATIC", "connect_timeout": "5s",
            "load_assignment": {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": _address(pods_port)}}]}]},
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/"
                             "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    # One request per connection: every request is a fresh handshake with
                    # the certificates held now.
                    "common_http_protocol_options": {"max_requests_per_connection": 1},
                    "explicit_http_config": {"http_protocol_options": {}}}},
            "transport_socket": _tls("UpstreamTlsContext",
                                     _common_tls("default", pod.spiffe_id, source),
                                     sni=pod.sni),
        })
        chains.append({
            "filter_chain_match": {"server_names": [pod.sni]},
            "transport_socket": _tls("DownstreamTlsContext",
                                     _common_tls(f"workload:{pod.pod_uid}", proxy_id, source),
                                     require_client_certificate=True),
            "filters": [_hcm(f"pod_{pod.index}", [{
                "match": {"prefix": "/"},
                "direct_response": {"status": 200,
                                    "body": {"inline_string": f"pod {pod.index}"}}}])],
        })
    return {
        "node": {"id": "endurance-proxy", "cluster": "endurance"},
        "admin": {"address": _address(0)},
        "static_resources": {
            "clusters": clusters,
            "listeners": [
                {"name": "front", "address": _address(front_port),
                 "filter_chains": [{"filters": [_hcm("front", routes)]}]},
                {"name": "pods", "address": _address(pods_port),
                 "listener_filters": [{"name": "envoy.filters.listener.tls_inspector",
                                       "typed_config": {
                                           "@type": "type.googleapis.com/envoy.extensions."
                                                    "filters.listener.tls_inspector.v3."
                                                    "TlsInspector"}}],
                 "filter_chains": chains},
            ],
        },
    }


# --- requests through Envoy --------------------------------------------------------------

class RequestLoop:
    """A thread that sends GET /pod/<i> through the front listener, round robin over the
    pods, until stopped; counts answers (``ok``) and everything else (``failures``, the
    first few kept with their time). ``pause`` seconds between requests keep it from
    starving the test's event loop of the GIL."""

    def __init__(self, port: int, pods: Sequence[PodIdentity], pause: float = 0.002) -> None:
        self._port = port
        self._pods = tuple(pods)
        self._pause = pause
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="endurance-requests",
                                        daemon=True)
        self.ok = 0
        self.failed = 0
        self.first_failures: list[str] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    @property
    def requests(self) -> int:
        return self.ok + self.failed

    def _fail(self, what: str) -> None:
        self.failed += 1
        if len(self.first_failures) < 10:
            self.first_failures.append(f"{time.strftime('%H:%M:%S')} {what}")

    def _run(self) -> None:
        connection: http.client.HTTPConnection | None = None
        index = 0
        while not self._stop.is_set():
            pod = self._pods[index % len(self._pods)]
            index += 1
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=15)
            try:
                connection.request("GET", f"/pod/{pod.index}")
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._fail(f"pod {pod.index}: {exc!r}")
                connection.close()
                connection = None
                continue
            if response.status == 200 and body == f"pod {pod.index}".encode():
                self.ok += 1
            else:
                self._fail(f"pod {pod.index}: {response.status} {body[:200]!r}")
            if self._pause:
                self._stop.wait(self._pause)
        if connection is not None:
            connection.close()

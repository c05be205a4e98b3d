"""Rotation to Envoy: dev-spire issues a new SVID; how soon does a real Envoy hold it?

Two ways in one run, fed the same rotations: an Envoy on the agent's SDS socket, and
Envoys reading files (``path_config_source`` + ``watched_directory``) that a helper process
writes as spiffe-helper does (bench/filesds.py; one helper per Envoy). dev-spire runs in
this process, so each rotation is forced with ``DevSpire.rotate_now`` and its issue time is
the monotonic clock just before that call; the agent and the helpers are subprocesses; each
Envoy's ``/certs`` is polled from its own thread until it shows the new serial number.

Knobs for finding out why (not used by ``python -m bench``):
``BENCH_ROTATION_TRACE=FILE`` writes the stages of every rotation (bench/rotation_trace.py)
to FILE; ``BENCH_ROTATION_PROFILE=FILE`` runs the agent under cProfile (stats to FILE);
``BENCH_ROTATION_AGENT_PRELUDE=FILE`` runs FILE's Python in the agent before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.devspire import DevSpire, DevSpireSettings
from bench.certspoll import CertsPoller
from bench.filesds import BUNDLE, CERT, KEY
from bench.harness import REPO, BenchResult, Context, Row, percentile
from bench.procstack import cpu_seconds
from bench.rotation_trace import AGENT_MARKS, ENVOY_LOG_FORMAT, write_timeline
from tests.envoyproc import stop_process

TD = "example.org"
DELEGATE = f"spiffe://{TD}/spiffe-delegate"
ENVOY_ID = f"spiffe://{TD}/bench/rotation-envoy"
ENVOY_UID = 2101
POLL_INTERVAL = 0.002   # seconds between one Envoy's /certs answer and its next poll
SEEN_TIMEOUT = 2.0      # a rotation not shown within this long counts as missed
INPLACE_WAIT = 0.3      # how long the in-place Envoy gets to show each rotation
TARGET = "p50 < 1x, p99 < 1x"
TIMED = ("sds", "rename", "swap")   # measured on every rotation
FILE_MODES = ("rename", "swap")

# The agent under cProfile; the stats are written on its way out (run ends with os._exit
# after its drain, which skips the interpreter's exit handlers).
_PROFILED = '''
import cProfile, os, sys
from agent.cli import main
_profile = cProfile.Profile()
_exit = os._exit
def _dump_and_exit(status):
    _profile.disable()
    _profile.dump_stats({out!r})
    _exit(status)
os._exit = _dump_and_exit
sys.argv = ["spiffe-delegate", *sys.argv[1:]]
_profile.enable()
sys.exit(main())
'''
_RUN_AGENT = '''
import sys
from agent.cli import main
sys.argv = ["spiffe-delegate", *sys.argv[1:]]
sys.exit(main())
'''


# --- processes ----------------------------------------------------------------------------

def entries_document() -> str:
    """The delegate (this Python as this uid: the agent and the helpers) and the Envoy."""
    python = os.readlink("/proc/self/exe")

    def entry(spiffe_id: str, *selectors: str) -> dict[str, Any]:
        pairs = [dict(zip(("type", "value"), s.split(":", 1), strict=True)) for s in selectors]
        return {"spiffe_id": spiffe_id, "parent_id": f"spiffe://{TD}/spire/agent/dev",
                "selectors": pairs}

    return json.dumps({"entries": [
        entry(DELEGATE, f"unix:uid:{os.getuid()}", f"unix:path:{python}"),
        entry(ENVOY_ID, f"unix:uid:{ENVOY_UID}")]})


@dataclass
class Child:
    """A subprocess with its output in a file; stopped with SIGTERM, then SIGKILL."""

    name: str
    argv: Sequence[str]
    out: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.out, "ab") as out:
            out.write(("+ " + shlex.join(self.argv) + "\n").encode())
            out.flush()
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                            start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was not started"
        return self.process.pid

    def check(self) -> None:
        if self.process is None or self.process.poll() is not None:
            tail = "\n".join(self.out.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"{self.name} is not running:\n{tail}")

    def stop(self) -> None:
        stop_process(self.process, 10)


def agent_argv(work: Path) -> list[str]:
    launcher = ["-m", "agent"]
    if profile_to := os.environ.get("BENCH_ROTATION_PROFILE"):
        launcher = ["-c", _PROFILED.format(out=profile_to)]
    if os.environ.get("BENCH_ROTATION_TRACE"):
        launcher = ["-c", AGENT_MARKS + _RUN_AGENT]
    if prelude := os.environ.get("BENCH_ROTATION_AGENT_PRELUDE"):
        launcher = ["-c", Path(prelude).read_text() + _RUN_AGENT]
    return [sys.executable, *launcher, "run",
            "--spire-admin-socket", str(work / "admin.sock"),
            "--sds-socket", str(work / "sds.sock"), "--trust-domain", TD,
            "--log-level", "warning", "--health-address", "127.0.0.1:0",
            "--metrics-address", "127.0.0.1:0",
            "--reconnect-initial", "0.02s", "--reconnect-max", "0.2s"]


def helper(work: Path, directory: Path, mode: str) -> Child:
    return Child(f"helper-{mode}", [
        sys.executable, "-m", "bench.filesds", "--socket", str(work / "admin.sock"),
        "--selector", f"unix:uid:{ENVOY_UID}", "--dir", str(directory), "--mode", mode],
        work / f"helper-{mode}.out")


# --- Envoy configs ------------------------------------------------------------------------

def _probe_cluster(name: str, tls_context: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                          "port_value": 9}}}}]}]},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/"
                     "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": tls_context}},
    }


def file_bootstrap(directory: Path) -> dict[str, Any]:
    """An Envoy whose ``default`` and ``ROOTCA`` secrets come from Secret files in
    ``directory``, reloaded whenever something is moved into it."""
    def source(secret_file: str) -> dict[str, Any]:
        return {"resource_api_version": "V3", "path_config_source": {
            "path": str(directory / secret_file),
            "watched_directory": {"path": str(directory)}}}

    return {"node": {"id": f"files-{directory.name}", "cluster": "bench"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                     "port_value": 0}}},
            "static_resources": {"clusters": [
                _probe_cluster("probe_cert_0", {"tls_certificate_sds_secret_configs": [
                    {"name": "default", "sds_config": source("svid.json")}]}),
                _probe_cluster("probe_ca_0", {"validation_context_sds_secret_config": {
                    "name": "ROOTCA", "sds_config": source("bundle.json")}})]}}


def write_secret_files(directory: Path) -> None:
    """The Secret resources Envoy loads; they name the PEM files the helper writes."""
    secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    svid = {"@type": secret, "name": "default", "tls_certificate": {
        "certificate_chain": {"filename": str(directory / CERT)},
        "private_key": {"filename": str(directory / KEY)}}}
    bundle = {"@type": secret, "name": "ROOTCA", "validation_context": {
        "trusted_ca": {"filename": str(directory / BUNDLE)}}}
    (directory / "svid.json").write_text(json.dumps({"resources": [svid]}))
    (directory / "bundle.json").write_text(json.dumps({"resources": [bundle]}))


def _trace_options() -> dict[str, Any]:
    if not os.environ.get("BENCH_ROTATION_TRACE"):
        return {}
    return {"component_log_level": "config:debug,secret:debug,file:debug",
            "extra_args": ["--log-format", ENVOY_LOG_FORMAT]}


# --- watching Envoy -----------------------------------------------------------------------

class Admin(CertsPoller):
    """One Envoy's admin API on a kept-alive connection (one thread at a time): its
    ``/certs`` as bench.certspoll polls it, and its ``sds.*`` counters."""

    def __init__(self, address: str) -> None:
        super().__init__(address, POLL_INTERVAL)

    def counters(self) -> dict[str, int]:
        """The ``sds.*`` counters (file-based secrets count there too)."""
        out: dict[str, int] = {}
        for line in self.get("/stats?filter=%5Esds%5C.").decode().splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out



@dataclass
class Seen:
    """What one Envoy showed: latencies from issue to ``/certs``, misses, torn reads."""

    admin: Admin
    latencies_ms: list[float] = field(default_factory=list)
    missed: int = 0
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    mean_poll_ms: float = 0.0

    def delta(self, counter: str) -> int:
        """Growth of ``sds.default.<counter>`` over the timed rotations."""
        name = f"sds.default.{counter}"
        return self.after.get(name, 0) - self.before.get(name, 0)

    @property
    def torn(self) -> int:
        """Loads of a certificate with a key that does not match it (Envoy keeps the old
        pair and counts ``key_rotation_failed``), plus any rejected update."""
        return self.delta("key_rotation_failed") + self.delta("update_rejected")


def helper_writes(out: Path) -> dict[int, float]:
    """Serial -> monotonic time the helper finished writing its files."""
    written: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for line in out.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "written":
                written.setdefault(int(parts[1], 16), float(parts[2]))
    return written


async def _wait(what: str, condition: Callable[[], bool], check: Callable[[], None],
                timeout: float = 20.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not condition():
        check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _ask(poller: asyncio.subprocess.Process, command: str, answer: str) -> list[str]:
    """One exchange with bench.certspoll: a command line, then its answer's fields."""
    assert poller.stdin is not None and poller.stdout is not None
    poller.stdin.write(command.encode() + b"\n")
    await poller.stdin.drain()
    line = (await poller.stdout.readline()).decode().split()
    if not line or line[0] != answer:
        raise RuntimeError(f"bench.certspoll answered {line!r} to {command!r}")
    return line[1:]


async def _end(process: asyncio.subprocess.Process) -> None:
    if process.stdin is not None:
        process.stdin.close()
    try:
        await asyncio.wait_for(process.wait(), 10)
    except TimeoutError:
        process.kill()
        await process.wait()


# --- the run ------------------------------------------------------------------------------

@dataclass
class Outcome:
    rotations: int
    seconds: float
    seen: dict[str, Seen]
    issued: dict[int, float]
    written: dict[str, dict[int, float]]
    inplace_rotations: int
    inplace_picked: int
    inplace_counters: dict[str, int]
    cpu_ms_per_rotation: dict[str, float]   # the agent's and each helper's, user + system


def run(ctx: Context) -> BenchResult:
    work = ctx.workdir
    work.chmod(0o755)  # the Envoy on SDS runs as ENVOY_UID and connects to work/sds.sock
    (work / "entries.json").write_text(entries_document())
    files_root = Path(tempfile.mkdtemp(prefix="bench-rotation-", dir="/dev/shm"))  # tmpfs
    try:
        for mode in (*FILE_MODES, "inplace"):
            (files_root / mode).mkdir()
            write_secret_files(files_root / mode)
        sds_dir = work / "envoy-sds"
        sds_dir.mkdir()
        os.chown(sds_dir, ENVOY_UID, ENVOY_UID)
        outcome = asyncio.run(measure(work, files_root, ctx.size(150, 10), ctx.size(5, 2)))
    finally:
        shutil.rmtree(files_root, ignore_errors=True)  # the key files
    return summarise(outcome)


def _files_ready(directory: Path) -> Callable[[], bool]:
    return lambda: all((directory / name).exists() for name in (CERT, KEY, BUNDLE))


async def measure(work: Path, files_root: Path, rotations: int,
                  inplace_rotations: int) -> Outcome:
    from tests.envoyproc import EnvoyProcess, envoy_binary, sds_bootstrap
    from tests.reliability.endurance_support import setpriv_wrapper

    spire = DevSpire(DevSpireSettings(socket_path=str(work / "admin.sock"), trust_domain=TD,
                                      entries_path=str(work / "entries.json"),
                                      authorized_delegates=(DELEGATE,)))
    children: list[Child] = []
    pollers: list[asyncio.subprocess.Process] = []
    envoys: list[EnvoyProcess] = []
    admins: list[Admin] = []
    pool = ThreadPoolExecutor(max_workers=len(TIMED), thread_name_prefix="certs-poll")
    loop = asyncio.get_running_loop()
    trace = _trace_options()
    try:
        await spire.start()
        agent = Child("agent", agent_argv(work), work / "agent.log")
        children.append(agent.start())
        helpers: dict[str, Child] = {}
        for mode in FILE_MODES:
            helpers[mode] = helper(work, files_root / mode, mode)
            children.append(helpers[mode].start())
        for mode in FILE_MODES:
            await _wait(f"helper {mode} to write its files", _files_ready(files_root / mode),
                        helpers[mode].check)
        await _wait("the agent's SDS socket", (work / "sds.sock").exists, agent.check)

        sds_dir = work / "envoy-sds"
        as_envoy_uid = setpriv_wrapper(sds_dir, envoy_binary(), ENVOY_UID)
        by_name = {"sds": EnvoyProcess(sds_bootstrap(work / "sds.sock"), sds_dir,
                                       binary=as_envoy_uid, **trace)}
        for mode in FILE_MODES:
            by_name[mode] = EnvoyProcess(file_bootstrap(files_root / mode),
                                         work / f"envoy-{mode}", **trace)
        envoys.extend(by_name.values())
        await asyncio.gather(*(e.astart() for e in envoys))
        seen = {name: Seen(Admin(by_name[name].admin_address)) for name in TIMED}
        admins.extend(s.admin for s in seen.values())

        entry = next(e for e in spire.cache.entries if e.spiffe_id == ENVOY_ID)

        def current() -> int:
            return spire.cache.svid_for(entry).serial

        for name in TIMED:
            if await loop.run_in_executor(pool, seen[name].admin.wait_for, current(),
                                          20.0) is None:
                raise TimeoutError(f"Envoy {name} never held the first SVID")
        for s in seen.values():
            s.before = await loop.run_in_executor(pool, s.admin.counters)

        poller = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.certspoll", "--interval", str(POLL_INTERVAL),
            "--timeout", str(SEEN_TIMEOUT), *(by_name[name].admin_address for name in TIMED),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=REPO)
        pollers.append(poller)
        issued: dict[int, float] = {}
        walls: list[tuple[float, float]] = []
        rng = random.Random(10)
        cpu_before = {c.name: cpu_seconds(c.pid) for c in (agent, *helpers.values())}
        started = time.monotonic()
        for _ in range(rotations):
            await asyncio.sleep(rng.uniform(0.05, 0.12))  # let the last rotation settle
            walls.append((time.time(), time.monotonic()))
            issued_at = time.monotonic()
            await spire.rotate_now(ENVOY_ID)
            serial = current()
            issued[serial] = issued_at
            for name, when in zip(TIMED, await _ask(poller, f"{serial:x}", "seen"),
                                  strict=True):
                if when == "-":
                    seen[name].missed += 1
                else:
                    seen[name].latencies_ms.append((float(when) - issued_at) * 1000)
        seconds = time.monotonic() - started
        cpu = {name: (cpu_seconds(c.pid) - cpu_before[c.name]) * 1000 / rotations
               for name, c in (("agent", agent), *helpers.items())}
        for name, mean in zip(TIMED, await _ask(poller, "stats", "stats"), strict=True):
            seen[name].mean_poll_ms = float(mean)
        await asyncio.sleep(0.3)  # a torn pair's second move, or a late reload, lands first
        for s in seen.values():
            s.after = await loop.run_in_executor(pool, s.admin.counters)
        written = {mode: helper_writes(helpers[mode].out) for mode in FILE_MODES}
        if trace_to := os.environ.get("BENCH_ROTATION_TRACE"):
            write_timeline(Path(trace_to), work, walls,
                           {n: s.latencies_ms for n, s in seen.items()}, FILE_MODES)

        # spiffe-helper as it is: files rewritten in place. Apart, so that its helper and
        # Envoy do not load the machine during the timed rotations.
        inplace = helper(work, files_root / "inplace", "inplace")
        children.append(inplace.start())
        await _wait("helper inplace to write its files", _files_ready(files_root / "inplace"),
                    inplace.check)
        inplace_envoy = EnvoyProcess(file_bootstrap(files_root / "inplace"),
                                     work / "envoy-inplace")
        envoys.append(inplace_envoy)
        await inplace_envoy.astart()
        inplace_admin = Admin(inplace_envoy.admin_address)
        admins.append(inplace_admin)
        if await loop.run_in_executor(pool, inplace_admin.wait_for, current(), 20.0) is None:
            raise TimeoutError("the in-place Envoy never held its first SVID")
        before = await loop.run_in_executor(pool, inplace_admin.counters)
        picked = 0
        for _ in range(inplace_rotations):
            await spire.rotate_now(ENVOY_ID)
            if await loop.run_in_executor(pool, inplace_admin.wait_for, current(),
                                          INPLACE_WAIT) is not None:
                picked += 1
        after = await loop.run_in_executor(pool, inplace_admin.counters)
        inplace_counters = {k: v - before.get(k, 0) for k, v in after.items()}
        return Outcome(rotations, seconds, seen, issued, written, inplace_rotations, picked,
                       inplace_counters, cpu)
    finally:
        for process in pollers:
            await _end(process)
        pool.shutdown(wait=True, cancel_futures=True)
        for admin in admins:
            admin.close()
        for envoy in envoys:
            envoy.stop()
        for child in reversed(children):
            child.stop()
        await spire.stop(grace=0)


# --- the result ---------------------------------------------------------------------------

def _to_disk(outcome: Outcome, mode: str) -> list[float]:
    """Issue -> the helper's files written, per rotation (ms)."""
    to_disk: list[float] = []
    for serial, issued_at in outcome.issued.items():
        if (at := outcome.written[mode].get(serial)) is not None:
            to_disk.append((at - issued_at) * 1000)
    return to_disk


def summarise(o: Outcome) -> BenchResult:
    sds, rename, swap = o.seen["sds"], o.seen["rename"], o.seen["swap"]
    if not (sds.latencies_ms and rename.latencies_ms and swap.latencies_ms):
        raise RuntimeError(f"an Envoy showed no rotation (missed: sds {sds.missed}, "
                           f"rename {rename.missed}, swap {swap.missed})")
    file_row = Row.of("file path: helper renames cert, key, bundle into place (peer)", "ms",
                      rename.latencies_ms)
    swap_row = Row.of("file path: helper swaps a ..data symlink, as Kubernetes (informative)",
                      "ms", swap.latencies_ms)

    def sds_row(label: str) -> Row:
        return Row.of(f"SDS path: dev-spire issue -> Envoy /certs ({label})", "ms",
                      sds.latencies_ms)

    versus_rename = sds_row("vs rename").against(file_row, TARGET)
    versus_rename.met = bool(versus_rename.ratio_p50 is not None and versus_rename.ratio_p50 < 1
                             and versus_rename.ratio_p99 is not None
                             and versus_rename.ratio_p99 < 1 and sds.missed == 0)
    versus_swap = sds_row("vs ..data swap").against(swap_row)  # informative: not the peer
    n = o.rotations
    torn_sds = Row("torn reads, SDS path", "count", sds.torn, None, n, target="0",
                   met=sds.torn == 0)
    torn_rename = Row("torn reads, file path (rename per file)", "count", rename.torn, None, n)
    torn_swap = Row("torn reads, file path (..data swap)", "count", swap.torn, None, n)
    inplace = Row("rotations shown, file path (in place, as spiffe-helper writes)", "count",
                  o.inplace_picked, None, o.inplace_rotations)
    to_disk = {mode: _to_disk(o, mode) for mode in FILE_MODES}
    polls = {name: s.mean_poll_ms for name, s in o.seen.items()}

    def p(samples: list[float], q: float) -> float:
        return round(percentile(samples, q), 3)

    details: dict[str, Any] = {
        "sds_rotation_p50_ms": p(sds.latencies_ms, 50),
        "sds_rotation_p99_ms": p(sds.latencies_ms, 99),
        "file_rotation_p50_ms": p(rename.latencies_ms, 50),
        "file_rotation_p99_ms": p(rename.latencies_ms, 99),
        "file_swap_rotation_p50_ms": p(swap.latencies_ms, 50),
        "file_swap_rotation_p99_ms": p(swap.latencies_ms, 99),
        "torn_reads_file": rename.torn,
        "torn_reads_file_swap": swap.torn,
        "torn_reads_sds": sds.torn,
        "rotations": n,
        "missed": {name: s.missed for name, s in o.seen.items()},
        "inplace_shown": f"{o.inplace_picked}/{o.inplace_rotations}",
        "mean_poll_ms": {k: round(v, 3) for k, v in polls.items()},
        "issue_to_files_written_p50_ms": {m: p(v, 50) for m, v in to_disk.items() if v},
        "cpu_ms_per_rotation": {k: round(v, 2) for k, v in o.cpu_ms_per_rotation.items()},
    }
    notes = _notes(o, details, versus_rename, versus_swap)
    return BenchResult("rotation", "Rotation to Envoy, versus file-based SDS",
                       [file_row, versus_rename, swap_row, versus_swap, torn_sds, torn_rename,
                        torn_swap, inplace], details, notes)


def _notes(o: Outcome, d: dict[str, Any], versus_rename: Row, versus_swap: Row) -> list[str]:
    polls = d["mean_poll_ms"]
    cpu = d["cpu_ms_per_rotation"]
    notes = [
        f"**Method.** dev-spire runs in the benchmark's process; {o.rotations} rotations, "
        f"{o.seconds:.1f} s, 50-120 ms apart, each forced with `DevSpire.rotate_now` (it "
        "mints a new P-256 key and certificate for the Envoy's entry and wakes every "
        "subscriber). The issue time is the monotonic clock just before that call, so minting "
        "is inside every figure, on both paths alike. The same SVID goes to the agent "
        "(`spiffe-delegate run`, a subprocess) and to each file helper (bench/filesds.py, one "
        "subprocess per Envoy, subscribed to dev-spire's Delegated Identity API with the "
        "Envoy's selectors, as spiffe-helper subscribes to the Workload API). Each Envoy "
        "(real binary, 1 worker; the SDS one runs as its own uid and is attested by the agent) "
        "is polled by one thread of a separate process (bench/certspoll.py, so that polling "
        "does not share dev-spire's GIL): GET `/certs` on a kept-alive connection, "
        f"{POLL_INTERVAL * 1000:.0f} ms after each answer, until the new serial number shows; "
        "the time is taken when that answer has arrived. Resolution: the interval plus one "
        f"`/certs` request (mean {polls['sds']:.2f} ms on the SDS Envoy, "
        f"{polls['rename']:.2f} / {polls['swap']:.2f} ms on the file ones), the same on both "
        "paths.",
        "**The file path.** spiffe-helper writes `svid.pem`, `svid_key.pem` and "
        "`svid_bundle.pem` in that order with Go's `os.WriteFile`: in place (O_TRUNC, "
        "write), nothing renamed (spiffe/spiffe-helper, pkg/disk/x509.go). Envoy's "
        "`path_config_source` with `watched_directory` reloads only when something is moved "
        "into the directory, so those writes are never seen: "
        f"{o.inplace_picked} of {o.inplace_rotations} rotations written that way reached "
        f"Envoy within {INPLACE_WAIT * 1000:.0f} ms (its `sds.*` counters did not move), and "
        "the old certificate stays until it expires. The timed file paths therefore use the "
        "two ways Envoy does see, written by the same helper from the same SVID: (a) the "
        "peer: each file written under a temporary name and renamed into place, cert, key, "
        "bundle (spiffe-helper's files and order, made visible); (b) informative: "
        "Kubernetes' atomic writer, the three files in a fresh directory and a `..data` "
        "symlink renamed over the old one. Files are on tmpfs (/dev/shm), a best case for "
        "the file path; the Secret resources name the PEM files (`filename` data sources).",
        "**Torn reads.** Counted from Envoy's `/stats`: `sds.default.key_rotation_failed` "
        "(Envoy loaded a certificate whose private key does not match it, "
        "KEY_VALUES_MISMATCH in its log, and kept the old pair) plus "
        "`sds.default.update_rejected`, over the timed rotations. With a rename per file "
        "Envoy reloads on every move, and when it reads between the certificate's rename and "
        f"the key's it sees a torn pair: {d['torn_reads_file']} of {o.rotations} rotations "
        "here (timing-dependent; the rotation then lands at the key's rename, inside its "
        f"latency). The `..data` swap had {d['torn_reads_file_swap']}, the SDS path "
        f"{d['torn_reads_sds']}: a Secret arrives whole, in one message. `/certs` shows no "
        "key, so that counter is the only place a mismatch shows.",
        "**Where the time goes.** CPU per rotation (user + system, all threads): agent "
        f"{cpu.get('agent', 0):.2f} ms, file helper {cpu.get('rename', 0):.2f} ms. Stage "
        "timestamps (docs/profiles/rotation-sds-timeline.txt, BENCH_ROTATION_TRACE): "
        "dev-spire's answer reaches the agent no later than the helpers; from there the "
        "file path is one write and an inotify wake-up of Envoy, while the SDS path re-checks "
        "the caller in /proc, validates the SVID (chain, profile, key; 0.26 ms unloaded since "
        "e281dc1, 2 ms before, docs/profiles/rotation-agent-validate.txt), publishes, wakes "
        "both of the Envoy's streams (certificate and bundle: the bundle stream re-checks the "
        "caller and resolves for nothing, and may run first), builds the push, and makes a "
        "second Python gRPC hop (grpc.aio plus the peer-credential relay, about 0.5-0.8 ms "
        "by itself on this machine) that the file path does not have. Envoy applies an SDS "
        "push faster than it reloads files, which gives some of it back.",
    ]
    if not versus_rename.met and versus_rename.ratio_p50 is not None \
            and versus_rename.ratio_p99 is not None:
        notes.append(
            f"**Missed:** SDS against the file path p50 {versus_rename.ratio_p50:.2f}x, p99 "
            f"{versus_rename.ratio_p99:.2f}x (target below 1x); against the `..data` swap "
            f"{versus_swap.ratio_p50 or 0:.2f}x / {versus_swap.ratio_p99 or 0:.2f}x. Why: "
            "the agent's extra hop and its per-rotation work above, measured on a busy "
            "2-core machine where each hand-off between tasks and threads waits for CPU; "
            "the file helper does a third of the agent's CPU work, and validates nothing. "
            "Already done: the caller is re-checked only before an actual push, so the "
            "bundle stream's no-op wake no longer reads /proc ahead of the certificate's "
            "push, and re-checks read stat and cgroup only. What would close the rest, "
            "largest first (stage times in docs/profiles/rotation-sds-timeline.txt, "
            "section 3 for the quiet machine): fewer task hand-offs between SPIRE's "
            "answer and the push (client stream -> verifier task -> cache task -> SDS "
            "stream task, each a trip through the event loop, 0.3 ms each even on a "
            "quiet machine, more under load): the verifier could hand a verified answer "
            "to the cache by callback; waking only the SDS streams whose resources "
            "changed; the validation itself (0.46 ms per SVID standalone, chain "
            "signature and py-spiffe's profile checks, which re-parse the PEM) is the "
            "price of never pushing a bad SVID and stays. The second gRPC hop is inherent "
            "to a delegate between SPIRE and Envoy. Torn reads, the file path's real "
            "cost, stay at 0 on SDS.")
    return notes

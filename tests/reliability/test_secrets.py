"""Secrets: no private key material in anything a full run prints, on no disk, and socket and
file modes as documented (docs/security.md, docs/sds.md, docs/dev-spire.md, docs/demo.md).

The full run (one per module, about 20 s): dev-spire in-process, whose CAs report every key
they make (``TrustDomainCA.on_key``); two ``spiffe-delegate run`` processes at debug level,
one logging text (metrics over mutual TLS, ``--metrics-tls-mode spiffe``, under umask 077),
one logging JSON (a 0660 socket with a group, under umask 000), both under ``strace`` (every
file they open for writing, create, rename or link, and every memfd); a real Envoy
on each; SVID rotations every 2 s and a CA rotation; corrupt SVIDs (key mismatch, malformed,
wrong SAN) through dev-spire's faults file; an SDS NACK; the delegate de-authorized and
authorized again; and every /healthz, /readyz, /status and /metrics body, ``status`` and
``doctor`` (text and JSON) collected on the way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import io
import json
import logging
import os
import re
import shutil
import signal
import ssl
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import HostPort
from agent.demo.registry import issue_server_certificate
from agent.devspire import DevSpire, DevSpireSettings
from agent.logs import JsonFormatter
from agent.model import Selector, X509Svid
from agent.spire.backoff import BackoffPolicy
from agent.spire.client import DelegatedIdentityClient
from tests.envoyproc import EnvoyProcess, envoy_binary, sds_bootstrap
from tests.http.conftest import get, pem_chain
from tests.reliability.secrets_support import (
    KeySet,
    Scanner,
    is_memfd,
    open_files,
    read_open_file,
    regular_files,
)
from tests.sds_server.clients import SotwClient
from tests.sds_server.conftest import SELF_EXE, UID_A, UID_B, short_dir
from tests.waiting import eventually

TD = "example.org"
DELEGATE = f"spiffe://{TD}/spiffe-delegate"
ENVOY_A = f"spiffe://{TD}/envoy/a"
ENVOY_B = f"spiffe://{TD}/envoy/b"
SCRAPER = f"spiffe://{TD}/ns/monitoring/sa/prometheus"
SCRAPER_SELECTORS = ("k8s:ns:monitoring", "k8s:sa:prometheus")
SVID_TTL = 4.0  # rotated at half: every 2 s
NACK_DETAIL = "planted NACK: the secret was refused by the test"


def _entry(spiffe_id: str, *selectors: str, **extra: Any) -> dict[str, Any]:
    pairs = [dict(zip(("type", "value"), s.split(":", 1), strict=True)) for s in selectors]
    return {"spiffe_id": spiffe_id, "parent_id": f"spiffe://{TD}/spire/agent/dev",
            "selectors": pairs, **extra}


def _entries(delegate: str = DELEGATE) -> dict[str, Any]:
    """The run's entries; the agents' own entry names ``delegate`` (one that is not an
    authorized delegate makes SPIRE refuse them)."""
    return {"entries": [
        _entry(delegate, f"unix:uid:{os.getuid()}", f"unix:path:{SELF_EXE}",
               dns_names=["spiffe-delegate-metrics.spiffe-delegate.svc"]),
        _entry(ENVOY_A, f"unix:uid:{UID_A}"), _entry(ENVOY_B, f"unix:uid:{UID_B}"),
        _entry(SCRAPER, *SCRAPER_SELECTORS)]}


def _write_json(path: Path, document: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document))
    os.replace(tmp, path)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- the run's record ------------------------------------------------------------------------

@dataclass
class AgentProc:
    name: str
    root: Path
    log_format: str
    sds_socket: Path
    umask: int
    # Port 0 until the agent says which it bound.
    health: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 0))
    metrics: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 0))
    proc: asyncio.subprocess.Process | None = None
    strace_log: Path | None = None

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def stderr(self) -> Path:
        return self.root / "stderr.log"

    @property
    def stdout(self) -> Path:
        return self.root / "stdout.log"

    def log_text(self) -> str:
        return self.stderr.read_text(errors="replace") + self.stdout.read_text(errors="replace")

    def bound(self) -> bool:
        """Reads the ports it bound (port 0: free ports, so no clash with other tests)."""
        found = dict(re.findall(r"serving (/healthz|/metrics)[^\n]*? on https?://"
                                r"127\.0\.0\.1:(\d+)", self.log_text()))
        if len(found) < 2:
            return False
        self.health = HostPort("127.0.0.1", int(found["/healthz"]))
        self.metrics = HostPort("127.0.0.1", int(found["/metrics"]))
        return True

    def pid(self) -> int | None:
        """The agent's own PID (under strace: strace's child)."""
        if self.proc is None or self.proc.returncode is not None:
            return None
        if self.strace_log is None:
            return self.proc.pid
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return None
        return int(children.split()[0]) if children.split() else None


@dataclass
class Run:
    """Everything the three scenarios judge."""

    work: Path
    keys: KeySet = field(default_factory=KeySet)
    outputs: dict[str, list[bytes]] = field(default_factory=dict)
    open_file_contents: dict[str, bytes] = field(default_factory=dict)
    fd_snapshots: int = 0
    memfds_seen: int = 0
    modes: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # mode, gid
    private_dirs: dict[str, list[str]] = field(default_factory=dict)
    gone_after_exit: dict[str, bool] = field(default_factory=dict)
    written_by_agent: list[str] = field(default_factory=list)  # "a: openat(...)", strace
    strace_opens: int = 0
    memfd_creates: dict[str, int] = field(default_factory=dict)
    core_limits: dict[str, str] = field(default_factory=dict)  # from /proc/<pid>/limits
    agent_files: dict[str, bytes] = field(default_factory=dict)
    keystore: Path | None = None
    keystore_modes: list[int] = field(default_factory=list)
    data_dir_mode: int | None = None
    spire_socket_mode: int | None = None
    spire_dir_names: list[str] = field(default_factory=list)
    envoy_updates: int = 0
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    seconds: float = 0.0

    def output(self, name: str, data: bytes | str) -> None:
        self.outputs.setdefault(name, []).append(data.encode() if isinstance(data, str)
                                                 else data)


# --- clients ---------------------------------------------------------------------------------

def _memfd_client_context(svid: X509Svid, bundle: bytes) -> ssl.SSLContext:
    """The scraper's TLS context, its key loaded through a memfd (the test keeps no key on
    disk either: its work directories are searched for keys)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=bundle)
    key = serialization.load_der_private_key(svid.private_key, None)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()) + pem_chain(svid.cert_chain)
    fd = os.memfd_create("test-scraper", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return context


async def _scraper_svid(admin_socket: Path) -> X509Svid:
    async with DelegatedIdentityClient(
            admin_socket, backoff=BackoffPolicy(initial=0.05, maximum=0.5,
                                                reset_after=1.0)) as client:
        stream = client.subscribe_x509_svids(
            selectors=[Selector.parse(s) for s in SCRAPER_SELECTORS])
        async for update in stream:
            if update.svids:
                return update.svids[0]
    raise AssertionError("dev-spire issued no scraper SVID")


async def _cli(run: Run, name: str, *args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=_clean_env())
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    run.output(f"cli {name} (exit {proc.returncode}) stdout", out)
    run.output(f"cli {name} (exit {proc.returncode}) stderr", err)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPIFFE_DELEGATE_")}
    env.update(extra)
    return env


# --- the full run ----------------------------------------------------------------------------

class _Capture:
    """dev-spire's (in-process) log lines in text and JSON, at debug level."""

    def __init__(self) -> None:
        self.text, self.json = io.StringIO(), io.StringIO()
        self._handlers = [logging.StreamHandler(self.text), logging.StreamHandler(self.json)]
        self._handlers[0].setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-5s %(name)s: %(message)s"))
        self._handlers[1].setFormatter(JsonFormatter())
        self._level = logging.WARNING

    def __enter__(self) -> _Capture:
        root = logging.getLogger()
        self._level = root.level
        root.setLevel(logging.DEBUG)
        for handler in self._handlers:
            root.addHandler(handler)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        for handler in self._handlers:
            root.removeHandler(handler)
        root.setLevel(self._level)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    """For dev-spire's files: modes must not depend on the umask."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


async def _start_agent(agent: AgentProc, admin_socket: Path, *extra: str,
                       strace: bool = False) -> None:
    for directory in (agent.cwd, agent.tmp, agent.home):
        directory.mkdir(parents=True)
    args = [sys.executable, "-m", "agent", "run", "--spire-admin-socket", str(admin_socket),
            "--sds-socket", str(agent.sds_socket), "--trust-domain", TD,
            "--health-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
            "--log-level", "debug", "--log-format", agent.log_format,
            "--reconnect-initial", "50ms", "--reconnect-max", "500ms",
            "--shutdown-grace", "2s", *extra]
    if strace:
        agent.strace_log = agent.root / "strace.txt"
        args = ["strace", "-f", "-qq", "--seccomp-bpf", "-o", str(agent.strace_log), "-e",
                "trace=open,openat,openat2,creat,rename,renameat,renameat2,link,linkat,"
                "truncate,mknodat,memfd_create", "--", *args]
    # Core dumps allowed at start, as containerd allows them: the agent must turn them off.
    args = ["prlimit", "--core=unlimited", "--", *args]
    with agent.stdout.open("wb") as out, agent.stderr.open("wb") as err:
        agent.proc = await asyncio.create_subprocess_exec(
            *args, stdout=out, stderr=err, stdin=asyncio.subprocess.DEVNULL,
            cwd=agent.cwd, umask=agent.umask,
            env=_clean_env(TMPDIR=str(agent.tmp), HOME=str(agent.home)))


def _envoy(work: Path, socket: Path, uid: int, name: str) -> EnvoyProcess:
    workdir = work / f"envoy-{name}"
    workdir.mkdir()
    os.chown(workdir, uid, uid)
    wrapper = workdir / "envoy-as-user"
    wrapper.write_text("#!/bin/sh\n"
                       f"exec setpriv --reuid={uid} --regid={uid} --clear-groups "
                       f'{envoy_binary()} "$@"\n')
    wrapper.chmod(0o755)
    return EnvoyProcess(sds_bootstrap(socket), workdir, binary=wrapper)


class Poller:
    """Scrapes every endpoint of both agents and snapshots their descriptors and modes,
    over and over, until stopped."""

    def __init__(self, run: Run, agents: list[AgentProc]) -> None:
        self.run = run
        self.agents = agents
        self.tls: ssl.SSLContext | None = None
        self.rounds = 0

    async def once(self) -> None:
        for agent in self.agents:
            for path in ("/healthz", "/readyz", "/status"):
                with contextlib.suppress(OSError, TimeoutError, IndexError, ValueError):
                    reply = await get(agent.health, path)
                    self.run.output(f"{agent.name} GET {path}", reply.body)
            context = self.tls if agent.name == "a" else None
            if agent.name != "a" or context is not None:
                with contextlib.suppress(OSError, TimeoutError, IndexError, ValueError,
                                         ssl.SSLError):
                    reply = await get(agent.metrics, "/metrics", context=context)
                    self.run.output(f"{agent.name} GET /metrics", reply.body)
            self.snapshot(agent)
        self.rounds += 1

    def snapshot(self, agent: AgentProc) -> None:
        pid = agent.pid()
        if pid is None:
            return
        run = self.run
        run.fd_snapshots += 1
        for item in open_files(pid):
            if is_memfd(item.target):
                run.memfds_seen += 1
                continue
            content = read_open_file(pid, item.fd)
            if content is not None:
                run.open_file_contents[f"{agent.name} fd {item.fd} -> {item.target}"] = content
        with contextlib.suppress(OSError):
            limits = Path(f"/proc/{pid}/limits").read_text()
            run.core_limits[agent.name] = " ".join(next(
                line for line in limits.splitlines() if line.startswith("Max core")).split())
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        run.modes[f"{agent.name} cwd {cwd}"] = (_mode(cwd), None)
        for path in (agent.sds_socket, agent.sds_socket.parent):
            with contextlib.suppress(FileNotFoundError):
                st = path.lstat()
                run.modes[f"{agent.name} {path}"] = (stat.S_IMODE(st.st_mode), st.st_gid)
        for root in (agent.cwd, agent.tmp, agent.home, agent.sds_socket.parent):
            for path in regular_files(root):  # during the run too: none is expected
                with contextlib.suppress(OSError):
                    run.agent_files[str(path)] = path.read_bytes()
        with contextlib.suppress(FileNotFoundError):
            for private in agent.tmp.iterdir():
                run.modes[f"{agent.name} private {private}"] = (_mode(private), None)
                run.private_dirs[str(private)] = sorted(p.name for p in private.iterdir())

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


async def _full_run(work: Path) -> Run:
    run = Run(work)
    spire_dir = work / "spire"
    spire_dir.mkdir()
    entries_path, faults_path = spire_dir / "entries.json", spire_dir / "faults.json"
    _write_json(entries_path, _entries())
    _write_json(faults_path, {})
    admin_socket = spire_dir / "admin.sock"
    data_dir = spire_dir / "data"
    settings = DevSpireSettings(
        socket_path=str(admin_socket), trust_domain=TD, entries_path=str(entries_path),
        authorized_delegates=(DELEGATE,), svid_ttl=SVID_TTL, ca_ttl=3600.0,
        reload_interval=0.1, faults_path=str(faults_path), data_dir=str(data_dir))
    a = AgentProc("a", work / "a", "text", work / "a" / "run" / "sds" / "sds.sock", umask=0o077)
    b = AgentProc("b", work / "b", "json", work / "b" / "run" / "sds.sock", umask=0o000)
    with _Capture() as devspire_log:
        with _umask(0):
            dev = DevSpire(settings)
            await dev.start()
        local = dev.cache.local
        local.on_key = lambda key: run.keys.add(key, "dev-spire key")
        for authority in local.authorities():
            run.keys.add(authority.key, f"CA {authority.serial} key")
            run.keys.add(authority.jwt_key, f"CA {authority.serial} JWT key")
        run.keystore = data_dir / "keys.json"
        run.keystore_modes.append(_mode(run.keystore))
        run.data_dir_mode = _mode(data_dir)
        run.spire_socket_mode = _mode(admin_socket)
        envoys: list[EnvoyProcess] = []
        stop = asyncio.Event()
        poller = Poller(run, [a, b])
        polling: asyncio.Task[None] | None = None
        try:
            b.root.mkdir()
            (b.root / "run").mkdir(mode=0o755)
            await _start_agent(a, admin_socket, "--metrics-tls-mode", "spiffe",
                               "--metrics-allowed-id", SCRAPER, strace=True)
            await _start_agent(b, admin_socket, "--sds-socket-mode", "0660",
                               "--sds-socket-group", str(UID_B), strace=True)
            for agent in (a, b):
                await eventually(lambda agent=agent: "serving SDS on" in agent.log_text()  # type: ignore[misc]
                                 and agent.bound(), timeout=60,
                                 what=f"agent {agent.name} to serve SDS, health and metrics")
            polling = asyncio.create_task(poller.loop(stop))

            scraper = await _scraper_svid(admin_socket)
            poller.tls = _memfd_client_context(scraper, dev.bundle_der())
            envoys = [_envoy(work, a.sds_socket, UID_A, "a"), _envoy(work, b.sds_socket, UID_B,
                                                                     "b")]
            for envoy in envoys:
                await envoy.astart()
            for envoy in envoys:
                await envoy.await_until(lambda e: e.sds_counter("default", "update_success")
                                        >= 1, timeout=30, what="Envoy's first SVID")

            # Corrupt SVIDs from dev-spire's faults file: each is rejected, with a log line.
            for mode, word in (("key_mismatch", "key_mismatch"), ("malformed", "malformed"),
                               ("wrong_san", "wrong_san")):
                _write_json(faults_path, {"corrupt_x509": {"mode": mode, "count": 3}})
                await eventually(lambda: dev.stats.faults_reloads > 0, what="faults loaded")
                await asyncio.sleep(0.3)  # the reload interval is 0.1 s
                await dev.rotate_now()
                await eventually(lambda w=word: w in a.log_text() + b.log_text(),  # type: ignore[misc]
                                 timeout=20, what=f"an agent to reject a {mode} SVID")
            _write_json(faults_path, {})

            # An SDS NACK, as Envoy sends for a secret it refuses.
            client = SotwClient(a.sds_socket)
            try:
                await client.request(["default"])
                first = await client.read(timeout=20)
                await client.nack(["default"], first.version_info, NACK_DETAIL)
                await eventually(lambda: NACK_DETAIL in a.log_text(), timeout=20,
                                 what="the agent to log the NACK")
            finally:
                await client.close()

            # The agents' identity is no longer an authorized delegate, then is again.
            seen = {agent.name: len(agent.log_text()) for agent in (a, b)}
            _write_json(entries_path, _entries(f"spiffe://{TD}/not-a-delegate"))
            await eventually(lambda: all("authorized delegate" in agent.log_text()[
                seen[agent.name]:] for agent in (a, b)), timeout=30,
                what="both agents to be refused as delegates")
            await asyncio.gather(_cli(run, "doctor (refused)", "doctor", "--spire-admin-socket",
                                      str(admin_socket), "--sds-socket", str(a.sds_socket)),
                                 _cli(run, "doctor --json (refused)", "doctor",
                                      "--spire-admin-socket", str(admin_socket),
                                      "--sds-socket", str(b.sds_socket), "--json"))
            _write_json(entries_path, _entries())

            with _umask(0):
                await dev.rotate_ca_now()
            run.keystore_modes.append(_mode(run.keystore))
            for authority in local.authorities():
                run.keys.add(authority.key, f"CA {authority.serial} key")

            # Rotations keep coming; Envoy gets each one.
            await envoys[0].await_until(
                lambda e: e.sds_counter("default", "update_success") >= 6, timeout=40,
                what="six SVIDs pushed to Envoy")
            await eventually(lambda: poller.rounds >= 4, timeout=30, what="scrapes")
            await asyncio.gather(
                _cli(run, "status a", "status", "--health-address",
                     f"{a.health.host}:{a.health.port}"),
                _cli(run, "status b --json", "status", "--json", "--health-address",
                     f"{b.health.host}:{b.health.port}"),
                _cli(run, "doctor", "doctor", "--spire-admin-socket", str(admin_socket),
                     "--sds-socket", str(a.sds_socket)),
                _cli(run, "doctor --json", "doctor", "--json", "--spire-admin-socket",
                     str(admin_socket), "--sds-socket", str(b.sds_socket)))
            await asyncio.gather(
                _cli(run, "status a --json", "status", "--json", "--health-address",
                     f"{a.health.host}:{a.health.port}"),
                _cli(run, "status b", "status", "--health-address",
                     f"{b.health.host}:{b.health.port}"))
            stop.set()
            await polling
            await poller.once()
            run.envoy_updates = await envoys[0].acall(envoys[0].sds_counter, "default",
                                                      "update_success")
            _collect_private_dirs(run, [a, b])
            run.spire_dir_names = sorted(os.listdir(spire_dir))
        finally:
            stop.set()
            if polling is not None and not polling.done():
                polling.cancel()
            for agent in (a, b):
                run.exit_codes[agent.name] = await _stop_agent(agent)
            for envoy in envoys:
                envoy.stop()
            await dev.stop(grace=0)
    _after(run, [a, b], devspire_log)
    return run


def _after(run: Run, agents: list[AgentProc], devspire_log: _Capture) -> None:
    """What is left once everything stopped: logs, files, and what should be gone."""
    for agent in agents:
        run.gone_after_exit[f"{agent.name} {agent.sds_socket}"] = not agent.sds_socket.exists()
        for private in run.private_dirs:
            if private.startswith(str(agent.tmp)):
                run.gone_after_exit[f"{agent.name} {private}"] = not Path(private).exists()
        run.output(f"agent {agent.name} stderr ({agent.log_format})", agent.stderr.read_bytes())
        run.output(f"agent {agent.name} stdout", agent.stdout.read_bytes())
        for root in (agent.cwd, agent.tmp, agent.home, agent.sds_socket.parent):
            for path in regular_files(root):
                run.agent_files[str(path)] = path.read_bytes()
        if agent.strace_log is not None:
            _read_strace(run, agent.name, agent.strace_log)
    run.output("dev-spire log (text)", devspire_log.text.getvalue())
    run.output("dev-spire log (json)", devspire_log.json.getvalue())


def _collect_private_dirs(run: Run, agents: list[AgentProc]) -> None:
    for agent in agents:
        for private in agent.tmp.iterdir():
            run.private_dirs[str(private)] = sorted(p.name for p in private.iterdir())


async def _stop_agent(agent: AgentProc) -> int | None:
    if agent.proc is None:
        return None
    pid = agent.pid()
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        return await asyncio.wait_for(agent.proc.wait(), 20)
    except TimeoutError:
        agent.proc.kill()
        await agent.proc.wait()
        return None


_OPEN = re.compile(r'^\d+ +(open|openat|openat2|creat|rename|renameat|renameat2|link|linkat|'
                   r'truncate|mknodat|memfd_create)\((.*)\) += (-?\d+)')
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_TMPFILE")


def _read_strace(run: Run, name: str, log: Path) -> None:
    """Every file the traced agent opened for writing, created, renamed or linked."""
    run.memfd_creates[name] = 0
    for line in log.read_text(errors="replace").splitlines():
        match = _OPEN.match(line)
        if match is None or match.group(3).startswith("-"):
            continue
        call, args = match.group(1), match.group(2)
        run.strace_opens += 1
        if call == "memfd_create":
            run.memfd_creates[name] += 1
            continue
        if call in ("open", "openat", "openat2") and \
                not any(flag in args for flag in _WRITE_FLAGS):
            continue
        run.written_by_agent.append(f"{name}: {call}({args})")


# --- the tests -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run() -> Iterator[Run]:
    if os.geteuid() != 0:
        pytest.skip("needs root (Envoys run under other uids)")
    envoy_binary()
    for tool in ("strace", "prlimit", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    work = short_dir("secrets-")
    try:
        started = time.monotonic()
        run = asyncio.run(_full_run(work))
        run.seconds = round(time.monotonic() - started, 1)
        yield run
    finally:
        if not os.environ.get("SECRETS_KEEP_WORK"):  # to read the run's files afterwards
            shutil.rmtree(work, ignore_errors=True)


def _scan_all(scanner: Scanner, sources: dict[str, bytes]) -> list[str]:
    return [str(f) for name, data in sources.items() for f in scanner.scan(name, data)]


def _pkcs8(key: Any) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.DER,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


@pytest.mark.scenario("secrets.no-key-in-output")
def test_no_key_material_in_any_output(full_run: Run, record_property: Any) -> None:
    run = full_run
    outputs = {name: b"\n".join(parts) for name, parts in run.outputs.items()}
    for needed in ("agent a stderr (text)", "agent b stderr (json)", "dev-spire log (text)",
                   "a GET /metrics", "b GET /metrics", "a GET /status", "b GET /readyz",
                   "a GET /healthz"):
        assert outputs.get(needed), f"nothing captured for {needed}"
    for cli in ("status a", "status b --json", "doctor", "doctor --json", "doctor (refused)"):
        assert any(name.startswith(f"cli {cli} (") and data for name, data in outputs.items()), \
            f"no output from {cli}"
    # The run went where it was meant to: every error path printed something.
    text = outputs["agent a stderr (text)"] + outputs["agent b stderr (json)"]
    for expected in (b"key_mismatch", b"malformed", b"wrong_san", NACK_DETAIL.encode(),
                     b"authorized delegate"):
        assert expected in text, f"the run never logged {expected!r}"
    json_lines = [line for line in outputs["agent b stderr (json)"].splitlines()
                  if line.startswith(b"{")]
    assert json_lines and all(json.loads(line)["msg"] is not None for line in json_lines)
    assert len(run.keys) >= 10, "the key observer saw too few keys"
    scanner = Scanner(run.keys)
    findings = _scan_all(scanner, outputs)
    record_property("keys_checked", len(run.keys))
    record_property("windows_per_form", run.keys.window_count)
    record_property("outputs_scanned", scanner.sources)
    record_property("lines_scanned", scanner.lines_scanned)
    record_property("bytes_scanned", scanner.bytes_scanned)
    record_property("envoy_svid_updates", run.envoy_updates)
    record_property("full_run_seconds", run.seconds)
    assert not findings, "private key material in output:\n" + "\n".join(findings)


@pytest.mark.scenario("secrets.no-key-on-disk")
def test_no_key_material_on_disk(full_run: Run, record_property: Any) -> None:
    run = full_run
    scanner = Scanner(run.keys)
    # The agents' open regular files during the run (their logs, anything else), every file
    # in their working, temporary, home and SDS socket directories after it.
    assert run.fd_snapshots >= 8, "too few descriptor snapshots"
    assert any("stderr.log" in name for name in run.open_file_contents)
    findings = _scan_all(scanner, run.open_file_contents)
    findings += _scan_all(scanner, run.agent_files)
    # Under strace, neither agent opened a file for writing, created, renamed or linked one,
    # but for the three below. The metrics TLS key went through memfds (agent a: one per
    # SVID or bundle change; agent b serves plain HTTP and made none).
    assert run.strace_opens > 200, "strace saw nothing: were the agents traced?"
    assert run.memfd_creates["a"] >= 3 and run.memfd_creates["b"] == 0, run.memfd_creates
    written = [w for w in run.written_by_agent if "__pycache__" not in w]
    # The SDS socket is bound under a temporary name and renamed into place.
    written = [w for w in written
               if not re.match(r'[ab]: rename(at2?)?\(.*\.sds\.sock\.[0-9a-f]+"', w)]
    # tempfile.mkdtemp (the relay's private directory) first probes $TMPDIR with a file of
    # 8 random characters, created O_EXCL 0600, written "blat" and unlinked at once.
    written = [w for w in written if not re.fullmatch(
        rf'([ab]): openat\(AT_FDCWD, "{re.escape(str(run.work))}/\1/tmp/[a-z0-9_]{{8}}", '
        r'O_RDWR\|O_CREAT\|O_EXCL\|O_NOFOLLOW\|O_CLOEXEC, 0600\)', w)]
    record_property("open_files_read", len(run.open_file_contents))
    record_property("descriptor_snapshots", run.fd_snapshots)
    record_property("memfds_seen_open", run.memfds_seen)
    record_property("agent_files_read", len(run.agent_files))
    record_property("file_syscalls_traced", run.strace_opens)
    record_property("metrics_tls_memfds", run.memfd_creates["a"])
    record_property("keys_checked", len(run.keys))
    assert not written, "the agent wrote files: " + "; ".join(written[:20])
    # Started with core dumps allowed, each agent turned them off: a crash writes no core
    # file full of private keys.
    assert run.core_limits == {"a": "Max core file size 0 0 bytes",
                               "b": "Max core file size 0 0 bytes"}, run.core_limits
    assert not findings, "private key material on disk:\n" + "\n".join(findings)
    # dev-spire's --data-dir keystore is SPIRE-side state (as SPIRE server's disk KeyManager):
    # it does hold the CA keys, which also proves the scanner finds keys in files.
    assert run.keystore is not None
    kept = Scanner(run.keys).scan("keys.json", run.keystore.read_bytes())
    assert kept, "the scanner found no key in dev-spire's keys.json, which holds CA keys"
    record_property("keystore_key_findings", len(kept))


@pytest.mark.scenario("secrets.socket-and-file-modes")
def test_socket_and_file_modes(full_run: Run, record_property: Any) -> None:
    run = full_run
    modes = run.modes
    work = run.work

    def mode_of(name: str) -> tuple[int, int | None]:
        assert name in modes, f"{name} was never seen; seen: {sorted(modes)}"
        return modes[name]

    # docs/sds.md, docs/security.md: the SDS socket 0666 by default; --sds-socket-mode 0660
    # with --sds-socket-group; a missing directory is created 0755 (whatever the umask:
    # agent a runs under umask 077, agent b under 000).
    assert mode_of(f"a {work}/a/run/sds/sds.sock")[0] == 0o666
    assert mode_of(f"a {work}/a/run/sds")[0] == 0o755
    assert mode_of(f"b {work}/b/run/sds.sock") == (0o660, UID_B)
    # The gRPC server's own socket: in a fresh 0700 directory under $TMPDIR, nothing else.
    for agent in ("a", "b"):
        private = {k: v for k, v in modes.items() if k.startswith(f"{agent} private ")}
        assert len(private) == 1, private
        assert all(m == 0o700 for m, _ in private.values()), private
    assert all(names == ["grpc.sock"] for names in run.private_dirs.values()), run.private_dirs
    # Removed on a clean shutdown: the SDS sockets and the private directories.
    assert run.exit_codes == {"a": 0, "b": 0}, run.exit_codes
    assert all(run.gone_after_exit.values()), run.gone_after_exit
    # dev-spire (docs/dev-spire.md, `dev-spire --help`): the admin socket 0770; --data-dir
    # created 0700, keys.json 0600, also after a rotation rewrote it (umask 000 throughout).
    assert run.spire_socket_mode == 0o770
    # docs/security.md: the agent creates nothing next to SPIRE's admin socket.
    assert set(run.spire_dir_names) <= {"admin.sock", "data", "entries.json", "faults.json"}
    # The SDS socket got its mode and group under a temporary name, then was renamed into
    # place (seen by strace), so no client ever saw it with looser permissions.
    for agent in ("a", "b"):
        assert any(re.match(rf'{agent}: rename\(".*/\.sds\.sock\.[0-9a-f]+", ".*/sds\.sock"\)',
                            w) for w in run.written_by_agent), run.written_by_agent
    assert run.data_dir_mode == 0o700
    assert run.keystore_modes == [0o600, 0o600]
    record_property("paths_checked", len(modes) + 4)


@pytest.mark.scenario("secrets.socket-and-file-modes")
def test_demo_registry_key_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    """docs/demo.md: the demo registry's server key is written 0600."""
    with _umask(0):
        _, _, key = issue_server_certificate(tmp_path, ["registry.test"])
    assert _mode(key) == 0o600


# --- the scanner proves it can fail ---------------------------------------------------------

def _planted(der: bytes, secret_at: int) -> dict[str, bytes]:
    """A 16..24-byte slice of ``der`` that holds private bytes, in every form it may take."""
    piece = der[secret_at - 4:secret_at + 20]
    pem = b"-----BEGIN PRIVATE KEY-----\n" + base64.encodebytes(der) + \
        b"-----END PRIVATE KEY-----\n"
    out = {
        "raw": b"log: " + piece + b" end",
        "hex lower": b"key=" + piece.hex().encode(),
        "hex upper": b"KEY=" + piece.hex().upper().encode(),
        "hex colons": b"key " + piece.hex(":").encode(),
        "python repr": f"got {piece!r}".encode(),
        "json escaped": json.dumps({"msg": piece.decode("latin-1")}).encode(),
        "protobuf text": ('x509_svid_key: "' + "".join(f"\\{b:03o}" for b in piece) + '"'
                          ).encode(),
        "PEM": pem,
        "PEM body only": base64.encodebytes(der),
        "base64url": base64.urlsafe_b64encode(piece),
    }
    for shift in range(3):
        out[f"base64 alignment {shift}"] = b"b64 " + base64.b64encode(bytes(shift) + piece)[4:]
    return out


@pytest.mark.scenario("secrets.no-key-in-output")
def test_scanner_catches_a_planted_slice_in_every_form() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    keys = KeySet()
    keys.add(key, "planted")
    der = _pkcs8(key)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    for name, data in _planted(der, der.find(scalar)).items():
        findings = Scanner(keys).scan(name, b"line one\n" + data + b"\nline three\n")
        assert findings, name
        planted_lines = set(range(2, 3 + data.count(b"\n")))
        assert {f.line for f in findings} <= planted_lines | {0}, (name, findings)  # 0: wrapped
    assert Scanner(keys).scan("decimal", str(key.private_numbers().private_value).encode())
    # A slice that lies in the middle of the private value alone, 16 bytes exactly.
    middle = scalar[8:24]
    assert Scanner(keys).scan("middle", middle.hex().encode())
    assert Scanner(keys).scan("middle b64", base64.b64encode(middle))


@pytest.mark.scenario("secrets.no-key-in-output")
def test_scanner_is_quiet_about_public_material() -> None:
    """Certificates, public keys and their encodings are not key material: no finding."""
    key = ec.generate_private_key(ec.SECP256R1())
    keys = KeySet()
    keys.add(key, "quiet")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(hours=1)).sign(key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    for blob in (der, spki, der.hex().encode(), base64.b64encode(der),
                 cert.public_bytes(serialization.Encoding.PEM), repr(der).encode(),
                 os.urandom(4096)):
        assert not Scanner(keys).scan("public", blob)

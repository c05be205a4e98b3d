"""Helpers for the attestation attacks: connections held past their process, forced PID reuse,
and an SDS stack whose SPIRE answers can be intercepted.

The attacks need an SDS connection whose *peer* (the process the kernel recorded at
``connect()``) is gone or changed while someone still speaks on it. :func:`hold` does that
with real processes: a small program in a fake pod connects to the SDS socket, hands the
connected descriptor to the test over ``SCM_RIGHTS`` and waits. The test can then kill the
program, give its PID to another pod's process, and speak gRPC on the connection through a
:class:`Bridge` (grpc.aio cannot adopt a descriptor, so a private socket is spliced onto it).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from agent.attest import ProcReader
from agent.attest.verifier import VerifierSettings, VerifierStats
from agent.cache import CacheSettings, SpireSource, SvidCache
from agent.clock import SystemClock
from agent.devspire import DevSpire, DevSpireSettings
from agent.model import Selector, X509Bundles, X509SvidUpdate
from agent.sds.server import SdsServer, SdsSettings
from agent.sds.view import ViewSettings
from agent.spire import BackoffPolicy, DelegatedIdentityClient
from tests.podcgroups import FakePod
from tests.sds_server.clients import SotwClient, secrets_of
from tests.sds_server.conftest import DELEGATE, TD, write_entries
from tests.waiting import eventually

NOBODY = 65534
NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
FAST = BackoffPolicy(initial=0.02, maximum=0.2)
RPC = "SubscribeToX509SVIDs"

# Connects to the SDS socket, hands the connection to the test with its PID (as this
# process sees it), then waits until the test closes the control socket. Stdlib only, no
# site: it starts fast.
HOLDER = r"""
import array, os, socket, sys
sds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sds.connect(sys.argv[1])
ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
ctl.connect(sys.argv[2])
ctl.sendmsg([str(os.getpid()).encode()],
           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sds.fileno()]))])
sds.close()
ctl.recv(1)
"""


def python_argv(*args: str) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", HOLDER, *args]


@dataclass
class Held:
    """An SDS connection made by ``proc`` (in a pod), now held by the test."""

    proc: subprocess.Popen[Any]
    sock: socket.socket
    control: socket.socket
    reported_pid: int  # the holder's PID as it saw it (differs in another PID namespace)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """The process that connected exits (and is reaped: its PID is free)."""
        with contextlib.suppress(OSError):
            self.control.close()
        kill(self.proc)

    def close(self) -> None:
        self.kill()
        with contextlib.suppress(OSError):
            self.sock.close()


def kill(proc: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def _receive_fd(listener: socket.socket,
                timeout: float) -> tuple[socket.socket, socket.socket, int]:
    listener.settimeout(timeout)
    control, _ = listener.accept()
    control.settimeout(timeout)
    fds = array.array("i")
    msg, ancdata, _, _ = control.recvmsg(32, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:fds.itemsize])
    if not fds:
        control.close()
        raise RuntimeError("the holder sent no descriptor")
    control.settimeout(None)
    return socket.socket(fileno=fds[0]), control, int(msg.decode())


async def hold(pod: FakePod, sds_socket: Path, directory: Path, *,
               argv_prefix: Sequence[str] = (), uid: int | None = NOBODY,
               container_id: str | None = None,
               timeout: float = 10.0) -> Held:  # noqa: ASYNC109
    """A process in ``pod`` (as ``uid``; ``argv_prefix`` runs first, e.g. ``unshare``)
    connects to ``sds_socket`` and hands the connection over."""
    path = directory / f"handoff-{time.monotonic_ns()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        path.chmod(0o777)
        listener.listen(1)
        argv = [*argv_prefix, *python_argv(str(sds_socket), str(path))]
        proc = pod.spawn(argv, uid=uid, container_id=container_id)
        try:
            sock, control, reported = await asyncio.to_thread(_receive_fd, listener, timeout)
        except BaseException:
            kill(proc)
            raise
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            path.unlink()
    return Held(proc, sock, control, reported)


def force_pid(pod: FakePod, pid: int, argv: Sequence[str] = ("sleep", "120"), *,
              uid: int | None = NOBODY, attempts: int = 40) -> tuple[subprocess.Popen[Any], int]:
    """Starts ``argv`` in ``pod`` as PID ``pid`` (ns_last_pid = pid - 1 right before the
    fork). Other processes on the machine fork too, so a miss is retried; the test is
    skipped, saying so, when the kernel refuses or the PID never comes back.
    Returns the process and the number of tries it took."""
    for attempt in range(1, attempts + 1):
        try:
            NS_LAST_PID.write_text(str(pid - 1))
        except OSError as err:
            pytest.skip(f"the kernel refuses writes to {NS_LAST_PID}: {err} (forcing PID "
                        "reuse needs root with CAP_SYS_ADMIN in the initial PID namespace)")
        proc = pod.spawn(argv, uid=uid)
        if proc.pid == pid:
            return proc, attempt
        kill(proc)
    pytest.skip(f"could not get PID {pid} back in {attempts} attempts: processes started "
                "elsewhere on the machine kept taking it")


class Bridge:
    """A private Unix socket whose first connection is spliced onto ``held`` (later
    connections are closed at once), so a grpc.aio channel can speak on a held connection."""

    def __init__(self, held: socket.socket, directory: Path) -> None:
        self.path = directory / f"bridge-{time.monotonic_ns()}.sock"
        self._held: socket.socket | None = held
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Bridge:
        self._server = await asyncio.start_unix_server(self._on_connection, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._held is not None:
            self._held.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        held, self._held = self._held, None
        if held is None:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        held.setblocking(False)
        far_reader, far_writer = await asyncio.open_unix_connection(sock=held)
        pumps = [asyncio.create_task(_pump(reader, far_writer)),
                 asyncio.create_task(_pump(far_reader, writer))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            writer.close()
            far_writer.close()
            self._tasks.discard(task)


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    with contextlib.suppress(OSError):
        sink.write_eof()


def spiffe_ids_of(response: Any) -> set[str]:
    """The URI SANs of every certificate in a DiscoveryResponse's TLS certificate Secrets."""
    out: set[str] = set()
    for secret in secrets_of(response).values():
        if secret.HasField("tls_certificate"):
            pem = secret.tls_certificate.certificate_chain.inline_bytes
            for cert in x509.load_pem_x509_certificates(pem):
                try:
                    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                except x509.ExtensionNotFound:
                    continue
                out.update(san.value.get_values_for_type(x509.UniformResourceIdentifier))
    return out


@dataclass
class Probe:
    """One StreamSecrets stream, read in the background: every SPIFFE ID it was ever served
    (with the response count) and how it ended."""

    client: SotwClient
    names: Sequence[str]
    responses: int = 0
    ids: set[str] = field(default_factory=set)
    ended: tuple[grpc.StatusCode, str] | None = None
    _task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, socket_path: Path | str, names: Sequence[str] = ("default",)) -> Probe:
        probe = cls(SotwClient(socket_path), names)
        try:
            await probe.client.request(list(names))
        except grpc.aio.AioRpcError as error:  # refused before the request was taken
            probe.ended = (error.code(), error.details() or "")
            return probe
        except Exception:  # the call ended before the write: its status says why
            call = probe.client.call
            probe.ended = (await call.code(), await call.details() or "")
            return probe
        probe._task = asyncio.create_task(probe._read())
        return probe

    async def _read(self) -> None:
        call = self.client.call
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                self.responses += 1
                self.ids |= spiffe_ids_of(response)
                self.client.last = response
                await self.client.ack(list(self.names))
            self.ended = (await call.code(), await call.details() or "")
        except grpc.aio.AioRpcError as error:
            self.ended = (error.code(), error.details() or "")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the write side failed: the stream is over
            self.ended = (grpc.StatusCode.UNKNOWN, repr(exc))

    async def wait_ended(self, timeout: float = 10.0) -> tuple[grpc.StatusCode, str]:  # noqa: ASYNC109
        await eventually(lambda: self.ended is not None, timeout, "the SDS stream to end")
        assert self.ended is not None
        return self.ended

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.close()


AnswerHook = Callable[[int, X509SvidUpdate], None]


class HookedClient:
    """The SPIRE client, with ``on_answer(pid, update)`` called as each by-PID answer
    arrives, before the verifier sees it: the window between SPIRE's answer and its
    delivery, made deterministic."""

    def __init__(self, inner: DelegatedIdentityClient) -> None:
        self.inner = inner
        self.on_answer: AnswerHook | None = None

    def subscribe_x509_svids(self, *, pid: int | None = None,
                             selectors: Sequence[Selector] | None = None
                             ) -> AsyncIterator[X509SvidUpdate]:
        return self._hooked(self.inner.subscribe_x509_svids(pid=pid, selectors=selectors), pid)

    async def _hooked(self, stream: AsyncIterator[X509SvidUpdate],
                      pid: int | None) -> AsyncIterator[X509SvidUpdate]:
        try:
            async for update in stream:
                hook = self.on_answer
                if hook is not None and pid is not None:
                    hook(pid, update)
                yield update
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def subscribe_x509_bundles(self) -> AsyncIterator[X509Bundles]:
        return self.inner.subscribe_x509_bundles()


@dataclass
class AttackStack:
    """dev-spire attesting from the real /proc, and the agent's parts wired as
    :class:`agent.runner.Agent` wires them (SPIRE client -> SpireSource -> SvidCache ->
    SdsServer), with the verifier's settings and the SPIRE client exposed."""

    work: Path
    spire: DevSpire
    entries_path: Path
    client: HookedClient
    stats: VerifierStats
    cache: SvidCache
    sds: SdsServer

    @property
    def sds_socket(self) -> Path:
        return self.work / "sds.sock"

    async def set_entries(self, *entries: dict[str, Any]) -> None:
        before = self.spire.stats.entries_reloads
        write_entries(self.entries_path, entries)
        await eventually(lambda: self.spire.stats.entries_reloads > before, 10,
                         "dev-spire to reload its entries")

    def open_x509_streams(self) -> int:
        return self.spire.stats.open_streams[RPC]

    def answers_sent(self) -> int:
        return self.spire.stats.responses_sent[RPC]

    def served_ids(self) -> dict[str, set[str]]:
        """SPIFFE IDs each cache entry holds now, by the entry's key."""
        return {str(key): set(svids) for key, svids in self.cache.cached_svids().items()}


@contextlib.asynccontextmanager
async def attack_stack(work: Path, entries: Iterable[dict[str, Any]] = (), *,
                       use_pidfd: bool = True, trusted: Sequence[str] = (),
                       verifier: VerifierSettings | None = None
                       ) -> AsyncIterator[AttackStack]:
    entries_path = work / "entries.json"
    write_entries(entries_path, list(entries))
    spire = DevSpire(DevSpireSettings(
        socket_path=str(work / "admin.sock"), trust_domain=TD, entries_path=str(entries_path),
        authorized_delegates=(DELEGATE,), reload_interval=0.05))
    await spire.start()
    inner = DelegatedIdentityClient(str(work / "admin.sock"), backoff=FAST)
    client = HookedClient(inner)
    stats = VerifierStats()
    settings = verifier if verifier is not None else VerifierSettings(
        rescan_interval=0.1, retry_interval=0.5, use_pidfd=use_pidfd)
    source = SpireSource(client, ProcReader(), clock=SystemClock(), stats=stats,
                         settings=settings)
    cache = SvidCache(source, settings=CacheSettings(grace_period=0.2, trust_domain=TD))
    sds = SdsServer(SdsSettings(work / "sds.sock", view=ViewSettings(
        trust_domain=TD, trusted_proxies=frozenset(trusted))), cache)
    try:
        await cache.start()
        await sds.start()
        yield AttackStack(work, spire, entries_path, client, stats, cache, sds)
    finally:
        await sds.stop(grace=0.5)
        await cache.close()
        await inner.close()
        await spire.stop(grace=0)


def work_directory(prefix: str) -> Path:
    import tempfile
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))

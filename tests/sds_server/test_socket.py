"""The SDS socket: who may connect, stale and live sockets, removal, and callers that are
identified by the process that connected (and lose their stream once it exits)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from agent.cache.keys import ProcessKey
from agent.errors import ConfigError, SocketInUse
from agent.sds.server import SdsServer, SdsSettings
from tests.envoyproc import sds_bootstrap
from tests.sds_server.clients import SotwClient, fetch
from tests.sds_server.conftest import (
    UID_A,
    UID_B,
    AsUser,
    FakeCache,
    Pki,
    Scripted,
    needs_root,
)
from tests.waiting import eventually


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_default_mode_is_0666_and_the_socket_goes_away_on_stop(
        work_dir: Path, pki: Pki) -> None:
    cache = FakeCache()
    cache.publish([pki.svid()], pki.bundles)
    server = SdsServer(SdsSettings(work_dir / "sds.sock"), cache)
    await server.start()
    try:
        assert stat.S_ISSOCK((work_dir / "sds.sock").stat().st_mode)
        assert mode_of(work_dir / "sds.sock") == 0o666
        assert (await fetch(work_dir / "sds.sock", ["default"])).resources
    finally:
        await server.stop(grace=1)
    assert not (work_dir / "sds.sock").exists()
    assert sorted(os.listdir(work_dir)) == []


async def test_mode_and_group_narrow_who_may_connect(
        work_dir: Path, pki: Pki, as_user: AsUser) -> None:
    needs_root()
    cache = FakeCache()
    cache.publish([pki.svid()], pki.bundles)
    path = work_dir / "sds.sock"
    server = SdsServer(SdsSettings(path, socket_mode=0o660, socket_group=UID_A), cache)
    await server.start()
    try:
        assert mode_of(path) == 0o660 and path.stat().st_gid == UID_A
        config = sds_bootstrap(path, validation_contexts=[])
        member = as_user(config, UID_A)          # its group is UID_A
        outsider = as_user(config, UID_B)
        await asyncio.gather(member.astart(), outsider.astart(wait_ready=False))
        await member.await_until(lambda e: e.sds_counter("default", "update_success") >= 1)
        await outsider.await_until(lambda e: e.counter("cluster.sds.upstream_cx_connect_fail")
                                   >= 1, what="the outsider's connect to fail")
        assert await outsider.acall(outsider.sds_counter, "default", "update_success") == 0
    finally:
        await server.stop(grace=1)


async def test_a_stale_socket_is_replaced_and_a_live_one_refused(
        work_dir: Path, pki: Pki) -> None:
    path = work_dir / "sds.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays; nobody listens
    cache = FakeCache()
    first = SdsServer(SdsSettings(path), cache)
    await first.start()
    try:
        second = SdsServer(SdsSettings(path), cache)
        with pytest.raises(SocketInUse) as caught:
            await second.start()
        assert str(path) in str(caught.value) and "in use" in str(caught.value)
        assert path.exists(), "the refused server removed the live socket"
        cache.publish([pki.svid()], pki.bundles)
        assert (await fetch(path, ["default"])).resources  # the first still serves
    finally:
        await first.stop(grace=1)

    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        await SdsServer(SdsSettings(path), cache).start()
    assert path.read_text() == "not a socket"


_CONNECTOR = """
import socket, sys
path, channel_fd = sys.argv[1], int(sys.argv[2])
conn = socket.socket(socket.AF_UNIX)
conn.connect(path)
channel = socket.socket(fileno=channel_fd)
socket.send_fds(channel, [b"c"], [conn.fileno()])
channel.recv(1)  # exit when told to
"""


async def _bridge(listen: Path, connected: socket.socket) -> asyncio.Server:
    """A local socket whose one connection is spliced onto ``connected``."""
    async def splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(sock=connected)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    return await asyncio.start_unix_server(splice, path=str(listen))


async def test_a_caller_is_the_process_that_connected_and_its_exit_ends_the_stream(
        scripted: Scripted, pki: Pki, work_dir: Path) -> None:
    """Another process connects and hands the connection over (SCM_RIGHTS), then exits:
    the agent served that process (not us), and stops serving once it has exited."""
    scripted.cache.publish([pki.svid()], pki.bundles)
    ours, theirs = socket.socketpair()
    connector = subprocess.Popen(  # noqa: ASYNC220 (returns at once)
        [sys.executable, "-c", _CONNECTOR, str(scripted.socket), str(theirs.fileno())],
        pass_fds=[theirs.fileno()])
    theirs.close()
    _, fds, _, _ = await asyncio.to_thread(socket.recv_fds, ours, 1, 1)
    bridge = await _bridge(work_dir / "bridge.sock",
                           socket.socket(fileno=fds[0]))
    client = SotwClient(work_dir / "bridge.sock")
    try:
        await client.request(["default"])
        await client.read()
        assert [key for key in scripted.cache.watched if isinstance(key, ProcessKey)] == [
            ProcessKey(connector.pid, _start_time(connector.pid))]
        await client.ack(["default"])
        ours.send(b"x")
        await asyncio.to_thread(connector.wait, 10)

        scripted.cache.publish([pki.svid()], pki.bundles)  # would be pushed, but...
        code, _ = await client.status()
        assert code is grpc.StatusCode.OK
        assert scripted.server.stats.callers_exited == 1
        assert scripted.server.stats.responses == 1
        await eventually(lambda: scripted.server.stats.streams_active == 0)
    finally:
        await client.close()
        bridge.close()
        ours.close()
        if connector.poll() is None:
            connector.kill()
            connector.wait()


def _start_time(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text.rsplit(")", 1)[1].split()[19])

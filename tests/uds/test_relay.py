"""The relay hands gRPC handlers the real credentials of the caller's connection."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc import aio

from agent.errors import ConfigError, SocketInUse
from agent.uds.peercred import PeerCredentials
from agent.uds.relay import PeerCredentialRelay
from tests.waiting import eventually

SERVICE = "test.Echo"


async def _serve(relay: PeerCredentialRelay) -> aio.Server:
    async def whoami(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        creds = relay.lookup(context.peer())
        if creds is None:
            return b"unknown"
        return f"{creds.pid}:{creds.uid}:{creds.gid}:{creds.pidfd is not None}".encode()

    server = aio.server()
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(relay.inner_target)
    await server.start()
    await relay.start()
    return server


async def _whoami(path: Path) -> bytes:
    async with aio.insecure_channel(f"unix:{path}") as channel:
        result: bytes = await channel.unary_unary(f"/{SERVICE}/WhoAmI")(b"", timeout=5)
        return result


async def test_handler_sees_callers_pid_uid_gid_and_pidfd(tmp_path: Path) -> None:
    relay = PeerCredentialRelay(tmp_path / "pub.sock")
    server = await _serve(relay)
    try:
        answer = await _whoami(tmp_path / "pub.sock")
        assert answer == f"{os.getpid()}:{os.getuid()}:{os.getgid()}:True".encode()
    finally:
        await relay.close()
        await server.stop(None)


async def test_other_process_is_seen_as_itself(tmp_path: Path) -> None:
    relay = PeerCredentialRelay(tmp_path / "pub.sock")
    server = await _serve(relay)
    script = (
        "import socket,sys,os,grpc\n"
        f"ch=grpc.insecure_channel('unix:{tmp_path / 'pub.sock'}')\n"
        f"print(ch.unary_unary('/{SERVICE}/WhoAmI')(b'',timeout=5).decode(), os.getpid())\n"
    )
    try:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script,
                                                    stdout=subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        seen, child_pid = out.decode().split()
        assert seen.split(":")[0] == child_pid
        assert int(child_pid) != os.getpid()
    finally:
        await relay.close()
        await server.stop(None)


async def test_socket_mode_applied_and_file_removed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "pub.sock"
    relay = PeerCredentialRelay(path, mode=0o660)
    await relay.start()
    assert stat.S_ISSOCK(path.lstat().st_mode)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o660
    await relay.close()
    assert not path.exists()


async def test_stale_socket_replaced_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "pub.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # file left behind, nobody listening
    relay = PeerCredentialRelay(path)
    await relay.start()
    second = PeerCredentialRelay(path)
    with pytest.raises(SocketInUse, match="in use"):
        await second.start()
    await second.close()
    assert path.exists(), "refusing a live socket must not delete it"
    await relay.close()


async def test_regular_file_at_socket_path_is_not_deleted(tmp_path: Path) -> None:
    path = tmp_path / "pub.sock"
    path.write_text("important")
    relay = PeerCredentialRelay(path)
    with pytest.raises(ConfigError, match="not a socket"):
        await relay.start()
    assert path.read_text() == "important"
    await relay.close()


async def test_credentials_forgotten_when_connection_closes(tmp_path: Path) -> None:
    relay = PeerCredentialRelay(tmp_path / "pub.sock")
    server = await _serve(relay)
    try:
        await _whoami(tmp_path / "pub.sock")
        await eventually(lambda: relay.connections == 0, what="relay to drop the connection")
        assert relay.lookup("unix-abstract:spiffe-delegate-relay-00") is None
        assert relay.lookup("unix:/some/path") is None
    finally:
        await relay.close()
        await server.stop(None)


def test_pidfd_reports_exit() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    creds = PeerCredentials(pid=proc.pid, uid=0, gid=0, pidfd=os.pidfd_open(proc.pid))
    try:
        assert not creds.exited()
        proc.kill()
        proc.wait()
        assert creds.exited()
    finally:
        assert creds.pidfd is not None
        os.close(creds.pidfd)


async def test_an_unusable_socket_directory_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    relay = PeerCredentialRelay(blocker / "sds.sock")
    try:
        with pytest.raises(ConfigError) as caught:
            await relay.start()
        assert str(blocker) in caught.value.message
        assert "socket path" in caught.value.hint
    finally:
        await relay.close()


def test_no_temporary_directory_is_one_clear_error(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only root filesystem without a writable /tmp: the agent says what to mount
    instead of failing with a traceback."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as caught:
        PeerCredentialRelay(tmp_path / "sds.sock")
    assert "private directory" in caught.value.message
    assert "/tmp" in caught.value.hint

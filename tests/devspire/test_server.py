"""Lifecycle: settings checks, the socket file, start-up errors, SIGHUP and serve_dev_spire."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb
from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2_grpc as pb_grpc
from agent.devspire import DevSpire, DevSpireSettings, serve_dev_spire
from agent.errors import ConfigError, SocketInUse

from .conftest import (
    DELEGATE,
    TD,
    delegate_entry,
    entry,
    eventually,
    exists,
    sel,
    write_json,
)


def settings(work_dir: Path, **overrides: object) -> DevSpireSettings:
    entries = work_dir / "entries.json"
    if not entries.exists():
        write_json(entries, {"entries": [delegate_entry()]})
    base = DevSpireSettings(socket_path=str(work_dir / "admin.sock"), trust_domain=TD,
                            entries_path=str(entries), authorized_delegates=(DELEGATE,),
                            reload_interval=0.05)
    return replace(base, **overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"trust_domain": "Bad TD"}, "trust domain"),
    ({"authorized_delegates": ("spiffe://other.org/x",)}, "error validating authorized delegate"),
    ({"authorized_delegates": ("not-an-id",)}, "error validating authorized delegate"),
    ({"svid_ttl": 0}, "svid_ttl"),
    ({"key_type": "dsa"}, "key type"),
])
def test_settings_validation(work_dir: Path, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings(work_dir, **overrides).validate()


async def test_socket_lifecycle(work_dir: Path) -> None:
    s = settings(work_dir)
    async with DevSpire(s):
        mode = os.stat(s.socket_path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o770
        with pytest.raises(SocketInUse):
            await DevSpire(s).start()
    assert not exists(s.socket_path)


async def test_bad_entries_file_fails_start(work_dir: Path) -> None:
    path = work_dir / "entries.json"
    path.write_text('{"entries": [{"spiffe_id": "spiffe://example.org/x", "selectors": []}]}')
    with pytest.raises(ConfigError, match=r"entries\[0\]: selectors"):
        await DevSpire(settings(work_dir)).start()
    assert not exists(work_dir / "admin.sock")


@pytest.mark.skipif(os.getuid() != 0, reason="the entries name the caller by uid 0")
async def test_serve_dev_spire_reloads_on_sighup(work_dir: Path) -> None:
    s = settings(work_dir, reload_interval=3600.0)  # only SIGHUP can cause a reload
    stop = asyncio.Event()
    server = asyncio.create_task(serve_dev_spire(s, stop))
    await eventually(lambda: exists(s.socket_path))
    async with grpc.aio.insecure_channel("unix:" + s.socket_path) as channel:
        stub = pb_grpc.DelegatedIdentityStub(channel)
        req = pb.FetchJWTSVIDsRequest(audience=["a"], selectors=[sel("k8s:ns:web")])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.FetchJWTSVIDs(req)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        write_json(Path(s.entries_path), {"entries": [
            delegate_entry(), entry(f"spiffe://{TD}/web", "k8s:ns:web")]})
        os.kill(os.getpid(), signal.SIGHUP)

        async def served() -> bool:
            try:
                await stub.FetchJWTSVIDs(req)
            except grpc.aio.AioRpcError:
                return False
            return True

        deadline = asyncio.get_running_loop().time() + 5
        while not await served():
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(server, 5)
    assert not exists(s.socket_path)


@pytest.mark.skipif(os.getuid() != 0, reason="the entries name the caller by uid 0")
async def test_cli_subprocess_with_live_faults_file(work_dir: Path) -> None:
    s = settings(work_dir)
    write_json(Path(s.entries_path), {"entries": [
        delegate_entry(), entry(f"spiffe://{TD}/web", "k8s:ns:web")]})
    faults = work_dir / "faults.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "dev-spire", "--socket", s.socket_path,
        "--trust-domain", TD, "--entries", s.entries_path, "--authorized-delegate", DELEGATE,
        "--faults", str(faults), "--reload-interval", "50ms",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await eventually(lambda: exists(s.socket_path), within=20)
        async with grpc.aio.insecure_channel("unix:" + s.socket_path) as channel:
            stub = pb_grpc.DelegatedIdentityStub(channel)
            req = pb.FetchJWTSVIDsRequest(audience=["a"], selectors=[sel("k8s:ns:web")])
            assert (await stub.FetchJWTSVIDs(req)).svids[0].id.path == "/web"
            write_json(faults, {"inject": [{"code": "RESOURCE_EXHAUSTED", "count": -1}]})

            async def failing() -> bool:
                try:
                    await stub.FetchJWTSVIDs(req)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    return True
                return False

            deadline = asyncio.get_running_loop().time() + 5
            while not await failing():
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert not exists(s.socket_path)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

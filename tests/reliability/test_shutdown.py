"""Graceful shutdown of ``spiffe-delegate run``, the real process: SIGTERM drains (every
SDS stream ends with status OK before the exit, the socket file goes, status 0, within
``--shutdown-grace`` whatever the clients do); SIGINT is the same; a second signal cuts
the drain short; SIGKILL and a restart leave a real Envoy serving mTLS throughout, and it
reconnects to the new agent on its own. dev-spire runs in-process, Envoys as other uids."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.envoyproc import EnvoyProcess
from tests.envoyproc import envoy_factory as envoy_factory
from tests.reliability.shutdown_support import AgentProcess, StuckClient
from tests.sds.test_deploy_configs import echo_registry, free_port, plain_http
from tests.sds_server.clients import DeltaClient, SotwClient
from tests.sds_server.conftest import (
    PROXY_ID,
    REGISTRY_ID,
    UID_A,
    UID_B,
    AsUser,
    Stack,
    entry,
    held_serials,
    make_stack,
    needs_root,
)
from tests.sds_server.conftest import as_user as as_user
from tests.sds_server.conftest import work_dir as work_dir
from tests.sds_server.test_envoy import PullLoop, node_proxy_config, registry_side_config
from tests.waiting import eventually

Record = Callable[[str, object], None]
STREAMS_OPEN = "spiffe_delegate_sds_streams_open"


@contextlib.asynccontextmanager
async def node(work: Path, *entries: dict[str, Any], grace: str) -> AsyncIterator[
        tuple[Stack, AgentProcess]]:
    """In-process dev-spire and a started ``spiffe-delegate run`` subprocess; the agent is
    killed (if still running) and dev-spire stopped on the way out."""
    needs_root()
    stack = await make_stack(work, entries)
    agent = AgentProcess(work, stack.agent_settings.spire_admin_socket, grace=grace)
    try:
        agent.start()
        await agent.until_listening()
        yield stack, agent
    finally:
        agent.kill()
        await stack.spire.stop(grace=0)


def has_secrets(*names: str) -> Callable[[EnvoyProcess], bool]:
    return lambda e: all(e.sds_counter(name, "update_success") >= 1 for name in names)


async def until_streams(agent: AgentProcess, count: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while (seen := await agent.ametric(STREAMS_OPEN)) < count:
        if time.monotonic() > deadline:
            raise agent.fail(f"{STREAMS_OPEN} stayed at {seen}, expected {count}")
        await asyncio.sleep(0.02)


async def ended(call: Any, timeout: float) -> tuple[grpc.StatusCode, str, float]:  # noqa: ASYNC109
    """Reads a stream to its end: (status, details, when it ended)."""
    try:
        async with asyncio.timeout(timeout):
            while await call.read() is not grpc.aio.EOF:
                pass
        code, details = await call.code(), await call.details()
    except grpc.aio.AioRpcError as error:
        code, details = error.code(), error.details() or ""
    return code, details, time.monotonic()


async def open_raw_streams(socket: Path) -> tuple[SotwClient, DeltaClient]:
    sotw, delta = SotwClient(socket), DeltaClient(socket)
    await sotw.request(["default"])
    await sotw.read(timeout=10)
    await delta.request(["default"])
    await delta.read(timeout=10)
    return sotw, delta


def envoy_log_since(envoy: EnvoyProcess, offset: int) -> list[str]:
    return envoy.log_text()[offset:].splitlines()


@pytest.mark.root
@pytest.mark.scenario("shutdown.sigterm-drains")
async def test_sigterm_ends_every_stream_with_ok_removes_the_socket_and_exits_0(
        work_dir: Path, as_user: AsUser, record_property: Record) -> None:
    """A long grace (8 s), a real Envoy (the shipped node-proxy config, two SotW streams)
    and a SotW and a delta stream of the test's own: on SIGTERM every stream ends with OK
    before the process exits, the socket file is gone, the exit status is 0, and nothing
    waits for the grace. Envoy logs no warning and keeps its certificate."""
    async with node(work_dir, entry(PROXY_ID, f"unix:uid:{UID_A}"), grace="8s") as (_, agent):
        envoy = as_user(node_proxy_config(agent.sds_socket, free_port(), free_port()), UID_A,
                        component_log_level="config:debug")
        await envoy.astart(wait_ready=False)
        await envoy.await_until(has_secrets("default", "ALL"), what="default and ALL")
        held = await held_serials(envoy)
        sotw, delta = await open_raw_streams(agent.sds_socket)
        try:
            await until_streams(agent, 4)
            offset = len(await envoy.acall(envoy.log_text))
            agent.send(signal.SIGTERM)
            ends = asyncio.gather(ended(sotw.call, 10), ended(delta.call, 10))
            status = await agent.wait_exit(timeout=15)
            (sotw_code, _, sotw_at), (delta_code, _, delta_at) = await ends
        finally:
            await sotw.close()
            await delta.close()
        assert agent.signalled_at is not None and agent.exited_at is not None
        record_property("deadline_s", 8.0)
        record_property("exit_s", round(agent.exit_seconds, 3))
        record_property("streams_closed_before_exit_s",
                        round(agent.exited_at - max(sotw_at, delta_at), 3))
        assert status == 0, agent.fail(f"exit status {status}")
        assert (sotw_code, delta_code) == (grpc.StatusCode.OK, grpc.StatusCode.OK)
        assert max(sotw_at, delta_at) < agent.exited_at
        assert not agent.sds_socket.exists()
        # Clean streams end at once: the drain does not sit out the grace.
        assert agent.exit_seconds < 3.0, agent.fail(f"exit took {agent.exit_seconds:.2f}s")
        log = agent.log()
        assert "drained: every SDS stream ended cleanly" in log, agent.fail("no drain line")
        # Envoy took the clean end quietly, and keeps serving what it holds.
        assert await envoy.acall(envoy.ready_state) == "LIVE"
        assert await held_serials(envoy) == held
        # Envoy saw status OK on both of its streams (its debug line for a clean close;
        # UNAVAILABLE would start its "unavailable for long" warning clock instead) and
        # logged nothing at warning or above since.
        since = await envoy.acall(envoy_log_since, envoy, offset)
        closes = [line for line in since if "StreamSecrets gRPC config stream" in line
                  and "closed:" in line]
        assert len([line for line in closes[:2] if "closed: 0," in line]) == 2, closes[:4]
        loud = [line for line in since
                if any(f"][{level}]" in line for level in ("warning", "error", "critical"))]
        assert loud == [], loud


@pytest.mark.root
@pytest.mark.scenario("shutdown.sigterm-drains")
async def test_a_client_that_never_reads_cannot_hold_the_exit_past_a_short_grace(
        work_dir: Path, record_property: Record) -> None:
    """A 1.5 s grace and one StreamSecrets client with a zero flow-control window (its
    answer can never be sent): the ordinary stream still ends with OK at once, and the
    process exits with 0 within the grace, the socket file gone; the log names the cut
    stream."""
    grace = 1.5
    async with node(work_dir, grace=f"{grace}s") as (_, agent):
        stuck = StuckClient(agent.sds_socket)
        sotw = None
        try:
            await asyncio.to_thread(stuck.open_stream)
            sotw, _delta = await open_raw_streams(agent.sds_socket)
            await _delta.close()
            await until_streams(agent, 2)
            agent.send(signal.SIGTERM)
            end = asyncio.create_task(ended(sotw.call, 10))
            status = await agent.wait_exit(timeout=grace + 10)
            code, _, ended_at = await end
        finally:
            stuck.close()
            if sotw is not None:
                await sotw.close()
        assert agent.signalled_at is not None
        record_property("deadline_s", grace)
        record_property("exit_s", round(agent.exit_seconds, 3))
        record_property("clean_stream_end_s", round(ended_at - agent.signalled_at, 3))
        assert status == 0, agent.fail(f"exit status {status}")
        assert code is grpc.StatusCode.OK
        assert ended_at - agent.signalled_at < 1.0
        assert not agent.sds_socket.exists()
        assert agent.exit_seconds <= grace, agent.fail(f"exit took {agent.exit_seconds:.2f}s")
        assert "did not end within the shutdown grace" in agent.log(), agent.fail("no cut line")


@pytest.mark.root
@pytest.mark.scenario("shutdown.sigterm-drains")
async def test_sigint_drains_too_and_a_second_signal_ends_the_drain_at_once(
        work_dir: Path, record_property: Record) -> None:
    """SIGINT starts the same drain (the clean stream ends with OK); a stuck client holds
    it, and a SIGTERM during the drain ends it at once, well inside a 30 s grace: the
    socket file is still removed and the status is still 0."""
    async with node(work_dir, grace="30s") as (_, agent):
        stuck = StuckClient(agent.sds_socket)
        sotw = None
        try:
            await asyncio.to_thread(stuck.open_stream)
            sotw, _delta = await open_raw_streams(agent.sds_socket)
            await _delta.close()
            await until_streams(agent, 2)
            agent.send(signal.SIGINT)
            code, _, _ = await ended(sotw.call, 10)
            await agent.until_log("draining")
            assert agent.running, agent.fail("exited with a stream still open")
            second = time.monotonic()
            agent.send(signal.SIGTERM)
            status = await agent.wait_exit(timeout=10)
        finally:
            stuck.close()
            if sotw is not None:
                await sotw.close()
        assert agent.exited_at is not None
        record_property("deadline_s", 30.0)
        record_property("second_signal_exit_s", round(agent.exited_at - second, 3))
        assert code is grpc.StatusCode.OK
        assert status == 0, agent.fail(f"exit status {status}")
        assert agent.exited_at - second < 2.0, agent.fail("slow exit after the second signal")
        assert not agent.sds_socket.exists()
        assert "second signal" in agent.log(), agent.fail("no second-signal line")


@pytest.mark.root
@pytest.mark.scenario("shutdown.sigkill-restart")
async def test_sigkill_then_restart_envoys_keep_serving_mtls_and_reconnect(
        work_dir: Path, as_user: AsUser, record_property: Record) -> None:
    """The shipped node-proxy and registry-side configs over mTLS, a pull loop throughout:
    the agent is SIGKILLed (its socket file stays behind), the Envoys keep serving with
    the certificates they hold, the restarted agent replaces the stale socket, both Envoys
    reconnect on their own within their retry back-off (0.5 s at most), and a rotation
    after the restart reaches the node proxy. No request fails."""
    entries = [entry(PROXY_ID, f"unix:uid:{UID_A}"), entry(REGISTRY_ID, f"unix:uid:{UID_B}")]
    async with node(work_dir, *entries, grace="2s") as (stack, agent):
        registry = await asyncio.start_server(echo_registry, "127.0.0.1", 0)
        registry_port = registry.sockets[0].getsockname()[1]
        proxy_port, mtls_port = free_port(), free_port()
        try:
            side = as_user(registry_side_config(agent.sds_socket, mtls_port, registry_port),
                           UID_B)
            proxy = as_user(node_proxy_config(agent.sds_socket, proxy_port, mtls_port), UID_A)
            await asyncio.gather(side.astart(wait_ready=False), proxy.astart(wait_ready=False))
            for envoy in (side, proxy):
                await envoy.await_until(has_secrets("default", "ALL"), what="default and ALL")
            url = f"http://127.0.0.1:{proxy_port}/v2/"
            status, body = await asyncio.to_thread(plain_http, "GET", url)
            assert status == 200, body + side.log_tail()
            held = [await held_serials(envoy) for envoy in (proxy, side)]
            await until_streams(agent, 4)

            async with PullLoop(url) as loop:
                await eventually(lambda: loop.ok >= 3, what="pulls before the kill")
                agent.kill()
                assert agent.sds_socket.exists()  # SIGKILL leaves the file behind
                # No agent for a second (Envoy's retries reach their 0.5 s maximum): Envoy
                # keeps serving with what it holds.
                pulled, gone = loop.ok, time.monotonic()
                await eventually(lambda: loop.ok >= pulled + 5
                                 and time.monotonic() - gone >= 1.0, what="pulls with no agent")
                record_property("requests_without_agent", loop.ok - pulled)
                for envoy, serials in zip((proxy, side), held, strict=True):
                    assert await envoy.acall(envoy.ready_state) == "LIVE"
                    assert await held_serials(envoy) == serials

                agent.start()
                await agent.until_listening()
                up = time.monotonic()
                await until_streams(agent, 4)
                reconnect = time.monotonic() - up
                pulled = loop.ok
                await eventually(lambda: loop.ok >= pulled + 3, what="pulls after the restart")

                await stack.spire.rotate_now(PROXY_ID)
                await proxy.await_until(
                    lambda e: e.certs().chain_serials not in (held[0], set()),
                    what="the rotation after the restart")
                pulled = loop.ok
                await eventually(lambda: loop.ok >= pulled + 3, what="pulls after rotation")
        finally:
            registry.close()
        record_property("envoy_reconnect_s", round(reconnect, 3))
        record_property("failed_requests", len(loop.failures))
        record_property("requests", loop.ok)
        assert loop.failures == [], loop.failures[:5]
        # Envoy's SDS back-off (node-proxy.yaml) is 0.1 s, at most 0.5 s; allow for load.
        assert reconnect < 1.5, agent.fail(f"Envoys reconnected after {reconnect:.2f}s")

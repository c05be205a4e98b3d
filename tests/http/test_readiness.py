"""/healthz and /readyz: the readiness rules as pure functions, then against a real agent
whose dev-spire comes up late, goes away and comes back."""

from __future__ import annotations

import dataclasses
import json
import socket

from agent.cli import build_parser
from agent.config import AgentSettings, HostPort
from agent.errors import ConfigError
from agent.http.readiness import ReadinessProbe, assess, spire_problem
from agent.runner import Agent
from agent.spire.client import ClientStatus
from tests.http.conftest import Harness, eventually_async, get
from tests.waiting import eventually

DOWN = ClientStatus(socket_path="/run/spire/admin.sock", connected=False, reconnects=3,
                    active_streams=3, last_error="UNAVAILABLE: connect failed",
                    last_error_code="UNAVAILABLE")
UP = dataclasses.replace(DOWN, connected=True, reached=True)


# --- the rules ------------------------------------------------------------------------

def test_never_reached_is_not_ready_and_says_why() -> None:
    why = spire_problem(DOWN, now=100.0, limit=60.0)
    assert why == "never reached: UNAVAILABLE: connect failed"
    fresh = dataclasses.replace(DOWN, last_error=None)
    assert spire_problem(fresh, now=0.0, limit=60.0) == "never reached: no answer from SPIRE yet"


def test_reachable_is_ready() -> None:
    assert spire_problem(UP, now=100.0, limit=60.0) is None


def test_unreachable_counts_from_the_first_failure_up_to_the_limit() -> None:
    lost = dataclasses.replace(UP, connected=False, unreachable_since=1000.0)
    assert spire_problem(lost, now=1000.0, limit=60.0) is None
    assert spire_problem(lost, now=1060.0, limit=60.0) is None
    why = spire_problem(lost, now=1061.0, limit=60.0)
    assert why is not None and why.startswith("unreachable for 61s")
    assert "--ready-spire-timeout 60s" in why and "UNAVAILABLE: connect failed" in why


def test_assess_names_every_failing_check() -> None:
    verdict = assess(sds_problem="not listening on /run/sds.sock", spire=DOWN, now=0.0,
                     spire_timeout=60.0)
    assert not verdict.ready
    assert json.loads(verdict.to_json()) == {"ready": False, "checks": {
        "sds_socket": "not listening on /run/sds.sock",
        "spire": "never reached: UNAVAILABLE: connect failed"}}
    ok = assess(sds_problem=None, spire=UP, now=0.0, spire_timeout=60.0)
    assert ok.ready and ok.checks == {"sds_socket": "ok", "spire": "ok"}


def test_probe_reads_the_injected_clock() -> None:
    now = [500.0]
    status = dataclasses.replace(UP, connected=False, unreachable_since=500.0)
    probe = ReadinessProbe(sds_problem=lambda: None, spire_status=lambda: status,
                           spire_timeout=10.0, clock=lambda: now[0])
    assert probe.check().ready
    now[0] = 510.5
    assert not probe.check().ready
    status = UP  # SPIRE answers again
    assert probe.check().ready


# --- against a real agent -------------------------------------------------------------

async def test_readyz_follows_spire_reachability(harness: Harness) -> None:
    agent = await harness.start_agent(ready_spire_timeout=1.0)  # before dev-spire
    await eventually(lambda: agent.client.status.last_error is not None,
                     what="a first failed call to SPIRE")
    reply = await get(agent.health_address, "/readyz")
    assert reply.status == 503 and reply.headers["content-type"] == "application/json"
    document = reply.json()
    assert document["ready"] is False
    assert document["checks"]["sds_socket"] == "ok"
    assert document["checks"]["spire"].startswith("never reached: UNAVAILABLE")
    assert (await get(agent.health_address, "/healthz")).status == 200

    await harness.start_spire()
    await eventually(lambda: agent.client.status.reached, what="SPIRE to answer")
    reply = await get(agent.health_address, "/readyz")
    assert reply.status == 200, reply.body
    assert reply.json() == {"ready": True, "checks": {"sds_socket": "ok", "spire": "ok"}}

    await harness.stop_spire()
    await eventually(lambda: agent.client.status.unreachable_since is not None,
                     what="the agent to notice SPIRE is gone")
    replies = []

    async def poll() -> bool:
        replies.append(await get(agent.health_address, "/readyz"))
        return replies[-1].status == 503

    await eventually_async(poll, what="/readyz to fail after 1s without SPIRE")
    spire_why = replies[-1].json()["checks"]["spire"]
    assert spire_why.startswith("unreachable for ") and "--ready-spire-timeout 1s" in spire_why
    assert replies[-1].json()["checks"]["sds_socket"] == "ok"

    await harness.start_spire()
    await eventually_async(lambda: _status_is(agent.health_address, 200),
                           what="/readyz to recover with SPIRE back")


async def test_readyz_stays_ready_while_spire_is_briefly_away(harness: Harness) -> None:
    await harness.start_spire()
    agent = await harness.start_agent(ready_spire_timeout=60.0)
    await eventually_async(lambda: _status_is(agent.health_address, 200), what="ready")
    await harness.stop_spire()
    await eventually(lambda: agent.client.status.unreachable_since is not None,
                     what="the agent to notice SPIRE is gone")
    assert (await get(agent.health_address, "/readyz")).status == 200


async def test_readyz_fails_when_the_sds_socket_goes(harness: Harness) -> None:
    await harness.start_spire()
    agent = await harness.start_agent()
    await eventually_async(lambda: _status_is(agent.health_address, 200), what="ready")
    agent.settings.sds_socket.unlink()
    reply = await get(agent.health_address, "/readyz")
    assert reply.status == 503
    assert "was removed" in reply.json()["checks"]["sds_socket"]


async def test_healthz_and_http_basics(harness: Harness) -> None:
    agent = await harness.start_agent(follow_own_identity=False)
    address = agent.health_address
    reply = await get(address, "/healthz")
    assert (reply.status, reply.body) == (200, b"ok\n")
    assert reply.headers["connection"] == "close"
    head = await get(address, "/healthz", method="HEAD")
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == "3"
    assert (await get(address, "/healthz?verbose=1")).status == 200
    assert (await get(address, "/nope")).status == 404
    post = await get(address, "/healthz", method="POST")
    assert post.status == 405 and post.headers["allow"] == "GET, HEAD"
    assert (await get(address, "/metrics")).status == 404, "metrics has its own address"


async def test_endpoints_bind_loopback_by_default(harness: Harness) -> None:
    defaults = AgentSettings()
    assert defaults.health_address == HostPort("127.0.0.1", 8086)
    assert defaults.metrics_address == HostPort("127.0.0.1", 9086)
    args = build_parser().parse_args(["run"])
    assert (args.health_address, args.metrics_address) == (defaults.health_address,
                                                           defaults.metrics_address)
    # The default hosts, on free ports (the default ports may be taken on a shared host).
    assert defaults.health_address is not None and defaults.metrics_address is not None
    agent = await harness.start_agent(
        follow_own_identity=False,
        health_address=dataclasses.replace(defaults.health_address, port=0),
        metrics_address=dataclasses.replace(defaults.metrics_address, port=0))
    assert agent.endpoints is not None
    for server in (agent.endpoints.health, agent.endpoints.metrics):
        assert server is not None
        [bound] = server.bound
        assert bound[0] == "127.0.0.1" and bound[1] != 0
        [sock] = server._server.sockets  # type: ignore[union-attr]
        assert sock.family == socket.AF_INET
    assert (await get(agent.health_address, "/healthz")).status == 200
    assert (await get(agent.metrics_address, "/metrics")).status == 200


async def test_ipv6_literal_and_off(harness: Harness) -> None:
    agent = await harness.start_agent(follow_own_identity=False,
                                      health_address=HostPort("::1", 0), metrics_address=None)
    address = agent.health_address
    assert address is not None and address.host == "::1" and str(address).startswith("[::1]:")
    assert agent.metrics_address is None
    assert agent.endpoints is not None and agent.endpoints.metrics is None
    assert (await get(address, "/healthz")).status == 200


async def test_a_taken_port_is_a_clear_error(harness: Harness) -> None:
    first = await harness.start_agent(follow_own_identity=False)
    taken = first.health_address
    second = harness.settings(health_address=taken, sds_socket=harness.work / "other.sock")
    agent = Agent(second, follow_own_identity=False)
    try:
        await agent.start()
    except ConfigError as exc:
        assert str(exc).startswith(f"--health-address {taken}: cannot listen")
        assert "off to disable" in str(exc)
    else:
        await agent.close()
        raise AssertionError("a second agent on the same port must not start")
    assert not (harness.work / "other.sock").exists(), "the SDS socket is cleaned up"


async def _status_is(address: HostPort | None, status: int) -> bool:
    return (await get(address, "/readyz")).status == status

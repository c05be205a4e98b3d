"""``spiffe-delegate status`` and GET /status against a running agent (in-process, with
dev-spire) that holds an identity and serves an SDS stream to this test process."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.admin.status import render_status
from agent.runner import Agent
from tests.admin.conftest import run_cli
from tests.sds_server.clients import SotwClient, secrets_of
from tests.sds_server.conftest import DELEGATE, Stack, make_stack
from tests.waiting import eventually


@pytest.fixture
async def stack(work: Path) -> AsyncIterator[Stack]:
    harness = await make_stack(work)
    yield harness
    await harness.stop_agent()
    await harness.spire.stop(grace=0)


def health(agent: Agent) -> str:
    assert agent.health_address is not None
    return str(agent.health_address)


def assert_no_key_material(output: str, key_pem: bytes) -> None:
    assert "-----BEGIN" not in output
    assert "PRIVATE KEY" not in output
    # Not even the base64 body of the key (or a line of it) without its armour.
    for line in key_pem.decode().splitlines()[1:-1]:
        assert line not in output


async def test_status_shows_the_identity_and_the_stream(stack: Stack) -> None:
    agent = await stack.start_agent()
    client = SotwClient(stack.sds_socket)
    try:
        await client.request(["default"])
        response = await client.read()
        secret = secrets_of(response)["default"]
        chain = secret.tls_certificate.certificate_chain.inline_bytes
        key_pem = secret.tls_certificate.private_key.inline_bytes
        serial = f"{x509.load_pem_x509_certificate(chain).serial_number:x}"
        await client.ack(["default"])
        await eventually(lambda: agent.sds.stats.acks == 1, what="the ACK")

        text = await run_cli("status", "--health-address", health(agent))
        as_json = await run_cli("status", "--health-address", health(agent), "--json")
    finally:
        await client.close()

    assert text.returncode == 0, text
    assert as_json.returncode == 0, as_json
    document = as_json.json()

    # The identity: this process (no pod), served as the delegate's SPIFFE ID.
    [identity] = [i for i in document["identities"] if i["kind"] == "process"]
    assert identity["key"].startswith(f"{os.getpid()}@")
    assert identity["watchers"] == 1
    assert identity["attested_pid"] == os.getpid()
    assert identity["state"] == "serving"
    [svid] = identity["svids"]
    assert svid["spiffe_id"] == DELEGATE
    assert svid["serial"] == serial
    assert 3000 < svid["seconds_left"] <= 3600

    # The stream, by caller.
    sds = document["sds"]
    assert sds["listening"] is True
    assert sds["streams_active"] == 1
    assert sds["acks"] == 1
    [call] = sds["calls"]
    assert call["method"] == "StreamSecrets"
    assert call["pid"] == os.getpid()
    assert call["pod_uid"] is None
    assert call["spiffe_ids"] == [DELEGATE]
    assert call["key"] == f"Process({identity['key']})"

    spire = document["spire"]
    assert spire["reached"] is True and spire["connected"] is True
    assert spire["last_error"] is None
    assert document["readiness"] == {"sds_socket": "ok", "spire": "ok"}
    assert document["agent"]["trust_domain"] == "example.org"

    # The table says the same: the identity's row and the stream's row.
    out = text.stdout
    identity_rows = [line for line in out.splitlines()
                     if line.strip().startswith("process") and DELEGATE in line]
    assert len(identity_rows) == 1, out
    assert identity["key"] in identity_rows[0]
    assert serial[:6] in identity_rows[0] and serial[-4:] in identity_rows[0]
    assert identity_rows[0].split()[-1] == "1"  # watchers
    stream_rows = [line for line in out.splitlines() if "StreamSecrets" in line]
    assert len(stream_rows) == 1, out
    assert f"pid {os.getpid()} (uid {os.getuid()}, no pod)" in stream_rows[0]
    assert DELEGATE in stream_rows[0]
    assert "SDS streams (1)" in out
    assert "identities (1)" in out
    assert "connected" in out

    for output in (text.stdout, as_json.stdout):
        assert_no_key_material(output, key_pem)


async def test_status_while_spire_is_away_shows_the_error(stack: Stack) -> None:
    await stack.spire.stop(grace=0)
    agent = await stack.start_agent(follow_own_identity=True)
    await eventually(lambda: agent.client.status.last_error is not None, what="a failure")
    await eventually(lambda: any("does not exist" in e.message
                                 for e in agent.recent_errors.snapshot()),
                     what="the warning about the missing socket")
    ran = await run_cli("status", "--health-address", health(agent), "--json")
    assert ran.returncode == 0, ran
    document = ran.json()
    spire = document["spire"]
    assert spire["reached"] is False and spire["connected"] is False
    assert spire["last_error_code"] == "UNAVAILABLE"
    assert spire["unreachable_seconds"] is not None
    assert document["identities"] == []
    assert document["readiness"]["spire"].startswith("never reached")
    errors = document["recent_errors"]
    assert any(e["level"] == "WARNING" and "does not exist" in e["message"] for e in errors)

    text = await run_cli("status", "--health-address", health(agent))
    assert "never reached" in text.stdout or "unreachable" in text.stdout
    assert "UNAVAILABLE" in text.stdout
    assert "recent errors (" in text.stdout and "does not exist" in text.stdout


async def test_status_of_no_agent_fails_with_one_line(work: Path) -> None:
    ran = await run_cli("status", "--health-address", "127.0.0.1:1", "--timeout", "2s")
    assert ran.returncode == 1
    assert ran.stdout == ""
    assert ran.stderr.startswith("spiffe-delegate status: error: cannot reach the agent at "
                                 "http://127.0.0.1:1/status: Connection refused")
    off = await run_cli("status", env={"SPIFFE_DELEGATE_HEALTH_ADDRESS": "off"})
    assert off.returncode == 1
    assert "--health-address is off" in off.stderr
    any_port = await run_cli("status", "--health-address", "127.0.0.1:0")
    assert any_port.returncode == 1
    assert "--health-address is 127.0.0.1:0 (port 0)" in any_port.stderr


async def test_the_recent_errors_handler_leaves_with_the_agent(stack: Stack) -> None:
    agent = await stack.start_agent()
    root = logging.getLogger("spiffe_delegate")
    assert agent.recent_errors in root.handlers
    await stack.stop_agent()
    assert agent.recent_errors not in root.handlers


def test_render_tolerates_a_minimal_document() -> None:
    text = render_status({})
    assert "SDS streams (0)" in text and "identities (0)" in text


def test_render_lists_members_state_when_nothing_is_served() -> None:
    document: dict[str, Any] = {
        "identities": [{"kind": "workload", "key": "0f1e2d3c-4b5a-4697-8877-665544332211",
                        "state": "attesting", "watchers": 2, "svids": []}]}
    text = render_status(json.loads(json.dumps(document)))
    [row] = [line for line in text.splitlines() if line.strip().startswith("workload")]
    assert "(attesting)" in row and row.split()[-1] == "2"


async def test_identity_mode_shows_the_shared_entry_and_its_members(stack: Stack) -> None:
    agent = await stack.start_agent(cache_key="identity")
    client = SotwClient(stack.sds_socket)
    try:
        await client.request(["default"])
        await client.read()
        document = agent.status()
    finally:
        await client.close()
    by_kind = {item["kind"]: item for item in document["identities"]}
    shared, member = by_kind["identity"], by_kind["process"]
    assert shared["key"] == DELEGATE
    assert [svid["spiffe_id"] for svid in shared["svids"]] == [DELEGATE]
    assert shared["members"] == [member["id"]]
    assert shared["carrier"] == member["id"]
    assert shared["watchers"] == 1
    assert member["state"] == "shared"
    assert member["served_by"] == f"Identity({DELEGATE})"
    text = render_status(json.loads(json.dumps(document)))
    assert any(line.strip().startswith("identity") and DELEGATE in line
               for line in text.splitlines()), text

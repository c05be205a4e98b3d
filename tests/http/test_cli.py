"""The endpoint options of ``spiffe-delegate run``: flags, SPIFFE_DELEGATE_* variables, one-line
errors, and a real agent process serving /readyz and /metrics on the addresses it logs."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import ENV_PREFIX, RUN_OPTIONS, agent_settings
from agent.cliopts import add_options
from agent.config import AgentSettings, HostPort, parse_host_port
from agent.errors import ConfigError
from tests.http.conftest import SCRAPER, Harness, eventually_async, get
from tests.sds_server.conftest import TD
from tests.waiting import eventually


def settings_from(argv: list[str], env: dict[str, str] | None = None) -> AgentSettings:
    parser = argparse.ArgumentParser()
    add_options(parser, RUN_OPTIONS, ENV_PREFIX, environ=env or {})
    return agent_settings(parser.parse_args(argv))


def test_defaults() -> None:
    settings = settings_from([])
    assert settings.health_address == HostPort("127.0.0.1", 8086)
    assert settings.metrics_address == HostPort("127.0.0.1", 9086)
    assert settings.ready_spire_timeout == 60.0
    tls = settings.metrics_tls
    assert (tls.mode, tls.allowed_ids, tls.reload_interval) == ("none", (), 10.0)


def test_flags_and_environment() -> None:
    settings = settings_from(
        ["--metrics-tls-mode", "spiffe", "--metrics-allowed-id", SCRAPER,
         "--health-address", "[::1]:0", "--ready-spire-timeout", "90s"],
        env={"SPIFFE_DELEGATE_METRICS_ADDRESS": "off",
             "SPIFFE_DELEGATE_METRICS_ALLOWED_ID": f"spiffe://{TD}/ignored",
             "SPIFFE_DELEGATE_METRICS_TLS_RELOAD_INTERVAL": "2s"})
    assert settings.health_address == HostPort("::1", 0)
    assert settings.metrics_address is None
    assert settings.ready_spire_timeout == 90.0
    assert settings.metrics_tls.mode == "spiffe"
    assert settings.metrics_tls.allowed_ids == (SCRAPER,)  # flags win over the variable
    assert settings.metrics_tls.reload_interval == 2.0
    files = settings_from([], env={"SPIFFE_DELEGATE_METRICS_TLS_MODE": "files",
                                   "SPIFFE_DELEGATE_METRICS_CERT_FILE": "/s/tls.crt",
                                   "SPIFFE_DELEGATE_METRICS_KEY_FILE": "/s/tls.key",
                                   "SPIFFE_DELEGATE_METRICS_CLIENT_CA_FILE": "/s/ca.crt"})
    assert files.metrics_tls.cert_file == Path("/s/tls.crt")
    assert files.metrics_tls.client_ca_file == Path("/s/ca.crt")


def test_settings_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="needs at least one --metrics-allowed-id"):
        settings_from(["--metrics-tls-mode", "spiffe"])
    with pytest.raises(ConfigError, match="outside the trust domain"):
        settings_from(["--metrics-tls-mode", "spiffe", "--trust-domain", "other.test",
                       "--metrics-allowed-id", SCRAPER])


@pytest.mark.parametrize(("argv", "message"), [
    (["--metrics-tls-mode", "spiffe"],
     "error: --metrics-tls-mode spiffe needs at least one --metrics-allowed-id"),
    (["--metrics-tls-mode", "files", "--metrics-cert-file", "tls.crt"],
     "error: --metrics-tls-mode files needs --metrics-key-file, --metrics-client-ca-file"),
    (["--metrics-tls-mode", "tls"], "argument --metrics-tls-mode: 'tls' is not one of"),
    (["--metrics-allowed-id", "prometheus"], "argument --metrics-allowed-id"),
    (["--health-address", "8086"], "argument --health-address"),
    (["--ready-spire-timeout", "0s"], "argument --ready-spire-timeout"),
])
def test_bad_values_are_one_line(argv: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "agent", "run", *argv], capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


async def test_a_real_agent_process_serves_both_endpoints(harness: Harness) -> None:
    await harness.start_spire()
    log = harness.work / "agent.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "run",
            "--spire-admin-socket", str(harness.admin_socket),
            "--sds-socket", str(harness.work / "sds.sock"), "--reconnect-max", "200ms",
            stdout=out, stderr=out,
            env={**os.environ, "SPIFFE_DELEGATE_HEALTH_ADDRESS": "127.0.0.1:0",
                 "SPIFFE_DELEGATE_METRICS_ADDRESS": "[::1]:0"})
    try:
        pattern = re.compile(r"serving (/healthz and /readyz|/metrics) on http://(\S+)")
        await eventually(lambda: len(pattern.findall(log.read_text())) == 2, timeout=20,
                         what="both endpoints in the log")
        found = dict(pattern.findall(log.read_text()))
        health = parse_host_port(found["/healthz and /readyz"])
        metrics = parse_host_port(found["/metrics"])
        assert health.host == "127.0.0.1" and metrics.host == "::1"

        async def ready() -> bool:
            return (await get(health, "/readyz")).status == 200

        await eventually_async(ready, timeout=20, what="the agent to be ready")
        reply = await get(metrics, "/metrics")
        assert reply.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0, log.read_text()

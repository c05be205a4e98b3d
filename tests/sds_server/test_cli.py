"""``spiffe-delegate run`` as a real process: flags and SPIFFE_DELEGATE_* variables, an Envoy
served through it, a second agent refused on the same socket, SIGTERM draining."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from agent.cli import ENV_PREFIX, RUN_OPTIONS, agent_settings
from agent.cliopts import add_options
from agent.config import AgentSettings
from agent.errors import ConfigError
from agent.sds.limits import SdsLimits
from tests.envoyproc import sds_bootstrap
from tests.sds_server.conftest import TD, UID_A, AsUser, entry, make_stack, needs_root
from tests.waiting import eventually

ID_A = f"spiffe://{TD}/envoy/a"
PROXY = f"spiffe://{TD}/ns/zarf/sa/registry-proxy"
# Free ports for the health and metrics endpoints, so that agents never clash on ports.
ANY_PORTS = {"SPIFFE_DELEGATE_HEALTH_ADDRESS": "127.0.0.1:0",
             "SPIFFE_DELEGATE_METRICS_ADDRESS": "127.0.0.1:0"}


async def _start(log: Path, *args: str, env: dict[str, str] | None = None,
                 ) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "run", *args, stdout=out, stderr=out,
            env={**os.environ, **ANY_PORTS, **(env or {})})


async def _wait_exit(proc: asyncio.subprocess.Process, timeout: float) -> int:  # noqa: ASYNC109
    return await asyncio.wait_for(proc.wait(), timeout)


async def test_run_serves_envoy_refuses_a_second_agent_and_drains_on_sigterm(
        work_dir: Path, as_user: AsUser) -> None:
    needs_root()
    stack = await make_stack(work_dir, [entry(ID_A, f"unix:uid:{UID_A}")])
    sds_socket = work_dir / "sds.sock"
    common = ["--spire-admin-socket", str(work_dir / "admin.sock"),
              "--sds-socket", str(sds_socket), "--reconnect-max", "200ms"]
    log = work_dir / "agent.log"
    agent = await _start(log, *common, "--sds-socket-group", str(UID_A),
                         "--shutdown-grace", "3s", env={
                             "SPIFFE_DELEGATE_TRUST_DOMAIN": TD,
                             "SPIFFE_DELEGATE_SDS_SOCKET_MODE": "0660",
                             "SPIFFE_DELEGATE_TRUSTED_PROXY": PROXY,
                             "SPIFFE_DELEGATE_CACHE_KEY": "identity",
                         })
    try:
        await eventually(lambda: "serving SDS on" in log.read_text(), timeout=20,
                         what="the agent to serve SDS")
        st = sds_socket.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == UID_A
        # Logged after the SDS socket and the HTTP endpoints are up: wait for it.
        await eventually(lambda: f"trusted proxies (may ask for workload:<pod uid>): {PROXY}"
                         in log.read_text(), what="the trusted proxies line")

        envoy = as_user(sds_bootstrap(sds_socket), UID_A)
        await envoy.astart()
        await envoy.await_until(lambda e: e.sds_counter("default", "update_success") >= 1
                                and e.sds_counter("ROOTCA", "update_success") >= 1)
        held = await envoy.acall(envoy.certs)
        assert {uri for cert in held.chain_certs for uri in cert.uris} == {ID_A}

        # A second agent on the same socket is refused with a clear, one-line error.
        second_log = work_dir / "second.log"
        second = await _start(second_log, *common)
        assert await _wait_exit(second, 20) == 1
        text = second_log.read_text()
        assert f"{sds_socket} is in use by a running server" in text, text
        assert sds_socket.exists()

        started = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        assert await _wait_exit(agent, 10) == 0, log.read_text()
        assert time.monotonic() - started < 3.0 + 1.0
        assert not sds_socket.exists()
        assert "SDS server stopped" in log.read_text()
        # Envoy keeps what it holds when the agent goes away.
        assert await envoy.acall(envoy.ready_state) == "LIVE"
        assert (await envoy.acall(envoy.certs)).chain_serials == held.chain_serials
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
        await stack.spire.stop(grace=0)


def _settings(argv: list[str], env: dict[str, str] | None = None) -> AgentSettings:
    parser = argparse.ArgumentParser()
    add_options(parser, RUN_OPTIONS, ENV_PREFIX, environ=env or {})
    return agent_settings(parser.parse_args(argv))


def test_sds_options_flags_and_environment() -> None:
    settings = _settings(["--sds-socket-group", "root", "--trusted-proxy", PROXY,
                          "--trusted-proxy", f"spiffe://{TD}/other", "--sds-socket-mode", "0600",
                          "--sds-default-svid-name", "mine"],
                         env={"SPIFFE_DELEGATE_SDS_DISABLE_SPIFFE_CERT_VALIDATION": "true",
                              "SPIFFE_DELEGATE_SHUTDOWN_GRACE": "1500ms",
                              "SPIFFE_DELEGATE_CACHE_KEY": "Identity",
                              "SPIFFE_DELEGATE_TRUSTED_PROXY": "spiffe://ignored.test/x"})
    assert settings.sds_socket_group == 0 and settings.sds_socket_mode == 0o600
    assert settings.trusted_proxies == (PROXY, f"spiffe://{TD}/other")  # flags win
    assert settings.sds_names.default_svid_name == "mine"
    assert settings.sds_names.disable_spiffe_cert_validation is True
    assert settings.shutdown_grace == 1.5 and settings.cache_key == "identity"

    defaults = _settings([])
    assert defaults.sds_socket_mode == 0o666 and defaults.sds_socket_group is None
    assert defaults.sds_names.default_bundle_name == "ROOTCA"
    assert defaults.sds_names.default_all_bundles_name == "ALL"
    assert defaults.trusted_proxies == () and defaults.cache_key == "workload"


@pytest.mark.parametrize("argv", [
    ["--trusted-proxy", f"spiffe://{TD}"],          # a trust domain, not a workload
    ["--sds-socket-group", "no-such-group-here"],
    ["--sds-disable-spiffe-cert-validation", "maybe"],
    ["--cache-key", "pod"],
])
def test_bad_sds_options_are_one_line_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        _settings(argv)
    assert caught.value.code == 2


def test_sds_limits_flags_and_environment() -> None:
    settings = _settings(["--sds-max-names", "16", "--sds-idle-timeout", "90s"],
                         env={"SPIFFE_DELEGATE_SDS_MAX_NAME_BYTES": "4096",
                              "SPIFFE_DELEGATE_SDS_MAX_NAMES": "8",
                              "SPIFFE_DELEGATE_SDS_MAX_CONNECTIONS": "100",
                              "SPIFFE_DELEGATE_SDS_MAX_STREAMS_PER_CONNECTION": "50",
                              "SPIFFE_DELEGATE_SDS_HANDSHAKE_TIMEOUT": "2s"})
    assert settings.sds_limits == SdsLimits(max_name_bytes=4096, max_names=16,
                                            max_connections=100,
                                            max_streams_per_connection=50,
                                            handshake_timeout=2.0, idle_timeout=90.0)
    assert _settings([]).sds_limits == SdsLimits()
    for argv in (["--sds-max-names", "0"], ["--sds-max-connections", "many"],
                 ["--sds-handshake-timeout", "0s"]):
        with pytest.raises(SystemExit):
            _settings(argv)
    with pytest.raises(ConfigError, match="--sds-max-name-bytes 100 is too small"):
        _settings(["--sds-max-name-bytes", "100"])


def test_clashing_sds_names_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="also a bundle name"):
        _settings(["--sds-default-svid-name", "ROOTCA"])

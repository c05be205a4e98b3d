"""Helpers for the SPIRE-fault scenarios: dev-spire + the agent + a real Envoy, log counting,
SPIRE restarts in-process and as a subprocess."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.devspire import DevSpire
from tests.envoyproc import EnvoyProcess, sds_bootstrap
from tests.sds_server.conftest import (
    DELEGATE,
    TD,
    UID_A,
    AsUser,
    Stack,
    entry,
    make_stack,
    needs_root,
)
from tests.waiting import eventually

ID_A = f"spiffe://{TD}/envoy/a"
PARTNER = "partner.test"


def envoy_entry(**extra: Any) -> dict[str, Any]:
    """The registration entry of the Envoy run as UID_A."""
    return entry(ID_A, f"unix:uid:{UID_A}", **extra)


@contextlib.asynccontextmanager
async def running(work: Path, entries: Sequence[dict[str, Any]] = (), *,
                  follow_own_identity: bool = True, **changes: Any) -> AsyncIterator[Stack]:
    """dev-spire and the agent (following its own identity too, so that several SPIRE
    streams are open at once, as in production)."""
    stack = await make_stack(work, entries, **changes)
    try:
        await stack.start_agent(follow_own_identity=follow_own_identity)
        yield stack
    finally:
        await stack.stop_agent()
        await stack.spire.stop(grace=0)


def has_secrets(*names: str) -> Callable[[EnvoyProcess], bool]:
    return lambda e: all(e.sds_counter(name, "update_success") >= 1 for name in names)


async def attach_envoy(stack: Stack, as_user: AsUser,
                       validation: Sequence[str] = ("ROOTCA",)) -> EnvoyProcess:
    """A real Envoy as UID_A asking the agent for ``default`` and ``validation``; returns
    once it holds all of them."""
    needs_root()
    envoy = as_user(sds_bootstrap(stack.sds_socket, validation_contexts=list(validation)),
                    UID_A)
    await envoy.astart()
    await envoy.await_until(has_secrets("default", *validation), timeout=20,
                            what="Envoy to hold its secrets")
    return envoy


async def leaf_serials(envoy: EnvoyProcess) -> set[int]:
    """Serials of the SVIDs (leaf certificates) Envoy holds."""
    leaves = await envoy.acall(lambda: envoy.certs().leaves())
    return {leaf.serial for leaf in leaves}


async def ca_serials(envoy: EnvoyProcess) -> set[int]:
    serials: set[int] = await envoy.acall(lambda: envoy.certs().ca_serials)
    return serials


async def rejected_by_envoy(envoy: EnvoyProcess, *names: str) -> int:
    total = 0
    for name in names:
        total += await envoy.acall(envoy.sds_counter, name, "update_rejected")
    return total


def messages(caplog: pytest.LogCaptureFixture, text: str, *,
             level: int = logging.WARNING, logger: str = "spiffe_delegate") -> list[str]:
    """The agent's log messages at ``level`` (exactly) that contain ``text``."""
    return [r.getMessage() for r in caplog.records
            if r.levelno == level and r.name.startswith(logger) and text in r.getMessage()]


def serial_of(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


def local_ca_serials(spire: DevSpire) -> dict[int, int]:
    """dev-spire's local CAs: authority serial (1, 2, ...) -> certificate serial."""
    return {a.serial: a.cert.serial_number for a in spire.cache.local.authorities()}


async def restart_in_process(stack: Stack) -> None:
    """Stops dev-spire (its open streams end) and starts a new one on the same socket with
    the same settings, as a SPIRE agent restart does."""
    await stack.spire.stop(grace=0)
    stack.spire = DevSpire(stack.spire_settings)
    await stack.spire.start()


class SpireProcess:
    """``spiffe-delegate dev-spire`` as a child process, for kill -9."""

    def __init__(self, stack: Stack, log: Path) -> None:
        self._settings = stack.spire_settings
        self._log_path = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        s = self._settings
        socket_path = Path(s.socket_path)
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()  # what kill -9 left behind
        command = [sys.executable, "-m", "agent", "dev-spire", "--socket", s.socket_path,
                   "--trust-domain", TD, "--entries", str(s.entries_path),
                   "--authorized-delegate", DELEGATE, "--reload-interval", "0.05"]
        with self._log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    async def wait_listening(self) -> None:
        path = Path(self._settings.socket_path)

        def up() -> bool:
            assert self.process is not None and self.process.poll() is None, (
                "dev-spire exited: " + self._log_path.read_text()[-2000:])
            return path.exists()
        await eventually(up, timeout=30, what="the dev-spire subprocess to listen")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def close(self) -> None:
        self.kill()
        self.process = None

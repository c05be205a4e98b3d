"""Helpers for the shutdown scenarios: ``spiffe-delegate run`` as a real subprocess, an SDS
client that never reads (raw HTTP/2 with a zero flow-control window), and the agent's
SDS gauges read from its /metrics endpoint."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from envoy.service.discovery.v3 import discovery_pb2

from agent.demo.chain import free_port
from agent.sds.resources import SECRET_TYPE_URL
from tests.sds_server.clients import NODE
from tests.sds_server.conftest import TD

_REPO = Path(__file__).resolve().parents[2]


@dataclass
class AgentProcess:
    """``python -m agent run`` against dev-spire's admin socket in ``work``; its log (JSON
    lines on standard error) goes to ``work/agent-N.log``. Signalled and reaped by PID."""

    work: Path
    spire_socket: Path
    grace: str = "5s"
    extra: tuple[str, ...] = ()
    sds_socket: Path = field(init=False)
    metrics_port: int = field(init=False)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    log_path: Path = field(init=False)
    signalled_at: float | None = field(default=None, init=False)
    exited_at: float | None = field(default=None, init=False)
    _runs: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.sds_socket = self.work / "sds.sock"
        self.log_path = self.work / "agent-0.log"

    def argv(self) -> list[str]:
        self.metrics_port = free_port()
        return [sys.executable, "-m", "agent", "run",
                "--spire-admin-socket", str(self.spire_socket),
                "--sds-socket", str(self.sds_socket), "--trust-domain", TD,
                "--shutdown-grace", self.grace, "--reconnect-max", "0.5s",
                "--health-address", "off",
                "--metrics-address", f"127.0.0.1:{self.metrics_port}",
                "--log-format", "json", *self.extra]

    def start(self) -> None:
        """Starts a new agent process (the previous one must be gone)."""
        assert self.process is None or self.process.poll() is not None
        self._runs += 1
        self.log_path = self.work / f"agent-{self._runs}.log"
        self.signalled_at = self.exited_at = None
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=_REPO)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def fail(self, message: str) -> AssertionError:
        tail = "\n".join(self.log().splitlines()[-30:])
        return AssertionError(f"{message}\n--- agent log (pid {self.pid}) ---\n{tail}")

    def send(self, sig: signal.Signals) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
        os.kill(self.pid, sig)

    async def until_listening(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Waits until the agent answers on its SDS socket (a stale file does not count)
        and on its metrics port."""
        deadline = time.monotonic() + timeout
        while not (await asyncio.to_thread(_connectable, self.sds_socket)
                   and await asyncio.to_thread(_tcp_open, self.metrics_port)):
            if not self.running:
                raise self.fail("the agent exited before it listened")
            if time.monotonic() > deadline:
                raise self.fail(f"the agent did not listen within {timeout:g}s")
            await asyncio.sleep(0.02)

    async def until_log(self, text: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise self.fail(f"the agent never logged {text!r}")
            await asyncio.sleep(0.02)

    async def wait_exit(self, timeout: float) -> int:  # noqa: ASYNC109
        """The exit status; records when it exited. Fails (and kills it) after ``timeout``."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while (status := self.process.poll()) is None:
            if time.monotonic() > deadline:
                self.kill()
                raise self.fail(f"the agent did not exit within {timeout:g}s")
            await asyncio.sleep(0.005)
        if self.exited_at is None:
            self.exited_at = time.monotonic()
        return status

    @property
    def exit_seconds(self) -> float:
        """From the first signal to the exit."""
        assert self.signalled_at is not None and self.exited_at is not None
        return self.exited_at - self.signalled_at

    def kill(self) -> None:
        """SIGKILL and reap, if still running."""
        if self.process is not None and self.process.poll() is None:
            if self.signalled_at is None:
                self.signalled_at = time.monotonic()
            self.process.kill()
            self.process.wait()
            self.exited_at = time.monotonic()

    def metric(self, name: str) -> float:
        """One unlabelled sample from /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise self.fail(f"/metrics has no {name}")

    async def ametric(self, name: str) -> float:
        try:
            return await asyncio.to_thread(self.metric, name)
        except OSError:
            return -1.0


def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _tcp_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


# --- a client that never reads ------------------------------------------------------

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _SETTINGS = 0x0, 0x1, 0x4
_END_HEADERS, _ACK = 0x4, 0x1
_INITIAL_WINDOW_SIZE = 0x4


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + \
        struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    """HPACK "literal header field without indexing, new name", no Huffman coding."""
    out = bytearray([0x00])
    for text in (name.encode(), value.encode()):
        assert len(text) < 127
        out.append(len(text))
        out += text
    return bytes(out)


class StuckClient:
    """Opens StreamSecrets for ``default`` over raw HTTP/2 and then reads nothing: its
    flow-control window is zero, so not one byte of a response can reach it, and the
    server's send for this stream can never complete. The worst Envoy a drain can meet."""

    def __init__(self, path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.settimeout(5)
        self._sock.connect(str(path))

    def open_stream(self) -> None:
        settings = struct.pack(">HI", _INITIAL_WINDOW_SIZE, 0)
        headers = b"".join(_literal(n, v) for n, v in (
            (":method", "POST"), (":scheme", "http"),
            (":path", "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"),
            (":authority", "localhost"), ("content-type", "application/grpc"),
            ("te", "trailers")))
        request = discovery_pb2.DiscoveryRequest(resource_names=["default"],
                                                 type_url=SECRET_TYPE_URL, node=NODE)
        body = request.SerializeToString()
        message = b"\x00" + struct.pack(">I", len(body)) + body
        self._sock.sendall(_PREFACE + _frame(_SETTINGS, 0, 0, settings))
        # Read the server's SETTINGS (the first frame) and acknowledge it, then never
        # read again.
        head = self._recv_exactly(9)
        length = int.from_bytes(head[:3], "big")
        assert head[3] == _SETTINGS, head
        self._recv_exactly(length)
        self._sock.sendall(_frame(_SETTINGS, _ACK, 0, b"")
                           + _frame(_HEADERS, _END_HEADERS, 1, headers)
                           + _frame(_DATA, 0, 1, message))

    def _recv_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self._sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        return data

    def close(self) -> None:
        self._sock.close()

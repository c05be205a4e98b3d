"""The spiffe-delegate command line, run as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import build_parser
from tests.integration.conftest import DELEGATE, TD, selector_entry

CLI = [sys.executable, "-m", "agent"]
# Free ports for the health and metrics endpoints, so that agents never clash on ports.
ANY_PORTS = {"SPIFFE_DELEGATE_HEALTH_ADDRESS": "127.0.0.1:0",
             "SPIFFE_DELEGATE_METRICS_ADDRESS": "127.0.0.1:0"}


def wait_for_line(path: Path, needle: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not seen in {path.name} within {timeout}s:\n"
                         f"{path.read_text() if path.exists() else ''}")


class Procs:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str, env: dict[str, str] | None = None
              ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.work / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([*CLI, *args], stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **ANY_PORTS, **(env or {})})
        self.procs.append(proc)
        return proc, log

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    work = Path(os.path.realpath("/tmp")) / f"sd-cli-{os.getpid()}-{time.monotonic_ns()}"
    work.mkdir()
    p = Procs(work)
    yield p
    p.stop_all()


def write_entries(path: Path) -> None:
    path.write_text(json.dumps({"entries": [selector_entry(DELEGATE, f"unix:uid:{os.getuid()}")]}))


def start_dev_spire(procs: Procs, *extra: str) -> Path:
    entries = procs.work / "entries.json"
    write_entries(entries)
    socket = procs.work / "admin.sock"
    _, log = procs.start("dev-spire", "dev-spire", "--socket", str(socket), "--trust-domain", TD,
                         "--entries", str(entries), "--svid-ttl", "4s", *extra)
    wait_for_line(log, "dev-spire serving")
    return socket


def test_run_receives_own_svid_and_rotations(procs: Procs) -> None:
    socket = start_dev_spire(procs, "--authorized-delegate", DELEGATE)
    agent, log = procs.start("run", "run", "--spire-admin-socket", str(socket),
                             "--sds-socket", str(procs.work / "sds.sock"))
    text = wait_for_line(log, f"X.509-SVID in use: {DELEGATE}")
    first = [line for line in text.splitlines() if "X.509-SVID in use" in line]
    assert "X.509 bundles: spiffe://example.org (1 CA)" in wait_for_line(log, "X.509 bundles")
    assert "JWT bundles: spiffe://example.org" in wait_for_line(log, "JWT bundles")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # svid-ttl 4s: a rotation within ~2s
        lines = [line for line in log.read_text().splitlines() if "X.509-SVID in use" in line]
        if len(lines) > len(first):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("no rotation seen")
    assert "PRIVATE KEY" not in log.read_text()
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=10) == 0
    assert "stopped" in log.read_text()


def test_run_unauthorized_says_what_to_configure(procs: Procs) -> None:
    socket = start_dev_spire(procs, "--authorized-delegate", f"spiffe://{TD}/someone-else")
    _, log = procs.start("run", "run", "--spire-admin-socket", str(socket))
    text = wait_for_line(log, "authorized_delegates")
    assert "caller not configured as an authorized delegate" in text
    assert "admin_socket_path" in text


def test_run_waits_for_spire_that_is_not_up_yet(procs: Procs) -> None:
    socket = procs.work / "admin.sock"
    env = {"SPIFFE_DELEGATE_SPIRE_ADMIN_SOCKET": str(socket),
           "SPIFFE_DELEGATE_RECONNECT_MAX": "200ms"}
    _, log = procs.start("run", "run", env=env)
    wait_for_line(log, "does not exist")
    start_dev_spire(procs, "--authorized-delegate", DELEGATE)
    wait_for_line(log, f"X.509-SVID in use: {DELEGATE}")
    assert log.read_text().count("does not exist") == 1, "logged once per outage, not per retry"


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["run", "--reconnect-max", "soon"], {}, "argument --reconnect-max: 'soon' is not a duration"),
    (["run", "--metrics-address", "9090"], {}, "argument --metrics-address"),
    (["run", "--log-format", "xml"], {}, "argument --log-format"),
    (["run"], {"SPIFFE_DELEGATE_HEALTH_ADDRESS": "::1:80"},
     "environment variable SPIFFE_DELEGATE_HEALTH_ADDRESS"),
    (["dev-spire", "--entries", "e.json"], {}, "the following arguments are required: --socket"),
    (["dev-spire", "--socket", "s", "--entries", "e", "--authorized-delegate", "bob"], {},
     "argument --authorized-delegate: 'bob' is not a SPIFFE ID"),
    (["run", "--reconnect-initial", "1m", "--reconnect-max", "1s"], {},
     "--reconnect-initial is larger than --reconnect-max"),
])
def test_bad_values_get_one_line_naming_the_option(argv: list[str], env: dict[str, str],
                                                   message: str) -> None:
    result = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=30,
                            env={**os.environ, **env}, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_env_sets_options_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIFFE_DELEGATE_SDS_SOCKET", "/env/sds.sock")
    monkeypatch.setenv("SPIFFE_DELEGATE_RECONNECT_MAX", "1m")
    monkeypatch.setenv("SPIFFE_DELEGATE_METRICS_ADDRESS", "[::1]:9000")
    monkeypatch.setenv("SPIFFE_DELEGATE_DEV_SPIRE_AUTHORIZED_DELEGATE",
                       "spiffe://example.org/a, spiffe://example.org/b")
    args = build_parser().parse_args(["run", "--sds-socket", "/flag/sds.sock"])
    assert str(args.sds_socket) == "/flag/sds.sock"
    assert args.reconnect_max == 60.0
    assert (args.metrics_address.host, args.metrics_address.port) == ("::1", 9000)
    from agent.cliopts import repeatable_values
    dev = build_parser().parse_args(["dev-spire", "--socket", "s", "--entries", "e"])
    assert repeatable_values(dev, "authorized_delegate") == [
        "spiffe://example.org/a", "spiffe://example.org/b"]
    dev = build_parser().parse_args(["dev-spire", "--socket", "s", "--entries", "e",
                                     "--authorized-delegate", "spiffe://example.org/c"])
    assert repeatable_values(dev, "authorized_delegate") == ["spiffe://example.org/c"]


def test_every_option_names_its_env_var_in_help() -> None:
    prefixes = (("run", "SPIFFE_DELEGATE_"), ("dev-spire", "SPIFFE_DELEGATE_DEV_SPIRE_"))
    for command, prefix in prefixes:
        result = subprocess.run([*CLI, command, "--help"], capture_output=True, text=True,
                                timeout=30, check=True)
        flags = [w for w in result.stdout.split() if w.startswith("--") and w != "--help"]
        for flag in {f.rstrip(",") for f in flags}:
            env = prefix + flag[2:].upper().replace("-", "_")
            assert env in result.stdout.replace("\n", " ").replace("  ", ""), (command, env)


def test_version() -> None:
    result = subprocess.run([*CLI, "version"], capture_output=True, text=True, timeout=30,
                            check=True)
    assert result.stdout.startswith("spiffe-delegate ")

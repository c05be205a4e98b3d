"""``spiffe-delegate doctor``: every check passing against a healthy set-up (dev-spire that
serves this process as a delegate, a synthetic /proc of a healthy node), and each failure
with its advice; the exit status and --json from the real command."""

from __future__ import annotations

import asyncio
import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from agent.admin.doctor import (
    CheckResult,
    DoctorOptions,
    ProcScan,
    SpireAnswer,
    Status,
    SvidFacts,
    check_clock,
    check_host_pid,
    check_pod_cgroups,
    check_sds_socket,
    read_host_pid,
    run_checks,
    scan_proc,
)
from agent.attest.procfs import ProcReader
from tests.admin.conftest import (
    POD_A,
    POD_B,
    add_process,
    dev_spire,
    healthy_proc,
    run_cli,
    statuses,
    systemd_v1_line,
)
from tests.attest.conftest import FakeProcTree
from tests.podcgroups import fake_pod
from tests.sds_server.conftest import DELEGATE, TD, entry

ALL_CHECKS = ["spire-admin-socket", "authorized-delegate", "host-pid-namespace",
              "pod-cgroups", "sds-socket", "clock"]


def options(work: Path, **changes: object) -> DoctorOptions:
    base = {"spire_admin_socket": work / "admin.sock", "sds_socket": work / "sds" / "sds.sock",
            "proc_root": work / "proc", "timeout": 5.0}
    base.update(changes)
    return DoctorOptions(**base)  # type: ignore[arg-type]


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {result.name: result for result in results}


def cli_args(work: Path, *extra: str) -> list[str]:
    return ["doctor", "--spire-admin-socket", str(work / "admin.sock"),
            "--sds-socket", str(work / "sds" / "sds.sock"), "--proc-root", str(work / "proc"),
            *extra]


# --- a healthy set-up ---------------------------------------------------------------------

async def test_every_check_passes_on_a_healthy_node(work: Path) -> None:
    healthy_proc(work / "proc")
    (work / "sds").mkdir(mode=0o755)
    async with dev_spire(work):
        results = by_name(await run_checks(options(work)))
    assert list(results) == ALL_CHECKS
    assert {name: r.status for name, r in results.items()} == dict.fromkeys(
        ALL_CHECKS, Status.PASS), results
    assert DELEGATE in results["authorized-delegate"].detail
    assert f"pid {os.getpid()}" in results["authorized-delegate"].detail
    assert "2 pods with 4 processes" in results["pod-cgroups"].detail
    assert "PID 1 (systemd) is the host's init" in results["host-pid-namespace"].detail
    assert "mode 0755" in results["sds-socket"].detail
    assert all(not r.advice for r in results.values())


async def test_the_command_exits_0_and_prints_every_pass(work: Path) -> None:
    healthy_proc(work / "proc")
    (work / "sds").mkdir(mode=0o755)
    async with dev_spire(work):
        text = await run_cli(*cli_args(work))
        as_json = await run_cli(*cli_args(work, "--json"))
    assert text.returncode == 0, text
    lines = text.stdout.splitlines()
    for name in ALL_CHECKS:
        assert any(line.startswith("PASS") and f" {name} " in line for line in lines), text.stdout
    assert "0 failed, 0 warnings, 6 passed, 0 skipped" in text.stdout
    # SPIRE attested the doctor process itself (the CLI's own PID), not the test's.
    assert f"pid {os.getpid()})" not in text.stdout
    assert as_json.returncode == 0, as_json
    document = as_json.json()
    assert document["ok"] is True
    assert statuses(document["checks"]) == dict.fromkeys(ALL_CHECKS, "PASS")


# --- SPIRE ---------------------------------------------------------------------------------

async def test_no_socket_fails_and_says_where_spire_must_listen(work: Path) -> None:
    healthy_proc(work / "proc")
    results = by_name(await run_checks(options(work)))
    socket_check = results["spire-admin-socket"]
    assert socket_check.status is Status.FAIL
    assert socket_check.detail == f"{work / 'admin.sock'} does not exist"
    assert "admin_socket_path" in socket_check.advice
    assert "--spire-admin-socket" in socket_check.advice
    assert results["authorized-delegate"].status is Status.SKIP
    assert results["clock"].status is Status.SKIP
    assert results["host-pid-namespace"].status is Status.PASS  # the other checks still run

    ran = await run_cli(*cli_args(work))
    assert ran.returncode == 1, ran
    assert f"FAIL  spire-admin-socket   {work / 'admin.sock'} does not exist" in ran.stdout
    assert "-> start the SPIRE agent with admin_socket_path" in ran.stdout
    as_json = await run_cli(*cli_args(work, "--json"))
    assert as_json.returncode == 1
    assert as_json.json()["ok"] is False
    assert statuses(as_json.json()["checks"])["spire-admin-socket"] == "FAIL"


async def test_a_stale_socket_file_or_a_plain_file_is_not_an_answer(work: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(work / "admin.sock"))  # bound, never listening: connect is refused
    stale.close()
    results = by_name(await run_checks(options(work)))
    assert results["spire-admin-socket"].status is Status.FAIL
    assert "nothing listens" in results["spire-admin-socket"].detail
    assert "SPIRE agent is not running" in results["spire-admin-socket"].advice

    (work / "admin.sock").unlink()
    (work / "admin.sock").write_text("not a socket")
    results = by_name(await run_checks(options(work)))
    assert results["spire-admin-socket"].detail.endswith("is not a socket")


async def test_a_socket_that_does_not_speak_grpc_fails(work: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, reads, never speaks
        writer.close()

    server = await asyncio.start_unix_server(silent, path=str(work / "admin.sock"))
    try:
        results = by_name(await run_checks(options(work, timeout=5.0)))
    finally:
        server.close()
        await server.wait_closed()
    check = results["spire-admin-socket"]
    assert check.status is Status.FAIL
    assert "accepts connections but gRPC calls fail" in check.detail
    assert results["authorized-delegate"].status is Status.FAIL


async def test_spire_answering_too_late_or_not_the_admin_api(work: Path) -> None:
    async with dev_spire(work) as spire:
        spire.dev.faults.set_delay("SubscribeToX509SVIDs", 5.0)
        slow = by_name(await run_checks(options(work, timeout=0.3)))
        spire.dev.faults.set_delay("SubscribeToX509SVIDs", 0)
        spire.dev.faults.inject_status(grpc.StatusCode.UNIMPLEMENTED)
        wrong = by_name(await run_checks(options(work)))
    assert slow["spire-admin-socket"].status is Status.PASS
    delegate = slow["authorized-delegate"]
    assert delegate.status is Status.FAIL
    assert "within 0.3s" in delegate.detail
    assert "minted SVID" in delegate.advice and "--timeout" in delegate.advice
    assert wrong["spire-admin-socket"].status is Status.FAIL
    assert "not the Delegated Identity API" in wrong["spire-admin-socket"].detail
    assert "Workload API socket" in wrong["spire-admin-socket"].advice


async def test_not_an_authorized_delegate_explains_authorized_delegates(work: Path) -> None:
    healthy_proc(work / "proc")
    (work / "sds").mkdir()
    async with dev_spire(work, delegates=(f"spiffe://{TD}/someone-else",)):
        results = by_name(await run_checks(options(work)))
        ran = await run_cli(*cli_args(work, "--json"))
    # The socket answers (PERMISSION_DENIED is SPIRE speaking) ...
    assert results["spire-admin-socket"].status is Status.PASS
    delegate = results["authorized-delegate"]
    assert delegate.status is Status.FAIL
    assert "PermissionDenied" not in delegate.detail
    assert "caller not configured as an authorized delegate" in delegate.detail
    assert "authorized_delegates" in delegate.advice
    assert "entry must match this process" in delegate.advice
    assert results["clock"].status is Status.SKIP
    assert ran.returncode == 1, ran
    checks = {c["name"]: c for c in ran.json()["checks"]}
    assert checks["authorized-delegate"]["status"] == "FAIL"
    assert "authorized_delegates" in checks["authorized-delegate"]["advice"]


async def test_no_entry_for_this_process_says_to_register_one(work: Path) -> None:
    other = entry(DELEGATE, "unix:uid:4242424")  # matches nobody here
    async with dev_spire(work, entries=[other]):
        results = by_name(await run_checks(options(work)))
    delegate = results["authorized-delegate"]
    assert delegate.status is Status.FAIL
    assert "no identity issued" in delegate.detail
    assert "register an entry matching this process" in delegate.advice


async def test_a_clock_outside_the_svid_validity_fails(work: Path) -> None:
    async with dev_spire(work):
        later = await run_checks(options(work), now=datetime.now(UTC) + timedelta(days=3))
        earlier = await run_checks(options(work), now=datetime.now(UTC) - timedelta(hours=1))
    ahead, behind = by_name(later)["clock"], by_name(earlier)["clock"]
    assert ahead.status is Status.FAIL
    assert "expired by this clock" in ahead.detail
    assert "NTP" in ahead.advice
    assert behind.status is Status.FAIL
    assert "behind SPIRE's" in behind.detail


def test_clock_check_allows_the_skew_and_warns_inside_it() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    svid = SvidFacts(DELEGATE, 0xABC, now + timedelta(seconds=10), now + timedelta(hours=1))
    answer = SpireAnswer(svids=(svid,))
    assert check_clock(answer, now=now, max_skew=30).status is Status.WARN
    assert check_clock(answer, now=now, max_skew=5).status is Status.FAIL
    fine = SpireAnswer(svids=(SvidFacts(DELEGATE, 1, now - timedelta(seconds=10),
                                        now + timedelta(hours=1)),))
    assert check_clock(fine, now=now, max_skew=30).status is Status.PASS
    assert check_clock(SpireAnswer(svids=()), now=now, max_skew=30).status is Status.SKIP


# --- /proc ---------------------------------------------------------------------------------

async def test_no_proc_access_fails_host_pid_and_skips_pods(work: Path) -> None:
    (work / "proc").mkdir()  # an empty /proc: nothing visible
    results = by_name(await run_checks(options(work)))
    host = results["host-pid-namespace"]
    assert host.status is Status.FAIL
    assert host.detail == f"no process is visible under {work / 'proc'}"
    assert "hostPID: true" in host.advice
    assert results["pod-cgroups"].status is Status.SKIP

    ran = await run_cli(*cli_args(work, "--proc-root", str(work / "missing")))
    assert ran.returncode == 1
    assert f"FAIL  host-pid-namespace   {work / 'missing'} is not a directory" in ran.stdout
    assert "hostPID: true" in ran.stdout


def test_hidden_pid_1_another_namespace_and_a_pod_namespace_fail(tmp_path: Path) -> None:
    hidden = FakeProcTree(tmp_path / "hidden")
    hidden.root.mkdir()
    add_process(hidden, 77, cgroup="0::/\n")  # hidepid: only our own processes
    facts = read_host_pid(hidden.root)
    result = check_host_pid(facts, scan_proc(ProcReader(hidden.root)))
    assert result.status is Status.FAIL
    assert "PID 1 is not visible" in result.detail and "hidepid" in result.detail

    foreign = FakeProcTree(tmp_path / "foreign")
    foreign.root.mkdir()
    add_process(foreign, 1, cgroup="0::/init.scope\n", comm="systemd")
    add_process(foreign, 50, cgroup="0::/\n", ns="pid:[4026532999]")
    (foreign.root / "self").symlink_to("50")
    result = check_host_pid(read_host_pid(foreign.root), scan_proc(ProcReader(foreign.root)))
    assert result.status is Status.FAIL
    assert "pid:[4026532999]" in result.detail and "pid:[4026531836]" in result.detail

    pod = FakeProcTree(tmp_path / "pod")
    pod.root.mkdir()
    add_process(pod, 1, cgroup=systemd_v1_line(POD_A, "c" * 64), comm="pause")
    (pod.root / "self").symlink_to("1")
    result = check_host_pid(read_host_pid(pod.root), scan_proc(ProcReader(pod.root)))
    assert result.status is Status.FAIL
    assert f"PID 1 (pause) is a process of pod {POD_A}" in result.detail
    assert "hostPID: true" in result.advice


async def test_kubepods_processes_the_parser_cannot_place_are_reported(work: Path) -> None:
    tree = healthy_proc(work / "proc")
    add_process(tree, 900, cgroup="0::/kubepods.slice/kubepods-burstable.slice/odd\n")
    add_process(tree, 901, cgroup=systemd_v1_line(POD_A, "a" * 64)
                + systemd_v1_line(POD_B, "b" * 64))  # two pods: ambiguous
    results = by_name(await run_checks(options(work)))
    pods = results["pod-cgroups"]
    assert pods.status is Status.WARN
    assert "2 processes in kubepods cgroups could not be tied to a pod" in pods.detail
    assert "900: no container ID" in pods.detail
    assert "901: multiple pod UIDs found" in pods.detail
    assert "cat /proc/<pid>/cgroup" in pods.advice

    only_odd = FakeProcTree(work / "odd")
    only_odd.root.mkdir()
    add_process(only_odd, 1, cgroup="0::/init.scope\n")
    add_process(only_odd, 2, cgroup="0::/kubepods.slice/x/y\n")
    results = by_name(await run_checks(options(work, proc_root=only_odd.root)))
    assert results["pod-cgroups"].status is Status.FAIL
    assert "none could be tied to a pod" in results["pod-cgroups"].detail


def test_a_pod_whose_process_cannot_be_attested_fails(tmp_path: Path) -> None:
    tree = FakeProcTree(tmp_path)
    add_process(tree, 1, cgroup="0::/init.scope\n")
    add_process(tree, 10, cgroup=systemd_v1_line(POD_A, "a" * 64))
    (tmp_path / "10" / "status").write_text("Name:\tx\n")  # no Uid line
    scan = scan_proc(ProcReader(tmp_path))
    assert scan.sample_errors and scan.sample_errors[0][0] == POD_A
    result = check_pod_cgroups(scan)
    assert result.status is Status.FAIL
    assert "1 of 1 sampled pods could not be attested" in result.detail


@pytest.mark.root
def test_a_real_pod_is_found_in_the_real_proc() -> None:
    with fake_pod(layout=None) as pod:
        proc = pod.spawn(["sleep", "30"])
        try:
            scan = scan_proc(ProcReader(), sample=10_000)
            host = check_host_pid(read_host_pid(Path("/proc")), scan)
        finally:
            proc.kill()
            proc.wait()
    assert proc.pid in scan.pods[pod.pod_uid]
    assert pod.pod_uid not in dict(scan.sample_errors)
    assert host.status is not Status.FAIL, host


def test_host_pid_facts_of_an_unreadable_root(tmp_path: Path) -> None:
    facts = read_host_pid(tmp_path / "nope")
    assert facts.root_error == f"{tmp_path / 'nope'} is not a directory"
    result = check_host_pid(facts, ProcScan(tmp_path / "nope", error=facts.root_error))
    assert result.status is Status.FAIL
    assert result.detail == facts.root_error
    assert check_pod_cgroups(ProcScan(tmp_path / "nope", error=facts.root_error)).status \
        is Status.SKIP


# --- the SDS socket directory -----------------------------------------------------------

def test_sds_socket_directory(tmp_path: Path) -> None:
    missing = check_sds_socket(tmp_path / "new" / "sds.sock")
    assert missing.status is Status.WARN
    assert "does not exist; the agent creates it" in missing.detail
    assert "hostPath" in missing.advice

    (tmp_path / "private").mkdir(mode=0o700)
    private = check_sds_socket(tmp_path / "private" / "sds.sock")
    assert private.status is Status.WARN
    assert "mode 0700" in private.detail
    assert "chmod o+x" in private.advice

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    (shared / "sds.sock").write_text("")
    blocked = check_sds_socket(shared / "sds.sock")
    assert blocked.status is Status.FAIL
    assert "is not a socket: the agent refuses to start" in blocked.detail

    (shared / "sds.sock").unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(shared / "sds.sock"))
    listener.listen(1)
    try:
        live = check_sds_socket(shared / "sds.sock")
    finally:
        listener.close()
    assert live.status is Status.PASS
    assert "an agent serves it" in live.detail
    assert "a stale socket file" in check_sds_socket(shared / "sds.sock").detail

    long = check_sds_socket(tmp_path / ("x" * 120) / "sds.sock")
    assert long.status is Status.FAIL
    assert "longer than a Unix socket path may be" in long.detail


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_sds_directory_fails(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir(mode=0o555)
    result = check_sds_socket(tmp_path / "ro" / "sds.sock")
    assert result.status is Status.FAIL
    assert "is not writable" in result.detail

"""What a running agent holds now: the /status snapshot (a pure function of the agent's
parts), its text rendering, and ``spiffe-delegate status``, which fetches and prints it.

Only public facts appear: SPIFFE IDs, serial numbers and validity times of certificates,
pod UIDs and PIDs, counters, and the agent's own warning and error log lines. Never a
certificate, key or JWT.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from agent.admin.recent import RecentError
from agent.attest.verifier import VerifierStats
from agent.cache import CacheStats, CompositeId, GroupStatus, WorkloadStatus
from agent.cache.keys import Identity, ProcessKey, WorkloadKey, WorkloadUid
from agent.config import AgentSettings, HostPort
from agent.errors import SpiffeDelegateError
from agent.sds.handler import OpenCall
from agent.sds.stats import SdsStats
from agent.spire.client import ClientStatus
from agent.spire.validation import VerifiedSvid

__all__ = [
    "STATUS_PATH",
    "StatusInputs",
    "build_status",
    "fetch_status",
    "render_status",
    "show_status",
]

STATUS_PATH = "/status"
_FORMAT_VERSION = 1
_MAX_RESPONSE = 16 * 1024 * 1024


@dataclass(frozen=True)
class StatusInputs:
    """Everything /status shows, read from the running agent's parts at one moment.

    ``now`` is wall-clock seconds (certificate times); ``monotonic`` is the clock of the
    SPIRE client and the SDS handler (``time.monotonic``)."""

    pid: int
    settings: AgentSettings
    spire: ClientStatus
    sds_listening: bool
    sds_connections: int
    sds_stats: SdsStats
    calls: Sequence[OpenCall]
    workloads: Mapping[WorkloadKey, WorkloadStatus]
    groups: Mapping[Identity, GroupStatus]
    cached: Mapping[CompositeId, Mapping[str, VerifiedSvid]]
    cache_stats: CacheStats
    verifier_stats: VerifierStats
    recent_errors: Sequence[RecentError]
    local_trust_domain: str | None
    now: float
    monotonic: float


def _iso(moment: datetime | float) -> str:
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _kind_and_key(key: CompositeId) -> tuple[str, str]:
    if isinstance(key, WorkloadUid):
        return "workload", key.pod_uid
    if isinstance(key, ProcessKey):
        return "process", f"{key.pid}@{key.start_time}"
    return "identity", ",".join(key.spiffe_ids)


def _svid(verified: VerifiedSvid, now: float) -> dict[str, Any]:
    # Only the leaf's public facts; the chain and the key stay where they are.
    leaf = x509.load_der_x509_certificate(verified.svid.cert_chain[0])
    return {
        "spiffe_id": verified.svid.spiffe_id,
        "serial": f"{leaf.serial_number:x}",
        "not_before": _iso(verified.not_before),
        "not_after": _iso(verified.not_after),
        "seconds_left": round(verified.not_after.timestamp() - now, 1),
    }


def _identity(key: CompositeId, svids: Mapping[str, VerifiedSvid],
              inputs: StatusInputs) -> dict[str, Any]:
    kind, text = _kind_and_key(key)
    entry: dict[str, Any] = {"kind": kind, "key": text, "id": str(key)}
    served = [_svid(svids[spiffe_id], inputs.now) for spiffe_id in svids]
    if isinstance(key, Identity):
        group = inputs.groups.get(key)
        members = group.members if group is not None else ()
        entry["watchers"] = sum(inputs.workloads[m].watches for m in members
                                if m in inputs.workloads)
        entry["members"] = [str(member) for member in members]
        entry["carrier"] = str(group.carrier) if group and group.carrier else None
        entry["state"] = "serving" if served else "waiting for SPIRE"
    else:
        workload = inputs.workloads.get(key)
        entry["watchers"] = workload.watches if workload is not None else 0
        attested = workload.attested if workload is not None else None
        entry["attested_pid"] = attested.pid if attested is not None else None
        source = workload.source if workload is not None else None
        if workload is None or workload.version == 0:
            entry["state"] = "attesting"
        elif isinstance(source, Identity):
            entry["state"] = "shared"
            entry["served_by"] = str(source)
        else:
            entry["state"] = "serving" if served else "no identity"
    entry["svids"] = served
    return entry


def _call(call: OpenCall, monotonic: float) -> dict[str, Any]:
    return {"method": call.method, "pid": call.pid, "uid": call.uid, "pod_uid": call.pod_uid,
            "key": str(call.key), "spiffe_ids": list(call.spiffe_ids),
            "age_seconds": round(max(monotonic - call.opened_at, 0.0), 1)}


def build_status(inputs: StatusInputs) -> dict[str, Any]:
    """The /status document (JSON-ready): agent, SPIRE, SDS, identities, counters, errors."""
    spire = inputs.spire
    since = spire.unreachable_since
    sds = inputs.sds_stats
    identities = sorted((_identity(key, svids, inputs)
                         for key, svids in inputs.cached.items()),
                        key=lambda item: (item["kind"], item["key"]))
    calls = sorted((_call(call, inputs.monotonic) for call in inputs.calls),
                   key=lambda item: (item["pid"], item["method"]))
    settings = inputs.settings
    return {
        "format": _FORMAT_VERSION,
        "time": _iso(inputs.now),
        "agent": {
            "pid": inputs.pid,
            "spire_admin_socket": str(settings.spire_admin_socket),
            "sds_socket": str(settings.sds_socket),
            "cache_key": settings.cache_key,
            "trust_domain": inputs.local_trust_domain,
            "trusted_proxies": list(settings.trusted_proxies),
        },
        "spire": {
            "socket_path": spire.socket_path,
            "connected": spire.connected,
            "reached": spire.reached,
            "unreachable_seconds": (round(max(inputs.monotonic - since, 0.0), 1)
                                    if since is not None else None),
            "reconnects": spire.reconnects,
            "active_streams": spire.active_streams,
            "last_error": spire.last_error,
            "last_error_code": spire.last_error_code,
        },
        "sds": {
            "listening": inputs.sds_listening,
            "connections": inputs.sds_connections,
            "streams_active": sds.streams_active,
            "streams_opened": sds.streams_opened,
            "delta_streams_opened": sds.delta_streams_opened,
            "fetches": sds.fetches,
            "responses": sds.responses,
            "acks": sds.acks,
            "nacks": sds.nacks,
            "last_nack_detail": sds.last_nack_detail or None,
            "refused": dict(sds.refused),
            "caller_failures": sds.caller_failures,
            "calls": calls,
        },
        "identities": identities,
        "cache": {
            "entries": len(identities),
            "rotations": inputs.cache_stats.rotations,
            "svids_rejected": dict(inputs.cache_stats.svids_rejected),
            "expiry_warnings": inputs.cache_stats.expiry_warnings,
            "unmatched": inputs.cache_stats.unmatched,
            "pid_reuse_detected": inputs.verifier_stats.pid_reuse_detected,
            "answers_discarded": inputs.verifier_stats.answers_discarded,
        },
        "recent_errors": [{"time": _iso(error.time), "level": error.level,
                           "logger": error.logger, "message": error.message}
                          for error in inputs.recent_errors],
    }


# --- rendering ----------------------------------------------------------------------------

def _left(seconds: float) -> str:
    if seconds <= 0:
        return "expired"
    whole = int(seconds)
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    if whole >= 60:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{seconds:.1f}s"


def _short_serial(serial: str) -> str:
    return serial if len(serial) <= 14 else f"{serial[:6]}..{serial[-4:]}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows,
                                                                         strict=False)]
    lines = []
    for row in (header, *rows):
        lines.append("  " + "  ".join(str(cell).ljust(width)
                                      for cell, width in zip(row, widths, strict=True)).rstrip())
    return lines


def _spire_line(spire: Mapping[str, Any]) -> str:
    if spire.get("connected"):
        state = "connected"
    elif spire.get("unreachable_seconds") is not None:
        state = f"unreachable for {spire['unreachable_seconds']:g}s"
    elif spire.get("reached"):
        state = "not connected (SPIRE answered with an error)"
    else:
        state = "never reached"
    return (f"SPIRE    {spire.get('socket_path')}: {state}; {spire.get('active_streams', 0)} "
            f"streams, {spire.get('reconnects', 0)} reconnects; last error: "
            f"{spire.get('last_error') or 'none'}")


def render_status(status: Mapping[str, Any]) -> str:
    """A compact text view of a /status document (as :func:`build_status` makes it)."""
    agent = status.get("agent", {})
    sds = status.get("sds", {})
    lines = [f"agent    pid {agent.get('pid')}, trust domain "
             f"{agent.get('trust_domain') or 'unknown'}, cache key {agent.get('cache_key')}, "
             f"at {status.get('time')}",
             _spire_line(status.get("spire", {})),
             f"SDS      {agent.get('sds_socket')}: "
             f"{'listening' if sds.get('listening') else 'NOT listening'}; "
             f"{sds.get('streams_active', 0)} streams, {sds.get('connections', 0)} connections, "
             f"{sds.get('acks', 0)} ACKs, {sds.get('nacks', 0)} NACKs"]
    if sds.get("last_nack_detail"):
        lines.append(f"         last NACK: {sds['last_nack_detail']}")
    calls = sds.get("calls", [])
    lines.append("")
    lines.append(f"SDS streams ({len(calls)})")
    if calls:
        lines.extend(_table(
            ("method", "caller", "served as", "SPIFFE ID", "open"),
            [(call["method"],
              f"pid {call['pid']} " + (f"(pod {call['pod_uid']})" if call.get("pod_uid")
                                       else f"(uid {call['uid']}, no pod)"),
              call["key"], ", ".join(call["spiffe_ids"]) or "-",
              _left(call["age_seconds"]) if call["age_seconds"] > 0 else "0s")
             for call in calls]))
    identities = status.get("identities", [])
    lines.append("")
    lines.append(f"identities ({len(identities)})")
    if identities:
        rows = []
        for item in identities:
            svids = item.get("svids") or [None]
            for svid in svids:
                rows.append((item["kind"], item["key"],
                             svid["spiffe_id"] if svid else f"({item.get('state', '-')})",
                             _short_serial(svid["serial"]) if svid else "-",
                             _left(svid["seconds_left"]) if svid else "-",
                             str(item.get("watchers", 0))))
        lines.extend(_table(("kind", "key", "SPIFFE ID", "serial", "left", "watchers"), rows))
    cache = status.get("cache", {})
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(cache.get("svids_rejected", {}).items()))
    lines.append("")
    lines.append(f"cache    {cache.get('rotations', 0)} rotations, "
                 f"{cache.get('pid_reuse_detected', 0)} PID reuses detected, "
                 f"{cache.get('expiry_warnings', 0)} expiry warnings, "
                 f"rejected: {rejected or 'none'}")
    errors = status.get("recent_errors", [])
    lines.append("")
    lines.append(f"recent errors ({len(errors)})")
    for error in errors:
        lines.append(f"  {error['time']} {error['level']} {error['logger']}: {error['message']}")
    return "\n".join(lines) + "\n"


# --- the command --------------------------------------------------------------------------

def _connect_host(address: HostPort) -> str:
    """Where to reach an agent listening on ``address`` from this host."""
    if address.host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if address.host == "::":
        return "::1"
    return address.host


async def fetch_status(address: HostPort, *, within: float) -> dict[str, Any]:
    """GET /status from the agent's health listener; SpiffeDelegateError on any failure."""
    host = _connect_host(address)
    url = f"http://{HostPort(host, address.port)}{STATUS_PATH}"
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, address.port)
            try:
                writer.write(f"GET {STATUS_PATH} HTTP/1.1\r\nHost: {HostPort(host, address.port)}"
                             "\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
                             .encode())
                await writer.drain()
                raw = await reader.read(_MAX_RESPONSE)
            finally:
                writer.close()
    except TimeoutError:
        raise SpiffeDelegateError(f"no answer from {url} within {within:g}s",
                                  "is the agent stuck? try its /healthz") from None
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise SpiffeDelegateError(
            f"cannot reach the agent at {url}: {why}",
            "is spiffe-delegate run running here, and is this its --health-address?"
        ) from None
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise SpiffeDelegateError(f"{url} did not answer in HTTP",
                                  "is this the agent's --health-address?")
    if parts[1] == "404":
        raise SpiffeDelegateError(f"{url}: 404 Not Found",
                                  "this agent does not serve /status; is it an older version?")
    if parts[1] != "200":
        raise SpiffeDelegateError(f"{url}: {status_line}", "see the agent's log")
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise SpiffeDelegateError(f"{url} answered something that is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise SpiffeDelegateError(f"{url} answered JSON that is not an object")
    return document


async def show_status(address: HostPort | None, *, within: float, as_json: bool) -> int:
    """``spiffe-delegate status``: prints the running agent's /status; 0 when it answered,
    else 1 with one line on stderr saying why."""
    try:
        if address is None or address.port == 0:
            raise SpiffeDelegateError(
                "--health-address is " + ("off" if address is None else f"{address} (port 0)"),
                "give the address the running agent's health endpoint listens on, e.g. "
                "127.0.0.1:8086 (its log says: serving /healthz and /readyz on ...)")
        document = await fetch_status(address, within=within)
    except SpiffeDelegateError as exc:
        print(f"spiffe-delegate status: error: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(document, indent=2))
    else:
        print(render_status(document), end="")
    return 0

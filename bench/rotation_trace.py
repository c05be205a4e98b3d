"""Where a rotation's time goes: stage timestamps for the rotation benchmark.

With ``BENCH_ROTATION_TRACE=FILE`` the rotation benchmark runs the agent with
:data:`AGENT_MARKS` (wrappers that print ``MARK <stage> <CLOCK_MONOTONIC>`` to its log at
each stage of a push), has the Envoys log at debug level with microsecond wall-clock
timestamps, and writes :func:`timeline` to FILE: for each stage, the p50/p90 of its first
occurrence after each issue. Nothing in the agent changes; the wrappers add a little time.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from pathlib import Path

from bench.harness import percentile

# Python run in the agent before it starts: marks the stages of one push.
AGENT_MARKS = '''
import sys, time
def _mark(what):
    sys.stderr.write(f"MARK {what} {time.monotonic():.6f}\\n")
    sys.stderr.flush()

from agent.spire import convert as _convert
_from_proto = _convert.x509_svid_update_from_proto
def _received(message):
    _mark("1-agent-received-from-spire")
    return _from_proto(message)
_convert.x509_svid_update_from_proto = _received

from agent.attest import verifier as _verifier
_pin_verify = _verifier._Pin.verify
def _pin_verified(self):
    result = _pin_verify(self)
    _mark("2-agent-caller-rechecked")
    return result
_verifier._Pin.verify = _pin_verified

from agent.spire import validation as _validation
_validate = _validation.validate_x509_svid
def _validated(*args, **kwargs):
    _mark("3-agent-validate-start")
    result = _validate(*args, **kwargs)
    _mark("4-agent-validate-end")
    return result
_validation.validate_x509_svid = _validated

from agent.cache import watch as _watch
_publish = _watch.StatePublisher.publish
def _published(self, *args, **kwargs):
    result = _publish(self, *args, **kwargs)
    _mark("5-agent-published")
    return result
_watch.StatePublisher.publish = _published

from agent.sds import handler as _handler
_stream = _handler.SdsHandler.StreamSecrets
async def _streaming(self, request_iterator, context):
    async for response in _stream(self, request_iterator, context):
        _mark("6-agent-sds-response-yielded")
        yield response
_handler.SdsHandler.StreamSecrets = _streaming

from agent.uds import relay as _relay
async def _pump(source, sink):
    while data := await source.read(_relay._CHUNK):
        if len(data) >= 800:
            _mark("7-agent-relay-read-push")
        sink.write(data)
        await sink.drain()
_relay._pump = _pump
'''

ENVOY_LOG_FORMAT = "[%Y-%m-%d %T.%f][%n][%l] %v"
_STAMP = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\]")


def _envoy_times(log: Path, pattern: str, wall_minus_mono: float) -> list[float]:
    """Monotonic times of the log lines matching ``pattern``."""
    out: list[float] = []
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        if re.search(pattern, line) and (m := _STAMP.match(line)):
            wall = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(
                tzinfo=dt.UTC).timestamp()
            out.append(wall - wall_minus_mono)
    return out


def _marks(log: Path) -> dict[str, list[float]]:
    marks: dict[str, list[float]] = {}
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return marks
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "MARK":
            marks.setdefault(parts[1], []).append(float(parts[2]))
    return marks


def _helper(out: Path, column: int) -> list[float]:
    times: list[float] = []
    try:
        lines = out.read_text().splitlines()
    except OSError:
        return times
    for line in lines:
        parts = line.split()
        if len(parts) == 4 and parts[0] == "written":
            times.append(float(parts[column]))
    return sorted(times)


def timeline(work: Path, issues: Sequence[tuple[float, float]], latencies: dict[str, list[float]],
             modes: Sequence[str]) -> str:
    """The stage table. ``issues``: (wall, monotonic) at each issue; ``latencies``: the
    measured issue -> ``/certs`` times per path (ms)."""
    offset = percentile([wall - mono for wall, mono in issues], 50)
    stages: dict[str, list[float]] = {f"sds:{k}": v for k, v in _marks(work / "agent.log").items()}
    stages["sds:8-envoy-received-push"] = _envoy_times(
        work / "envoy-sds" / "envoy.log", r"Received gRPC message for .*Secret", offset)
    for mode in modes:
        stages[f"{mode}:1-helper-received-from-spire"] = _helper(work / f"helper-{mode}.out", 3)
        stages[f"{mode}:2-helper-files-written"] = _helper(work / f"helper-{mode}.out", 2)
        stages[f"{mode}:3-envoy-notified"] = _envoy_times(
            work / f"envoy-{mode}" / "envoy.log", r"notification: fd", offset)
    lines = [f"{'stage (time since issue)':48s} {'n':>4s} {'p50 ms':>8s} {'p90 ms':>8s}"]
    for name in sorted(stages):
        times = sorted(stages[name])
        after = []
        for _, mono in issues:
            first = next((t for t in times if t >= mono), None)
            if first is not None and first - mono < 1.0:
                after.append((first - mono) * 1000)
        if after:
            lines.append(f"{name:48s} {len(after):4d} {percentile(after, 50):8.2f} "
                         f"{percentile(after, 90):8.2f}")
    for path, samples in latencies.items():
        if samples:
            lines.append(f"{path + ':9-envoy-/certs-shows-it':48s} {len(samples):4d} "
                         f"{percentile(samples, 50):8.2f} {percentile(samples, 90):8.2f}")
    return "\n".join(lines) + "\n"


def write_timeline(to: Path, work: Path, issues: Sequence[tuple[float, float]],
                   latencies: dict[str, list[float]], modes: Sequence[str]) -> None:
    to.write_text(timeline(work, issues, latencies, modes))

"""``spiffe-delegate demo``: the whole registry chain, live, in a temporary directory.

Starts dev-spire, the agent, the registry and three Envoys (:mod:`agent.demo.chain`), pushes
an image as CI, checks the registry's policy (a push through the node proxy is refused),
then pulls through the node proxy in a loop while SVIDs rotate every few seconds, showing
each Envoy's SPIFFE ID, serial and time left, the rotations, and the pull counts. Ctrl-C (or
``--duration``) stops it: every process is ended by its PID and the directory removed.
With ``--duration`` the exit status says whether it worked: 0 when at least one rotation
reached an Envoy and no pull failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from agent.demo.chain import REPOSITORY, TAG, Chain, ChainSettings
from agent.demo.errors import PushFailed
from agent.demo.skopeo import push_image
from agent.demo.traffic import PullLoop, Rotation, RotationWatch
from agent.demo.view import IdentityRow, Screen, render_table, short_serial

__all__ = ["DemoOptions", "run_demo"]


@dataclass(frozen=True)
class DemoOptions:
    duration: float | None = None
    svid_ttl: float = 6.0
    ipv6: bool = False
    attestation: str = "auto"
    workdir: Path | None = None
    interactive: bool | None = None  # None: when stdout is a terminal and no duration


def _say(line: str) -> None:
    print(f"[demo] {line}", flush=True)


async def run_demo(options: DemoOptions, stop: asyncio.Event) -> int:
    made_workdir = options.workdir is None
    workdir = (Path(tempfile.mkdtemp(prefix="spiffe-delegate-demo.")) if made_workdir
               else options.workdir)
    assert workdir is not None
    chain = Chain(ChainSettings(workdir=workdir, family="ipv6" if options.ipv6 else "ipv4",
                                svid_ttl=options.svid_ttl,
                                attestation=options.attestation),  # type: ignore[arg-type]
                  on_progress=_say)
    try:
        return await _run(chain, options, stop)
    finally:
        _say("stopping: ending every process by its PID")
        await chain.stop()
        if made_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
            _say(f"removed {workdir}")


async def _run(chain: Chain, options: DemoOptions, stop: asyncio.Event) -> int:
    starting = asyncio.create_task(chain.start())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopper], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return 130
    stopper.cancel()
    starting.result()  # raises what failed
    _say(f"attestation: {chain.attestation}")
    _say(f"pushed {REPOSITORY}:{TAG} as CI: ok")
    assert chain.image is not None
    try:
        await push_image(chain.image, chain.registry_address("node-proxy"), "demo/forbidden")
        _say("policy check FAILED: a push through the node proxy was accepted")
        policy_ok = False
    except PushFailed as exc:
        policy_ok = exc.denied
        _say("policy check: push through the node proxy refused (403), as it should be"
             if exc.denied else f"policy check FAILED: unexpected push error: {exc.message}")

    interactive = (options.interactive if options.interactive is not None
                   else sys.stdout.isatty() and options.duration is None)
    screen = Screen(interactive=interactive)
    events: list[str] = []
    titles = {name: role.title for name, role in chain.roles.items()}

    def rotated(rotation: Rotation) -> None:
        line = (f"{time.strftime('%H:%M:%S')} rotated {titles[rotation.role]}: serial "
                f"{short_serial(rotation.old)} -> {short_serial(rotation.new)}")
        events.append(line)
        del events[:-8]
        screen.event(line)

    watch = RotationWatch({name: functools.partial(chain.held, name) for name in chain.roles},
                          on_rotation=rotated)
    pulls = PullLoop(chain.proxy_url, REPOSITORY, TAG, pause=0.05)
    header = (f"spiffe-delegate demo: SVIDs rotate every ~{options.svid_ttl / 2:g}s "
              f"({'IPv6' if options.ipv6 else 'IPv4'} loopback; "
              f"{'Ctrl-C stops' if options.duration is None else 'non-interactive'})")
    _say(f"pulling {REPOSITORY}:{TAG} through the node proxy at {chain.proxy_url} in a loop")
    await watch.poll_once()

    def rows() -> list[IdentityRow]:
        now = time.time()
        return [IdentityRow(role.title, role.spiffe_id,
                            watch.held[name].serial if name in watch.held else None,
                            watch.held[name].expires_at - now if name in watch.held else None,
                            sum(1 for r in watch.rotations if r.role == name))
                for name, role in chain.roles.items()]

    if not interactive:
        for line in render_table(rows(), ok=0, failed=0, elapsed=0.0, header=header,
                                 events=())[3:-2]:
            print(line, flush=True)
    tasks = [asyncio.create_task(watch.run()), asyncio.create_task(pulls.run())]
    started = time.monotonic()
    try:
        while not stop.is_set():
            elapsed = time.monotonic() - started
            if options.duration is not None and elapsed >= options.duration:
                break
            for name in ("agent", "dev-spire", "registry", *chain.roles):
                chain.supervisor.check(name)
            counts = pulls.counts
            status = (f"{elapsed:5.1f}s: {len(watch.rotations)} rotations, pulls "
                      f"{counts.ok} ok / {counts.failed} failed")
            screen.frame(render_table(rows(), ok=counts.ok, failed=counts.failed,
                                      elapsed=elapsed, header=header, events=events), status)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that races the event being set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    counts = pulls.counts
    for failure in counts.failures[:5]:
        _say(f"failed pull: {failure}")
    per_role = ", ".join(f"{titles[name]} {len(serials)} serials"
                         for name, serials in watch.seen.items())
    _say(f"summary: {len(watch.rotations)} rotations seen ({per_role}); "
         f"pulls {counts.ok} ok, {counts.failed} failed")
    if options.duration is None:
        return 0
    worked = bool(watch.rotations) and counts.failed == 0 and counts.ok > 0 and policy_ok
    _say("result: OK" if worked else "result: FAILED")
    return 0 if worked else 1

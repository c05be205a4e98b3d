"""The SVID cache against a scripted source and a manual clock: no SPIRE, no sleeps."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import pytest

from agent.cache import (
    CacheSettings,
    CacheState,
    Identity,
    KeyMode,
    SvidCache,
    Watch,
    WatchClosed,
)
from agent.clock import ManualClock
from tests.spire.pki import NOW, Ca
from tests.waiting import eventually

from .conftest import POD_A, POD_B, POD_C, FakeSource, pod

MINUTE = dt.timedelta(minutes=1)


async def first_state(watch: Watch) -> CacheState:
    return await asyncio.wait_for(watch.next(), 5)


async def still_waiting(watch: Watch, after: int) -> None:
    """Asserts that ``next(after)`` has nothing to return (checked without real time)."""
    pending = asyncio.ensure_future(watch.next(after))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not pending.done(), f"unexpected state {pending.result()}"
    pending.cancel()


async def test_latest_value_not_a_backlog(cache: SvidCache, source: FakeSource,
                                          ca: Ca) -> None:
    watch = cache.watch(pod())
    await eventually(lambda: bool(source.streams[pod()]))
    stream = source.last(pod())
    svids = [ca.svid("/web") for _ in range(4)]
    stream.push(svids[0])
    first = await first_state(watch)
    assert first.svids == (svids[0],)
    for svid in svids[1:]:  # three rotations while nobody reads
        stream.push(svid)
    await eventually(lambda: stream.queue.empty() and watch.latest() is not None
                     and watch.latest().svids == (svids[3],))  # type: ignore[union-attr]
    newest = await asyncio.wait_for(watch.next(first.version), 5)
    assert newest.svids == (svids[3],), "the reader must get the newest state, not the next"
    assert newest.version > first.version
    await still_waiting(watch, newest.version)
    # The same answer again (SPIRE re-sends on any bundle change) is no new version.
    stream.push(svids[3])
    await eventually(lambda: stream.queue.empty())
    await still_waiting(watch, newest.version)
    assert newest.bundles == {"spiffe://example.org": (ca.der,)}


async def test_refcount_and_grace_period(cache: SvidCache, source: FakeSource,
                                         clock: ManualClock, ca: Ca) -> None:
    one, two = cache.watch(pod()), cache.watch(pod())
    await eventually(lambda: bool(source.streams[pod()]))
    assert len(source.streams[pod()]) == 1, "two watches of one pod share one subscription"
    source.last(pod()).push(ca.svid("/web"))
    assert (await first_state(one)).svids == (await first_state(two)).svids
    assert cache.workloads()[pod()].watches == 2

    one.close()
    two.close()
    with pytest.raises(WatchClosed):
        await two.next()
    await eventually(lambda: clock.sleepers >= 1, what="the grace timer")
    clock.advance(29)
    await asyncio.sleep(0)
    assert not source.last(pod()).closed, "still within the grace period"

    # A watch within the grace period gets the warm entry: no new subscription.
    three = cache.watch(pod())
    assert (await first_state(three)).svids
    three.close()
    clock.advance(29)  # the grace period starts again from the last close
    await asyncio.sleep(0)
    assert not source.last(pod()).closed
    assert len(source.streams[pod()]) == 1
    await eventually(lambda: clock.next_deadline is not None and clock.next_deadline <= 30)
    clock.advance(30)
    await eventually(lambda: source.last(pod()).closed, what="the subscription to close")
    assert pod() not in cache.workloads()
    assert cache.stats.entries_closed == 1

    four = cache.watch(pod())
    await eventually(lambda: len(source.streams[pod()]) == 2)
    four.close()


async def test_expiry_warning_at_80_percent(cache: SvidCache, source: FakeSource,
                                            clock: ManualClock, ca: Ca,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "spiffe_delegate.cache")
    stuck, rotated = cache.watch(pod(POD_A)), cache.watch(pod(POD_B))
    await eventually(lambda: bool(source.streams[pod(POD_A)] and source.streams[pod(POD_B)]))
    life = 100 * MINUTE
    source.last(pod(POD_A)).push(ca.svid("/stuck", not_before=NOW, not_after=NOW + life))
    source.last(pod(POD_B)).push(ca.svid("/rotated", not_before=NOW, not_after=NOW + life))
    await first_state(stuck)
    state_b = await first_state(rotated)

    clock.advance(50 * 60)  # SPIRE rotates B at half its life, as it should
    renewed = ca.svid("/rotated", not_before=clock.now(), not_after=clock.now() + life)
    source.last(pod(POD_B)).push(renewed)
    assert (await asyncio.wait_for(rotated.next(state_b.version), 5)).svids == (renewed,)

    clock.advance(29 * 60)  # 79% of A's life
    await asyncio.sleep(0)
    assert cache.stats.expiry_warnings == 0
    clock.advance(2 * 60)  # 81%
    await eventually(lambda: cache.stats.expiry_warnings == 1, what="the expiry warning")
    warnings = [r for r in caplog.records if "80% of its lifetime" in r.getMessage()]
    assert len(warnings) == 1 and "spiffe://example.org/stuck" in warnings[0].getMessage()
    assert str(pod(POD_A)) in warnings[0].getMessage()

    clock.advance(10 * 60)  # no second warning for the same certificate
    await asyncio.sleep(0)
    assert cache.stats.expiry_warnings == 1

    before = stuck.latest()
    assert before is not None and before.svids
    clock.advance(10 * 60 + 1)  # past not_after: it is no longer served
    expired = await asyncio.wait_for(stuck.next(before.version), 5)
    assert expired.empty
    assert rotated.latest() is not None and rotated.latest().svids == (renewed,)  # type: ignore[union-attr]
    assert cache.stats.expiry_warnings == 1


async def test_invalid_svid_is_rejected_and_the_old_one_kept(
        cache: SvidCache, source: FakeSource, ca: Ca) -> None:
    watch = cache.watch(pod())
    await eventually(lambda: bool(source.streams[pod()]))
    stream = source.last(pod())
    good = ca.svid("/web")
    stream.push(good)
    state = await first_state(watch)
    assert state.svids == (good,)

    stream.push(ca.svid("/web", wrong_key=True))
    stream.push(ca.svid("/web", uris=["spiffe://example.org/other"]))
    stranger = Ca.root("example.org", name="stranger").svid("/web")
    stream.push(stranger)
    await eventually(lambda: stream.queue.empty()
                     and sum(cache.stats.svids_rejected.values()) == 3)
    assert cache.stats.svids_rejected == {"key_mismatch": 1, "wrong_san": 1,
                                          "untrusted_chain": 1}
    await still_waiting(watch, state.version)
    assert watch.latest() is state, "the rejected SVIDs never replaced the good one"

    better = ca.svid("/web")
    stream.push(better)
    assert (await asyncio.wait_for(watch.next(state.version), 5)).svids == (better,)


async def test_svids_wait_for_their_bundle_and_federated_bundles_ride_along(
        source: FakeSource, clock: ManualClock, ca: Ca) -> None:
    source.bundle_queue.get_nowait()  # no bundles yet
    partner = Ca.root("partner.org")
    async with SvidCache(source, clock=clock) as cache:
        watch = cache.watch(pod())
        await eventually(lambda: bool(source.streams[pod()]))
        source.last(pod()).push(ca.svid("/web"), federates_with=("spiffe://partner.org",))
        await eventually(lambda: source.last(pod()).queue.empty())
        await still_waiting(watch, 0)  # held back: no bundle to verify against yet
        source.bundle_queue.put_nowait(ca.bundles(partner))
        state = await first_state(watch)
        assert state.spiffe_ids == ("spiffe://example.org/web",)
        assert state.bundles == {"spiffe://example.org": (ca.der,)}
        assert state.federated_bundles == {"spiffe://partner.org": (partner.der,)}
        assert state.federates_with == ("spiffe://partner.org",)
        assert source.bundle_streams == 1


async def test_unmatched_workload_gets_an_empty_state_and_one_log_line(
        cache: SvidCache, source: FakeSource, ca: Ca,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "spiffe_delegate.cache")
    watch = cache.watch(pod())
    await eventually(lambda: bool(source.streams[pod()]))
    stream = source.last(pod())
    for _ in range(5):
        stream.push()
    state = await first_state(watch)
    assert state.empty
    await eventually(lambda: stream.queue.empty())
    await still_waiting(watch, state.version)
    lines = [r for r in caplog.records if "matched no registration entry" in r.getMessage()]
    assert len(lines) == 1
    assert POD_A in lines[0].getMessage() and "PID 4242" in lines[0].getMessage()

    stream.push(ca.svid("/web"))  # an entry appears
    assert (await asyncio.wait_for(watch.next(state.version), 5)).svids


async def test_an_unmatched_workload_carries_the_learned_local_trust_domain(
        cache: SvidCache, source: FakeSource, ca: Ca) -> None:
    """No --trust-domain: the state of a workload without SVIDs names no trust domain and
    no bundle until the agent learns its own (from its SVID); then it carries both."""
    watch = cache.watch(pod())
    await eventually(lambda: bool(source.streams[pod()]))
    source.last(pod()).push()
    state = await first_state(watch)
    assert state.empty and state.trust_domain == "" and not state.bundles

    cache.learn_trust_domain("example.org")
    learned = await asyncio.wait_for(watch.next(state.version), 5)
    assert learned.trust_domain == "example.org"
    assert learned.bundles == {"spiffe://example.org": (ca.der,)}
    cache.learn_trust_domain("example.org")  # nothing new
    await still_waiting(watch, learned.version)

    source.last(pod()).push(ca.svid("/web"))
    issued = await asyncio.wait_for(watch.next(learned.version), 5)
    assert issued.trust_domain == "example.org" and issued.svids


async def test_a_configured_trust_domain_is_not_replaced_by_a_learned_one(
        source: FakeSource, clock: ManualClock) -> None:
    settings = CacheSettings(trust_domain="example.org")
    async with SvidCache(source, clock=clock, settings=settings) as cache:
        cache.learn_trust_domain("elsewhere.test")
        assert cache.local_trust_domain == "example.org"


async def test_cache_close_ends_watches(source: FakeSource, clock: ManualClock) -> None:
    cache = SvidCache(source, clock=clock)
    watch = cache.watch(pod())
    pending = asyncio.ensure_future(watch.next())
    await eventually(lambda: bool(source.streams[pod()]))
    await cache.close()
    with pytest.raises(WatchClosed):
        await asyncio.wait_for(pending, 5)
    assert all(stream.closed for stream in source.streams[pod()])


async def test_identity_mode_with_a_scripted_source(source: FakeSource, clock: ManualClock,
                                                    ca: Ca) -> None:
    """Three pods with one SPIFFE ID: one stream stays open; its carrier hands over only
    once the new carrier has delivered, and no watcher ever sees an empty state."""
    settings = CacheSettings(key_mode=KeyMode.IDENTITY, grace_period=30.0)
    async with SvidCache(source, clock=clock, settings=settings) as cache:
        await cache.wait_for_bundles()
        pods = [pod(POD_A), pod(POD_B), pod(POD_C)]
        source.live.update(pods)
        watches = [cache.watch(key) for key in pods]
        await eventually(lambda: all(source.streams[key] for key in pods))
        svid = ca.svid("/shared")
        for key in pods:
            source.last(key).push(svid)  # each pod's own attestation
        states = [await first_state(w) for w in watches]
        identity = Identity.of("spiffe://example.org/shared")
        assert all(s.svids == (svid,) and s.source == identity for s in states)
        await eventually(lambda: len(source.open_streams()) == 1, what="one open stream")
        carrier = cache.groups()[identity].carrier
        assert carrier is not None
        assert set(cache.groups()[identity].members) == set(pods)

        # The carrier's pod loses its last process: a candidate starts, nothing changes yet.
        (old,) = source.open_streams()
        assert old.key == carrier
        source.live.discard(carrier)
        old.orphaned.set()
        await eventually(lambda: len(source.open_streams()) == 2, what="a candidate")
        candidate = next(s for s in source.open_streams() if s is not old)
        assert cache.groups()[identity].carrier == carrier, "no switch before it delivers"
        rotated = ca.svid("/shared")
        candidate.push(rotated)
        await eventually(lambda: cache.groups()[identity].carrier == candidate.key)
        await eventually(lambda: old.closed)
        assert cache.stats.carrier_handovers == 1
        for watch, state in zip(watches, states, strict=True):
            newer = await asyncio.wait_for(watch.next(state.version), 5)
            assert newer.svids == (rotated,)
        assert len(source.open_streams()) == 1

        # A member the new carrier no longer speaks for: it drifts, members re-attest.
        await eventually(lambda: clock.sleepers >= 3)
        before = {key: len(source.streams[key]) for key in pods}
        candidate.push(ca.svid("/other"))
        await eventually(lambda: all(len(source.streams[k]) > before[k] for k in pods),
                         what="every member attested again")
        for watch in watches:
            assert watch.latest() is not None and watch.latest().svids == (rotated,)  # type: ignore[union-attr]
        for w in watches:
            w.close()

"""Reliability suite, area 1: SPIRE faults, injected with dev-spire, against the real agent
with a real Envoy attached where "keeps serving / never pushes a bad one" is the promise.

Every test checks the logging rule too: each cause is logged once per episode (however many
retries or re-sends it takes), and again in the next episode."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

import grpc
import pytest

from agent.devspire import DevSpire
from agent.devspire.faults import DEFAULT_OVERSIZE
from tests.envoyproc import envoy_factory as envoy_factory
from tests.envoyproc import sds_bootstrap
from tests.reliability.spire_faults_support import (
    ID_A,
    PARTNER,
    SpireProcess,
    attach_envoy,
    ca_serials,
    envoy_entry,
    leaf_serials,
    local_ca_serials,
    messages,
    rejected_by_envoy,
    restart_in_process,
    running,
)
from tests.sds_server.clients import fetch, secrets_of
from tests.sds_server.conftest import UID_A, AsUser, make_stack, needs_root
from tests.sds_server.conftest import as_user as as_user
from tests.sds_server.conftest import work_dir as work_dir
from tests.waiting import eventually

SPIRE_LOG = "spiffe_delegate.spire"


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="spiffe_delegate")


# --- bad SVIDs --------------------------------------------------------------------------

BAD_SVIDS = {  # dev-spire corruption mode -> the reason the agent rejects it for
    "malformed": "malformed",
    "expired": "expired",
    "wrong_trust_domain": "wrong_trust_domain",
    "key_mismatch": "key_mismatch",
    "wrong_san": "wrong_san",
}


@pytest.mark.scenario("spire.svid-malformed", "spire.svid-expired",
                      "spire.svid-wrong-trust-domain", "spire.svid-key-mismatch",
                      "spire.svid-wrong-san")
async def test_bad_svids_are_never_pushed_and_the_previous_one_stays(
        work_dir: Path, as_user: AsUser, caplog: pytest.LogCaptureFixture,
        record_property: pytest.RecordProperty) -> None:
    """For each kind of broken SVID: SPIRE rotates to it (and re-sends it on a reconnect);
    Envoy keeps its certificate, nothing is pushed, it is counted and logged once; the next
    good rotation reaches Envoy. The last kind is injected twice: a new episode logs again."""
    async with running(work_dir, [envoy_entry()]) as stack:
        assert stack.agent is not None
        envoy = await attach_envoy(stack, as_user)
        stats = stack.agent.cache.stats
        spire_stats = stack.spire.stats
        episodes = [*BAD_SVIDS.items(), ("malformed", "malformed")]
        for mode, reason in episodes:
            held = await leaf_serials(envoy)
            pushes = stack.sds.stats.responses
            before = stats.svids_rejected[reason]
            logged = len(messages(caplog, f"reason={reason}"))

            stack.spire.faults.corrupt_x509(mode, count=-1)
            await stack.spire.rotate_now(ID_A)
            await eventually(lambda r=reason, b=before: stats.svids_rejected[r] == b + 1,
                             what=f"the agent to reject the {mode} SVID")
            # Reconnects: SPIRE now sends the agent's own SVID broken too (one more
            # rejection), then re-sends both broken SVIDs, byte for byte (retries).
            for retry in range(2):
                opened = spire_stats.streams_opened["SubscribeToX509SVIDs"]
                stack.spire.faults.drop_streams_now()
                await eventually(
                    lambda o=opened: spire_stats.streams_opened["SubscribeToX509SVIDs"] >= o + 2,
                    what="the SVID streams to reconnect")
                await eventually(lambda r=reason, b=before: stats.svids_rejected[r] == b + 2,
                                 what=f"the agent to reject its own {mode} SVID")
                if retry:
                    await asyncio.sleep(0.2)  # time for a re-sent SVID to be (wrongly) counted
            assert stats.svids_rejected[reason] == before + 2, f"{mode}: counted per re-send"
            new = messages(caplog, f"reason={reason}")[logged:]
            assert len(new) == 2, f"{mode}: not once per SVID in the episode: {new}"
            assert sum("/envoy/a" in line for line in new) == 1, new
            assert stack.sds.stats.responses == pushes, f"{mode}: something was pushed"
            assert await leaf_serials(envoy) == held, f"{mode}: Envoy lost its certificate"

            stack.spire.faults.corrupt_x509(mode, count=0)
            await stack.spire.rotate_now()
            await envoy.await_until(lambda e, h=held: bool(e.certs().leaves()) and {
                c.serial for c in e.certs().leaves()}.isdisjoint(h),
                what=f"the good SVID after {mode}")
        assert await rejected_by_envoy(envoy, "default", "ROOTCA") == 0
        assert stack.sds.stats.nacks == 0
        record_property("svids_rejected", dict(stats.svids_rejected))
        # The agent's own SVIDs count in the metric too.
        metrics = stack.agent.metrics_registry
        total = sum(metrics.get_sample_value("spiffe_delegate_svids_rejected_total",
                                             {"reason": r}) or 0 for r in set(BAD_SVIDS.values()))
        assert total == 2 * len(episodes)


@pytest.mark.scenario("spire.svid-not-yet-valid")
async def test_a_not_yet_valid_svid_is_held_back_and_served_when_it_becomes_valid(
        work_dir: Path, as_user: AsUser, caplog: pytest.LogCaptureFixture,
        record_property: pytest.RecordProperty) -> None:
    """The SVID becomes valid 3 s after SPIRE sends it: meanwhile Envoy keeps the previous
    one; then the agent serves it on its own timer, with no further message from SPIRE."""
    async with running(work_dir, [envoy_entry()]) as stack:
        assert stack.agent is not None
        envoy = await attach_envoy(stack, as_user)
        held = await leaf_serials(envoy)
        stats = stack.agent.cache.stats
        sent = stack.spire.stats.responses_sent

        stack.spire.faults.corrupt_x509("not_yet_valid", valid_in=3)
        await stack.spire.rotate_now(ID_A)
        rotated = time.time()
        await eventually(lambda: stats.svids_rejected["not_yet_valid"] == 1,
                         what="the SVID to be held back")
        messages_then = sent["SubscribeToX509SVIDs"]
        assert await leaf_serials(envoy) == held
        await envoy.await_until(lambda e: bool(e.certs().leaves()) and {
            c.serial for c in e.certs().leaves()}.isdisjoint(held), timeout=15,
            what="the held-back SVID once it is valid")
        released = time.time() - rotated
        assert sent["SubscribeToX509SVIDs"] == messages_then, "released by a SPIRE message"
        assert released >= 1.5, "served before it was valid"  # whole-second notBefore
        assert len(messages(caplog, "reason=not_yet_valid")) == 1
        assert messages(caplog, "now verifies; serving it", level=logging.INFO)
        assert await rejected_by_envoy(envoy, "default") == 0
        record_property("released_after_seconds", round(released, 2))


# --- bundles ----------------------------------------------------------------------------

@pytest.mark.scenario("spire.bundle-drops-ca-in-use")
async def test_a_bundle_that_drops_the_ca_in_use_is_not_served_until_svids_move_on(
        work_dir: Path, as_user: AsUser, caplog: pytest.LogCaptureFixture,
        record_property: pytest.RecordProperty) -> None:
    """SPIRE activates a new CA, then (a forced revocation racing the rotation) sends a bundle
    without the CA that signed the SVIDs in use. Envoy keeps its SVID and keeps trusting that
    CA, so its peers with SVIDs from it are not cut off; the agent says so once. Once SPIRE
    re-issues the SVIDs from the new CA, the old CA goes, as SPIRE asked."""
    async with running(work_dir, [envoy_entry()]) as stack:
        assert stack.agent is not None
        envoy = await attach_envoy(stack, as_user)
        held = await leaf_serials(envoy)
        await stack.spire.rotate_ca_now()
        cas = local_ca_serials(stack.spire)
        old, new = cas[1], cas[2]
        await envoy.await_until(lambda e: e.certs().ca_serials == {old, new},
                                what="Envoy to trust both CAs")

        stack.spire.faults.drop_ca_from_bundle([1])
        cache = stack.agent.cache
        await eventually(lambda: cache.received_bundles is not None and any(
            len(certs) == 1 for certs in cache.received_bundles.bundles.values()),
            what="the agent to receive the bundle without the old CA")
        # Another bundle change in the same episode (a federated CA appears): no new warning.
        await stack.spire.rotate_ca_now()
        await asyncio.sleep(0.5)
        assert await ca_serials(envoy) >= {old, new}, "the CA in use was dropped from Envoy"
        assert await leaf_serials(envoy) == held
        warned = messages(caplog, "no longer holds CA")
        assert len(warned) == 1, warned
        assert ID_A in warned[0]

        await stack.spire.rotate_now()  # SVIDs from the active CA: the old one may go
        await envoy.await_until(lambda e: old not in e.certs().ca_serials,
                                what="the old CA to leave Envoy's trust")
        assert (await leaf_serials(envoy)).isdisjoint(held)
        assert messages(caplog, "dropped from the bundles served", level=logging.INFO)
        assert await rejected_by_envoy(envoy, "default", "ROOTCA") == 0
        record_property("warnings", len(warned))


@pytest.mark.scenario("spire.bad-trust-domain-in-bundle")
async def test_one_malformed_trust_domain_does_not_sink_the_bundle_message(
        work_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One federated trust domain's bundle turns malformed while the local CA rotates in the
    same message: the local update is applied, the bad trust domain keeps its last good
    bundle, and that is logged once however many messages carry it."""
    needs_root()
    async with running(work_dir, [envoy_entry(federates_with=[f"spiffe://{PARTNER}"])]) as stack:
        agent = stack.agent
        assert agent is not None
        key = f"spiffe://{PARTNER}"
        await eventually(lambda: agent.cache.bundles is not None
                         and key in agent.cache.bundles.bundles, what="the partner bundle")
        partner_before = agent.cache.bundles.bundles[key]

        stack.spire.faults.malformed_bundle(PARTNER)
        await stack.spire.rotate_ca_now()  # the same message carries a new local CA
        for _ in range(2):  # more messages in the same episode
            await stack.spire.rotate_ca_now()
        local = f"spiffe://{stack.spire.cache.trust_domain}"
        await eventually(lambda: len(agent.cache.bundles.bundles[local]) == 4,
                         what="the local CA rotations to be applied")
        assert agent.cache.bundles.bundles[key] == partner_before
        refused = messages(caplog, "malformed X.509 bundle")
        assert len(refused) == 1, refused
        assert key in refused[0] and "previous bundle stays in use" in refused[0]

        # Served over SDS too: the local bundle a caller gets has the new CAs.
        response = await fetch(stack.sds_socket, ["ROOTCA"])
        assert "ROOTCA" in secrets_of(response)

        stack.spire.faults.malformed_bundle(None)
        await stack.spire.rotate_ca_now(PARTNER)
        await eventually(lambda: agent.cache.bundles.bundles[key] != partner_before,
                         what="the partner's good bundle again")
        assert messages(caplog, "parses again", level=logging.INFO)
        stack.spire.faults.malformed_bundle(PARTNER)  # a new episode logs again
        await eventually(lambda: len(messages(caplog, "malformed X.509 bundle")) == 2,
                         what="the second episode's warning")


# --- SPIRE away, restarting, slow, refusing ---------------------------------------------

@pytest.mark.scenario("spire.down-at-start")
async def test_spire_down_at_start(work_dir: Path, as_user: AsUser,
                                   caplog: pytest.LogCaptureFixture,
                                   record_property: pytest.RecordProperty) -> None:
    """The agent starts with no SPIRE, Envoy connects and waits; the missing socket is
    logged once over many retries of several streams; SPIRE appears and Envoy is served."""
    needs_root()
    stack = await make_stack(work_dir, [envoy_entry()])
    await stack.spire.stop(grace=0)
    try:
        agent = await stack.start_agent(follow_own_identity=True)
        envoy = as_user(sds_bootstrap(stack.sds_socket, validation_contexts=["ROOTCA"]), UID_A)
        await envoy.astart()
        await eventually(lambda: agent.client.status.reconnects >= 8,
                         what="many retries while SPIRE is away")
        assert await leaf_serials(envoy) == set()
        assert len(messages(caplog, "does not exist (yet)")) == 1

        started = time.monotonic()
        stack.spire = DevSpire(stack.spire_settings)
        await stack.spire.start()
        await envoy.await_until(lambda e: bool(e.certs().leaves()), timeout=20,
                                what="Envoy's first certificate")
        record_property("first_certificate_after_spire_up_s",
                        round(time.monotonic() - started, 2))
        await eventually(lambda: len(messages(caplog, "answers again", level=logging.INFO)) == 1,
                         what="the recovery to be logged")
        assert len(messages(caplog, "does not exist (yet)")) == 1
        assert not [m for m in messages(caplog, "failed (UNAVAILABLE")]
        assert await rejected_by_envoy(envoy, "default", "ROOTCA") == 0
    finally:
        await stack.stop_agent()
        await stack.spire.stop(grace=0)


@pytest.mark.scenario("spire.killed-mid-stream")
async def test_spire_killed_mid_stream(work_dir: Path, as_user: AsUser,
                                       caplog: pytest.LogCaptureFixture,
                                       record_property: pytest.RecordProperty) -> None:
    """dev-spire as a separate process, kill -9 with every stream open: Envoy keeps its
    certificate while SPIRE is gone; the restarted SPIRE (a new CA: no --data-dir) issues
    new SVIDs, which reach Envoy with the bundle that verifies them; one warning for the
    outage and one recovery line."""
    needs_root()
    stack = await make_stack(work_dir, [envoy_entry()])
    await stack.spire.stop(grace=0)
    spire = SpireProcess(stack, work_dir / "dev-spire.log")
    try:
        spire.start()
        await spire.wait_listening()
        agent = await stack.start_agent(follow_own_identity=True)
        envoy = await attach_envoy(stack, as_user)
        held = await leaf_serials(envoy)
        await eventually(lambda: agent.client.status.active_streams >= 4,
                         what="every stream open")

        spire.kill()
        reconnects = agent.client.status.reconnects
        await eventually(lambda: agent.client.status.reconnects >= reconnects + 10,
                         what="retries while SPIRE is dead")
        assert await leaf_serials(envoy) == held, "Envoy lost its certificate"
        outage = messages(caplog, "to SPIRE agent at")
        assert len(outage) == 1, outage

        spire.start()
        await spire.wait_listening()
        await envoy.await_until(lambda e: bool(e.certs().leaves()) and {
            c.serial for c in e.certs().leaves()}.isdisjoint(held), timeout=20,
            what="the restarted SPIRE's SVID")
        await eventually(lambda: len(messages(caplog, "answers again", level=logging.INFO)) == 1,
                         what="the recovery to be logged")
        await envoy.await_until(lambda e: len(e.certs().ca_serials) == 1,
                                what="the dead SPIRE's CA to leave Envoy's trust")
        assert len(messages(caplog, "to SPIRE agent at")) == 1
        assert await rejected_by_envoy(envoy, "default", "ROOTCA") == 0
        assert stack.sds.stats.nacks == 0
        record_property("reconnects", agent.client.status.reconnects)
    finally:
        await stack.stop_agent()
        spire.close()


@pytest.mark.scenario("spire.restarted-repeatedly")
async def test_spire_restarted_repeatedly(work_dir: Path, as_user: AsUser,
                                          caplog: pytest.LogCaptureFixture,
                                          record_property: pytest.RecordProperty) -> None:
    """Four SPIRE restarts in a row: after each, Envoy gets the new SVID (SPIRE keeps
    workload SVIDs in memory only), never an old one again, and nothing is rejected; each
    restart is one episode: at most one warning per cause, and one recovery line."""
    async with running(work_dir, [envoy_entry()]) as stack:
        agent = stack.agent
        assert agent is not None
        stack.spire_settings = dataclasses.replace(stack.spire_settings,
                                                   data_dir=str(work_dir / "spire-data"))
        await restart_in_process(stack)  # from now on the CA survives restarts
        envoy = await attach_envoy(stack, as_user)
        seen = [await leaf_serials(envoy)]
        restarts = 4
        for episode in range(1, restarts + 1):
            warnings_before = len(messages(caplog, "", level=logging.WARNING,
                                           logger="spiffe_delegate.spire"))
            await restart_in_process(stack)
            await envoy.await_until(lambda e: bool(e.certs().leaves()) and all(
                {c.serial for c in e.certs().leaves()}.isdisjoint(s) for s in seen),
                timeout=20, what=f"the SVID after restart {episode}")
            seen.append(await leaf_serials(envoy))
            await eventually(lambda n=episode: len(messages(
                caplog, "answers again", level=logging.INFO)) >= n, what="recovery logged")
            new = messages(caplog, "", level=logging.WARNING,
                           logger="spiffe_delegate.spire")[warnings_before:]
            causes = [m.split("(")[1].split(":")[0] if "(" in m else m for m in new]
            assert len(causes) == len(set(causes)), f"restart {episode}: {new}"
        assert await rejected_by_envoy(envoy, "default", "ROOTCA") == 0
        assert stack.sds.stats.nacks == 0
        assert sum(agent.cache.stats.svids_rejected.values()) == 0
        record_property("restarts", restarts)
        record_property("distinct_svids_served", len(seen))


@pytest.mark.scenario("spire.slow-answers")
async def test_slow_spire_answers(work_dir: Path, as_user: AsUser,
                                  caplog: pytest.LogCaptureFixture,
                                  record_property: pytest.RecordProperty) -> None:
    """Every SPIRE call takes 1 s: the first answers (four streams at once) are warned
    about once; Envoy is served; while the streams reconnect slowly it keeps its
    certificate; the next slow episode is warned about again."""
    async with running(work_dir, [envoy_entry()],
                       spire_slow_answer_warning=0.4) as stack:
        agent = stack.agent
        assert agent is not None
        stack.spire.faults.set_delay("*", 1.0)
        # The agent's streams opened before the delay: reopen them under it.
        stack.spire.faults.drop_streams_now()
        envoy = await attach_envoy(stack, as_user)
        slow = messages(caplog, "no answer from SPIRE agent")
        assert len(slow) == 1, slow
        await eventually(lambda: messages(caplog, "answered after", level=logging.INFO),
                         what="the end of the slow episode")
        held = await leaf_serials(envoy)

        stack.spire.faults.drop_streams_now()  # a second slow episode
        await eventually(lambda: len(messages(caplog, "no answer from SPIRE agent")) == 2,
                         what="the second slow episode's warning")
        assert await leaf_serials(envoy) == held
        await eventually(lambda: len(messages(caplog, "answered after",
                                              level=logging.INFO)) == 2,
                         timeout=15, what="the end of the second slow episode")
        assert len(messages(caplog, "no answer from SPIRE agent")) == 2
        await stack.spire.rotate_now(ID_A)
        await envoy.await_until(lambda e: bool(e.certs().leaves()) and {
            c.serial for c in e.certs().leaves()}.isdisjoint(held), what="a rotation")
        record_property("delay_s", 1.0)


@pytest.mark.scenario("spire.resource-exhausted-burst", "spire.unavailable-burst")
async def test_status_bursts_are_retried_logged_once_and_recovered(
        work_dir: Path, as_user: AsUser, caplog: pytest.LogCaptureFixture,
        record_property: pytest.RecordProperty) -> None:
    """A burst of 25 RESOURCE_EXHAUSTED, then of 25 UNAVAILABLE, across every stream: Envoy
    keeps its certificate, the client backs off, each burst is one warning and one recovery
    line, and a rotation after it reaches Envoy. A second burst of one code is a new
    episode and is logged again."""
    async with running(work_dir, [envoy_entry()]) as stack:
        agent = stack.agent
        assert agent is not None
        envoy = await attach_envoy(stack, as_user)
        bursts = [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                  grpc.StatusCode.RESOURCE_EXHAUSTED]
        for number, code in enumerate(bursts, 1):
            held = await leaf_serials(envoy)
            before = sum(stack.spire.stats.errors_returned.values())
            retries = agent.client.status.reconnects
            stack.spire.faults.inject_status(code, count=25)
            stack.spire.faults.drop_streams_now()
            await eventually(lambda b=before: sum(
                stack.spire.stats.errors_returned.values()) >= b + 25, timeout=20,
                             what=f"the {code.name} burst to be spent")
            assert await leaf_serials(envoy) == held, f"Envoy lost its certificate ({code})"
            await eventually(lambda n=number: len(messages(caplog, "answers again",
                                                           level=logging.INFO)) == n,
                             what=f"recovery after burst {number}")
            record_property(f"burst_{number}_{code.name}_retries",
                            agent.client.status.reconnects - retries)
            await stack.spire.rotate_now(ID_A)
            await envoy.await_until(lambda e, h=held: bool(e.certs().leaves()) and {
                c.serial for c in e.certs().leaves()}.isdisjoint(h),
                what=f"a rotation after burst {number}")
        assert len(messages(caplog, "failed (RESOURCE_EXHAUSTED")) == 2
        # The drop that starts each burst is itself an UNAVAILABLE cause: one per burst.
        assert len(messages(caplog, "failed (UNAVAILABLE")) == len(bursts)
        assert await rejected_by_envoy(envoy, "default", "ROOTCA") == 0


@pytest.mark.scenario("spire.response-over-4mb")
async def test_responses_over_4mb_are_received(
        work_dir: Path, caplog: pytest.LogCaptureFixture,
        record_property: pytest.RecordProperty) -> None:
    """SVID and bundle responses of 5 MiB (over gRPC's default 4 MiB limit) are received and
    applied: the SVID response's repeats are one SVID, the bundle's padding trust domains
    arrive, and the agent's own SVID is served over SDS."""
    needs_root()
    async with running(work_dir) as stack:
        agent = stack.agent
        assert agent is not None
        await eventually(lambda: agent.cache.bundles is not None,
                         what="the first bundles")
        sent = stack.spire.stats.responses_sent
        before = sent["SubscribeToX509SVIDs"] + sent["SubscribeToX509Bundles"]
        stack.spire.faults.oversize(count=-1, rpcs=["SubscribeToX509SVIDs",
                                                    "SubscribeToX509Bundles"])
        stack.spire.faults.drop_streams_now()
        await eventually(lambda: agent.cache.bundles is not None and
                         "spiffe://padding-0.invalid" in agent.cache.bundles.bundles,
                         what="the padded bundle message to be applied")
        await eventually(lambda: sent["SubscribeToX509SVIDs"] + sent["SubscribeToX509Bundles"]
                         >= before + 2, what="both padded responses")
        response = await fetch(stack.sds_socket, ["default"])
        assert "default" in secrets_of(response)
        assert not messages(caplog, "RESOURCE_EXHAUSTED")
        assert agent.client.status.connected
        record_property("response_bytes", DEFAULT_OVERSIZE)
        stack.spire.faults.oversize(count=0)

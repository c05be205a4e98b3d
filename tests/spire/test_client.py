"""The Delegated Identity client against a scripted servicer on a real Unix socket."""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb
from agent.errors import (
    SpireCallFailed,
    SpireInvalidArgument,
    SpirePermissionDenied,
    SpireUnavailable,
)
from agent.model import JwtSvid, Selector, X509Bundles, X509SvidUpdate
from agent.spire import BackoffPolicy, DelegatedIdentityClient, convert
from tests.waiting import eventually

from .fakespire import FAST, Abort, End, FakeSpire, Scripts, SpireServer, x509_response
from .pki import Ca

T = TypeVar("T")
DEADLINE = 10.0


async def next_item(iterator: AsyncIterator[T]) -> T:
    async with asyncio.timeout(DEADLINE):
        return await anext(iterator)


@pytest.fixture(scope="module")
def ca() -> Ca:
    return Ca.root()


async def test_streams_x509_svid_updates_as_models(
    spire_server: SpireServer, client: DelegatedIdentityClient, ca: Ca
) -> None:
    first, second = ca.svid("/a"), ca.svid("/b")
    spire = await spire_server.start()
    spire.scripts.x509_svids.append([
        x509_response(first, federates_with=("spiffe://other.org",)),
        x509_response(first, second),
        pb.SubscribeToX509SVIDsResponse(),  # nothing matches any more: still a message
    ])
    updates = client.subscribe_x509_svids(pid=4242)

    update = await next_item(updates)
    assert update == X509SvidUpdate((first,), ("spiffe://other.org",))
    assert (await next_item(updates)).svids == (first, second)
    assert await next_item(updates) == X509SvidUpdate(())
    assert spire.requests[0].pid == 4242 and not spire.requests[0].selectors
    assert client.status.connected and client.status.active_streams == 1
    await updates.aclose()  # type: ignore[attr-defined]
    assert client.status.active_streams == 0


async def test_subscribes_by_selectors(
    spire_server: SpireServer, client: DelegatedIdentityClient
) -> None:
    spire = await spire_server.start()
    spire.scripts.x509_svids.append([pb.SubscribeToX509SVIDsResponse()])
    selectors = [Selector("k8s", "ns:default"), Selector("k8s", "sa:web")]
    assert await next_item(client.subscribe_x509_svids(selectors=selectors)) == X509SvidUpdate(())
    request = spire.requests[0]
    assert request.pid == 0
    assert [(s.type, s.value) for s in request.selectors] == [("k8s", "ns:default"),
                                                              ("k8s", "sa:web")]


@pytest.mark.parametrize("kwargs", [
    {},
    {"pid": 1, "selectors": [Selector("unix", "uid:0")]},
    {"selectors": []},
    {"pid": 0},
    {"pid": -3},
    {"selectors": [Selector("k8s:ns", "default")]},
    {"selectors": [Selector("k8s", "")]},
])
async def test_exactly_one_of_pid_or_selectors(
    client: DelegatedIdentityClient, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        client.subscribe_x509_svids(**kwargs)
    with pytest.raises(ValueError):
        await client.fetch_jwt_svids(["aud"], **kwargs)


async def test_resumes_by_itself_after_spire_restarts(
    spire_server: SpireServer, client: DelegatedIdentityClient, ca: Ca
) -> None:
    before, after = ca.svid("/before"), ca.svid("/after")
    spire = await spire_server.start()
    spire.scripts.x509_svids.append([x509_response(before)])
    updates = client.subscribe_x509_svids(pid=7)
    assert (await next_item(updates)).svids == (before,)

    await spire_server.stop()
    restarted = FakeSpire(Scripts(x509_svids=collections.deque([[x509_response(after)]])))
    await spire_server.start(restarted)

    assert (await next_item(updates)).svids == (after,)  # the fresh state of the world
    assert restarted.requests[0].pid == 7
    assert client.status.reconnects >= 1
    assert client.status.connected


async def test_waits_for_the_socket_and_says_so_once(
    spire_server: SpireServer, client: DelegatedIdentityClient,
    caplog: pytest.LogCaptureFixture, ca: Ca,
) -> None:
    caplog.set_level(logging.DEBUG, logger="spiffe_delegate.spire")
    svid = ca.svid()
    updates = client.subscribe_x509_svids(pid=9)
    reader = asyncio.ensure_future(next_item(updates))
    await eventually(lambda: client.status.reconnects >= 5, what="several retries")
    assert not reader.done()
    assert client.status.connected is False
    assert client.status.last_error_code == "UNAVAILABLE"

    spire = FakeSpire()
    spire.scripts.x509_svids.append([x509_response(svid)])
    await spire_server.start(spire)
    assert (await reader).svids == (svid,)
    missing = [r for r in caplog.records if "does not exist" in r.getMessage()]
    assert len(missing) == 1
    assert str(spire_server.path) in missing[0].getMessage()
    assert "admin_socket_path" in missing[0].getMessage()


@pytest.mark.parametrize("details, extra", [
    ("caller not configured as an authorized delegate", "authorized_delegates"),
    ("no identity issued", "registration entry matching its own process"),
])
async def test_permission_denied_is_typed_with_guidance(
    spire_server: SpireServer, client: DelegatedIdentityClient, details: str, extra: str
) -> None:
    spire = await spire_server.start()
    spire.scripts.x509_svids.append([Abort(grpc.StatusCode.PERMISSION_DENIED, details)])
    with pytest.raises(SpirePermissionDenied) as caught:
        await next_item(client.subscribe_x509_svids(pid=5))
    text = str(caught.value)
    assert details in text
    assert "authorized_delegates" in text and "admin_socket_path" in text
    assert extra in text
    assert len(spire.requests) == 1  # not retried
    assert client.status.last_error_code == "PERMISSION_DENIED"


async def test_invalid_argument_says_it_is_our_bug(
    spire_server: SpireServer, client: DelegatedIdentityClient
) -> None:
    spire = await spire_server.start()
    spire.scripts.x509_svids.append(
        [Abort(grpc.StatusCode.INVALID_ARGUMENT, "could not parse provided selectors")])
    with pytest.raises(SpireInvalidArgument) as caught:
        await next_item(client.subscribe_x509_svids(selectors=[Selector("k8s", "ns:a")]))
    assert "bug in spiffe-delegate" in str(caught.value)
    assert "could not parse provided selectors" in str(caught.value)


async def test_old_spire_ignoring_pid_is_explained(
    spire_server: SpireServer, client: DelegatedIdentityClient
) -> None:
    spire = await spire_server.start()
    spire.scripts.x509_svids.append([Abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        "must provide either selectors or non-zero PID, but not both")])
    with pytest.raises(SpireInvalidArgument, match=r"v1\.10\.2"):
        await next_item(client.subscribe_x509_svids(pid=5))


@pytest.mark.parametrize("code", [
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
])
async def test_retryable_codes_reconnect(
    spire_server: SpireServer, client: DelegatedIdentityClient, ca: Ca,
    code: grpc.StatusCode,
) -> None:
    svid = ca.svid()
    spire = await spire_server.start()
    spire.scripts.x509_svids.extend([
        [pb.SubscribeToX509SVIDsResponse(), Abort(code, "transient")],
        [Abort(code, "still transient")],
        [x509_response(svid)],
    ])
    updates = client.subscribe_x509_svids(pid=3)
    assert await next_item(updates) == X509SvidUpdate(())
    assert (await next_item(updates)).svids == (svid,)
    assert len(spire.requests) == 3


async def test_stream_closed_by_server_reconnects(
    spire_server: SpireServer, client: DelegatedIdentityClient
) -> None:
    spire = await spire_server.start()
    spire.scripts.x509_bundles.extend([[End()], [convert.x509_bundles_to_proto(X509Bundles({}))]])
    assert await next_item(client.subscribe_x509_bundles()) == X509Bundles({})
    assert len(spire.requests) == 2


async def test_non_retryable_other_code_is_typed(
    spire_server: SpireServer, client: DelegatedIdentityClient
) -> None:
    spire = await spire_server.start()
    spire.scripts.jwt_bundles.append([Abort(grpc.StatusCode.UNIMPLEMENTED, "unknown service")])
    with pytest.raises(SpireCallFailed) as caught:
        await next_item(client.subscribe_jwt_bundles())
    assert caught.value.code_name == "UNIMPLEMENTED"
    assert "admin socket" in str(caught.value)


async def test_unavailable_after_max_attempts(socket_path: Path) -> None:
    policy = BackoffPolicy(initial=0.001, maximum=0.005, max_attempts=3)
    async with DelegatedIdentityClient(socket_path, backoff=policy) as client:
        with pytest.raises(SpireUnavailable) as caught:
            await next_item(client.subscribe_x509_bundles())
    assert "after 3 attempts" in str(caught.value)
    assert str(socket_path) in str(caught.value)


async def test_receives_messages_over_4mb(
    spire_server: SpireServer, client: DelegatedIdentityClient
) -> None:
    big = bytes(range(256)) * (5 * 1024 * 1024 // 256)  # 5 MiB, like spire#3965
    spire = await spire_server.start()
    spire.scripts.jwt_bundles.append([pb.SubscribeToJWTBundlesResponse(
        bundles={"spiffe://example.org": big, "other.org": b"{}"})])
    bundles = await next_item(client.subscribe_jwt_bundles())
    assert bundles.bundles == {"spiffe://example.org": big, "spiffe://other.org": b"{}"}


async def test_grpc_default_limit_would_have_failed(
    spire_server: SpireServer, socket_path: Path
) -> None:
    big = b"x" * (5 * 1024 * 1024)
    spire = await spire_server.start()
    spire.scripts.jwt_bundles.extend(
        [[pb.SubscribeToJWTBundlesResponse(bundles={"spiffe://example.org": big})]] * 2)
    policy = BackoffPolicy(initial=0.001, maximum=0.005, max_attempts=2)
    async with DelegatedIdentityClient(
        socket_path, backoff=policy, max_receive_message_bytes=4 * 1024 * 1024
    ) as client:
        with pytest.raises(SpireCallFailed) as caught:
            await next_item(client.subscribe_jwt_bundles())
    assert caught.value.code_name == "RESOURCE_EXHAUSTED"
    assert "receive limit" in str(caught.value)


async def test_x509_bundles_are_split_into_certificates(
    spire_server: SpireServer, client: DelegatedIdentityClient, ca: Ca
) -> None:
    other = Ca.root("other.org")
    second = Ca.root(name="next root")
    spire = await spire_server.start()
    spire.scripts.x509_bundles.append([pb.SubscribeToX509BundlesResponse(ca_certificates={
        "spiffe://example.org": ca.der + second.der, "spiffe://other.org": other.der})])
    bundles = await next_item(client.subscribe_x509_bundles())
    assert bundles.bundles == {"spiffe://example.org": (ca.der, second.der),
                               "spiffe://other.org": (other.der,)}


async def test_fetch_jwt_svids(
    spire_server: SpireServer, client: DelegatedIdentityClient
) -> None:
    spire = await spire_server.start()
    spire.scripts.jwt_svids.append(pb.FetchJWTSVIDsResponse(svids=[convert.jwt_svid_to_proto(
        JwtSvid("header.payload.sig", "spiffe://example.org/web", 2000, 1000, "hint"))]))
    svids = await client.fetch_jwt_svids(["aud1", "aud2"], selectors=[Selector("k8s", "ns:a")])
    assert svids == [JwtSvid("header.payload.sig", "spiffe://example.org/web", 2000, 1000, "hint")]
    assert list(spire.requests[0].audience) == ["aud1", "aud2"]

    with pytest.raises(SpirePermissionDenied, match="registration entry"):
        await client.fetch_jwt_svids(["aud"], pid=10)  # script empty: "no identity issued"
    with pytest.raises(ValueError, match="audience"):
        await client.fetch_jwt_svids([], pid=10)


async def test_fetch_jwt_svids_retries_then_answers(
    spire_server: SpireServer, client: DelegatedIdentityClient
) -> None:
    spire = await spire_server.start()
    spire.scripts.jwt_svids.extend([
        Abort(grpc.StatusCode.UNAVAILABLE, "workload attestation failed"),
        pb.FetchJWTSVIDsResponse(),
    ])
    assert await client.fetch_jwt_svids(["aud"], pid=11) == []
    assert len(spire.requests) == 2


async def test_fetch_jwt_svids_gives_up_after_its_budget(socket_path: Path) -> None:
    async with DelegatedIdentityClient(socket_path, backoff=FAST) as client:
        with pytest.raises(SpireUnavailable):
            await client.fetch_jwt_svids(["aud"], pid=11, give_up_after=0.3)


async def test_cancelling_the_iterator_cancels_the_rpc(
    spire_server: SpireServer, client: DelegatedIdentityClient
) -> None:
    spire = await spire_server.start()
    spire.scripts.x509_svids.append([pb.SubscribeToX509SVIDsResponse()])
    updates = client.subscribe_x509_svids(pid=12)

    async def consume() -> None:
        async for _ in updates:
            pass

    task = asyncio.ensure_future(consume())
    await eventually(lambda: spire.streams_open == 1 and client.status.connected)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: spire.streams_open == 0, what="the server to see the cancel")
    assert client.status.active_streams == 0


async def test_close_ends_every_iterator(
    spire_server: SpireServer, socket_path: Path
) -> None:
    spire = await spire_server.start()
    spire.scripts.x509_svids.append([pb.SubscribeToX509SVIDsResponse()])
    client = DelegatedIdentityClient(socket_path, backoff=FAST)
    received: list[Any] = []

    async def consume(iterator: AsyncIterator[Any]) -> None:
        async for item in iterator:
            received.append(item)

    streaming = asyncio.ensure_future(consume(client.subscribe_x509_svids(pid=1)))
    # The bundles stream finds no script, so it waits with no message yet.
    waiting = asyncio.ensure_future(consume(client.subscribe_x509_bundles()))
    await eventually(lambda: spire.streams_open == 2 and len(received) == 1)
    await client.close()
    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(streaming, waiting)  # ended quietly, no exception
    await eventually(lambda: spire.streams_open == 0)
    assert client.closed and not client.status.connected
    with pytest.raises(RuntimeError, match="closed"):
        client.subscribe_x509_svids(pid=1)
    with pytest.raises(RuntimeError, match="closed"):
        await client.fetch_jwt_svids(["a"], pid=1)


async def test_close_wakes_a_subscription_in_backoff(socket_path: Path) -> None:
    slow = BackoffPolicy(initial=60.0, maximum=60.0)
    client = DelegatedIdentityClient(socket_path, backoff=slow, rng=random.Random(0))
    task = asyncio.ensure_future(anext(client.subscribe_x509_bundles(), None))
    await eventually(lambda: client.status.reconnects == 1)
    await client.close()
    async with asyncio.timeout(DEADLINE):
        assert await task is None


async def test_warns_when_the_first_message_is_slow(
    spire_server: SpireServer, socket_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="spiffe_delegate.spire")
    spire = await spire_server.start()  # no script: the stream opens and says nothing
    async with DelegatedIdentityClient(socket_path, first_message_warning=0.05) as client:
        reader = asyncio.ensure_future(anext(client.subscribe_x509_svids(pid=8)))
        await eventually(lambda: "no answer from SPIRE" in caplog.text)
        assert "pid 8" in caplog.text
        # The server counts the stream when its handler runs, which under load may come
        # after the client's timer fired.
        await eventually(lambda: spire.streams_open == 1, what="the stream on the server")
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader


class RecordingObserver:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.retries: list[tuple[str, str, int]] = []
        self.stream_errors: list[tuple[str, str]] = []

    def on_call(self, method: str, code: str, seconds: float) -> None:
        assert seconds >= 0
        self.calls.append((method, code))

    def on_stream_error(self, method: str, code: str, seconds: float) -> None:
        self.stream_errors.append((method, code))

    def on_retry(self, method: str, code: str, attempt: int, delay: float) -> None:
        self.retries.append((method, code, attempt))


async def test_observer_sees_latency_errors_and_retries(
    spire_server: SpireServer, socket_path: Path
) -> None:
    observer = RecordingObserver()
    spire = await spire_server.start()
    spire.scripts.x509_bundles.extend([
        [Abort(grpc.StatusCode.INTERNAL, "boom")],
        [pb.SubscribeToX509BundlesResponse(), Abort(grpc.StatusCode.UNAVAILABLE, "gone")],
        [pb.SubscribeToX509BundlesResponse()],
    ])
    spire.scripts.jwt_svids.append(pb.FetchJWTSVIDsResponse())
    async with DelegatedIdentityClient(socket_path, backoff=FAST, observer=observer) as client:
        bundles = client.subscribe_x509_bundles()
        await next_item(bundles)
        await next_item(bundles)
        await client.fetch_jwt_svids(["a"], pid=1)
    assert observer.calls == [
        ("SubscribeToX509Bundles", "INTERNAL"),
        ("SubscribeToX509Bundles", "OK"),
        ("SubscribeToX509Bundles", "OK"),
        ("FetchJWTSVIDs", "OK"),
    ]
    assert observer.stream_errors == [("SubscribeToX509Bundles", "UNAVAILABLE")]
    assert observer.retries == [("SubscribeToX509Bundles", "INTERNAL", 1),
                                ("SubscribeToX509Bundles", "UNAVAILABLE", 2)]


async def test_a_broken_observer_does_not_break_the_client(
    spire_server: SpireServer, socket_path: Path
) -> None:
    class Broken(RecordingObserver):
        def on_call(self, method: str, code: str, seconds: float) -> None:
            raise RuntimeError("metrics bug")

    spire = await spire_server.start()
    spire.scripts.x509_bundles.append([pb.SubscribeToX509BundlesResponse()])
    async with DelegatedIdentityClient(socket_path, backoff=FAST, observer=Broken()) as client:
        assert await next_item(client.subscribe_x509_bundles()) == X509Bundles({})


async def test_a_malformed_trust_domain_is_refused_alone_and_logged_once(
    spire_server: SpireServer, client: DelegatedIdentityClient, ca: Ca,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="spiffe_delegate.spire")
    other, rotated = Ca.root("other.org"), Ca.root(name="next root")
    spire = await spire_server.start()
    spire.scripts.x509_bundles.append([
        pb.SubscribeToX509BundlesResponse(ca_certificates={
            "spiffe://example.org": ca.der, "spiffe://other.org": other.der}),
        pb.SubscribeToX509BundlesResponse(ca_certificates={
            "spiffe://example.org": ca.der + rotated.der, "spiffe://other.org": b"junk"}),
        pb.SubscribeToX509BundlesResponse(ca_certificates={
            "spiffe://example.org": rotated.der, "spiffe://other.org": b"junk"}),
        pb.SubscribeToX509BundlesResponse(ca_certificates={
            "spiffe://example.org": rotated.der, "spiffe://other.org": other.der}),
    ])
    bundles = client.subscribe_x509_bundles()
    await next_item(bundles)
    second = await next_item(bundles)
    assert second.bundles == {"spiffe://example.org": (ca.der, rotated.der),
                              "spiffe://other.org": (other.der,)}  # its last good one
    third = await next_item(bundles)
    assert third.bundles["spiffe://example.org"] == (rotated.der,)
    assert third.bundles["spiffe://other.org"] == (other.der,)
    await next_item(bundles)
    refused = [r for r in caplog.records if "malformed X.509 bundle" in r.getMessage()]
    assert len(refused) == 1 and "spiffe://other.org" in refused[0].getMessage()
    assert "parses again" in caplog.text


async def test_an_outage_is_one_warning_across_streams_and_retries(
    spire_server: SpireServer, client: DelegatedIdentityClient, ca: Ca,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="spiffe_delegate.spire")
    spire = await spire_server.start()
    for _ in range(2):  # two episodes
        spire.scripts.x509_bundles.extend(
            [[Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")]] * 4
            + [[pb.SubscribeToX509BundlesResponse()]])
        spire.scripts.x509_svids.extend(
            [[Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")]] * 4
            + [[x509_response(ca.svid())]])
        await asyncio.gather(next_item(client.subscribe_x509_bundles()),
                             next_item(client.subscribe_x509_svids(pid=3)))
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and "RESOURCE_EXHAUSTED" in r.getMessage()]
    # 16 failures; an episode ends when no stream is failing, so a stream that fails only
    # after the other recovered starts a new one: at most one warning per stream and burst.
    assert 2 <= len(warnings) <= 4, [w.getMessage() for w in warnings]
    recovered = [r for r in caplog.records if "every call recovered" in r.getMessage()]
    assert len(recovered) == len(warnings)

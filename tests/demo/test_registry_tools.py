"""The demo's registry tooling against a real Distribution registry and skopeo."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.demo.chain import free_port
from agent.demo.errors import BadHttpResponse, DemoDependencyMissing, PullFailed, PushFailed
from agent.demo.image import OciImage, build_oci_layout
from agent.demo.pull import MANIFEST_MEDIA_TYPES, http_request, pull_image
from agent.demo.registry import (
    RegistryTls,
    issue_server_certificate,
    registry_argv,
    registry_binary,
    write_registry_config,
)
from agent.demo.skopeo import push_failure, push_image, skopeo_binary

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# ---------------------------------------------------------------- helpers


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
def registry_program() -> None:
    try:
        registry_binary()
    except DemoDependencyMissing as error:
        pytest.skip(f"no Distribution registry: {error}")


@pytest.fixture
def skopeo_program() -> None:
    try:
        skopeo_binary()
    except DemoDependencyMissing as error:
        pytest.skip(f"no skopeo: {error}")


@dataclass(frozen=True)
class Registry:
    port: int
    log: Path  # Distribution's output, access log included


def _start_registry(work: Path, host: str, port: int,
                    tls: RegistryTls | None) -> subprocess.Popen[bytes]:
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yml"
    write_registry_config(config, storage=work / "storage", host=host, port=port, tls=tls)
    # REGISTRY_* variables would override the config file.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    with (work / "registry.log").open("wb") as log:
        return subprocess.Popen(registry_argv(config), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=env)


@contextlib.asynccontextmanager
async def running_registry(work: Path, host: str,
                           tls: RegistryTls | None = None,
                           ready: Callable[[int], Awaitable[bool]] | None = None,
                           ) -> AsyncIterator[Registry]:
    """A docker-registry serving on a free port of ``host``, killed by PID on exit."""
    port = free_port(host)
    registry = Registry(port, work / "registry.log")
    process = _start_registry(work, host, port, tls)
    try:
        url_host = f"[{host}]" if ":" in host else host

        async def plain_ready(port: int) -> bool:
            response = await http_request(f"http://{url_host}:{port}/v2/", timeout=1)
            return response.status == 200

        check = ready or plain_ready
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise AssertionError(f"registry exited with {process.returncode}: "
                                     f"{registry.log.read_text(errors='replace')}")
            with contextlib.suppress(OSError, BadHttpResponse, TimeoutError, ssl.SSLError):
                if await check(port):
                    break
            if time.monotonic() > deadline:
                raise AssertionError("registry not ready after 10s: "
                                     f"{registry.log.read_text(errors='replace')}")
            await asyncio.sleep(0.02)
        yield registry
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.asynccontextmanager
async def local_server(handler: Handler, host: str = "127.0.0.1") -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, host, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def _mint_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _mint_client(directory: Path, name: str, ca_key: ec.EllipticCurvePrivateKey,
                 ca_cert: x509.Certificate) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def _https_get(port: int, context: ssl.SSLContext, path: str = "/v2/") -> bytes:
    """Raw HTTPS GET to 127.0.0.1; returns the whole answer."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost"),
        5)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                     .encode())
        # A server that rejects us may already be gone; its reason (an alert) is then
        # waiting for the read below.
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


# ---------------------------------------------------------------- image layout


def test_layout_is_deterministic_and_well_formed(tmp_path: Path) -> None:
    first = build_oci_layout(tmp_path / "a")
    second = build_oci_layout(tmp_path / "b")
    assert first.manifest_digest == second.manifest_digest
    assert first.blob_digests == second.blob_digests
    assert first.manifest == second.manifest
    other = build_oci_layout(tmp_path / "c", files={"hello.txt": b"something else\n"})
    assert other.manifest_digest != first.manifest_digest
    assert build_oci_layout(tmp_path / "d", tag="2.0").manifest_digest == first.manifest_digest

    layout = first.layout
    assert json.loads((layout / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_bytes())
    assert index["schemaVersion"] == 2
    [entry] = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "1.0"
    assert entry["digest"] == first.manifest_digest
    assert entry["mediaType"] == first.manifest_media_type

    def blob(digest: str) -> bytes:
        data = (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
        assert _sha256(data) == digest
        return data

    assert blob(first.manifest_digest) == first.manifest
    assert entry["size"] == len(first.manifest)
    manifest = json.loads(first.manifest)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    [layer_descriptor] = manifest["layers"]
    assert layer_descriptor["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert first.blob_digests == (manifest["config"]["digest"], layer_descriptor["digest"])

    config_bytes = blob(manifest["config"]["digest"])
    assert len(config_bytes) == manifest["config"]["size"]
    config = json.loads(config_bytes)
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    layer = blob(layer_descriptor["digest"])
    assert len(layer) == layer_descriptor["size"]
    tar_bytes = gzip.decompress(layer)
    assert config["rootfs"] == {"type": "layers", "diff_ids": [_sha256(tar_bytes)]}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        [member] = tar.getmembers()
        assert (member.name, member.mtime, member.uid, member.gid) == ("hello.txt", 0, 0, 0)
        extracted = tar.extractfile(member)
        assert extracted is not None and extracted.read().startswith(b"hello")


def test_layout_with_nested_files(tmp_path: Path) -> None:
    image = build_oci_layout(tmp_path, tag="v2", files={"etc/motd": b"hi\n", "a.txt": b"a"})
    manifest = json.loads(image.manifest)
    layer = (tmp_path / "blobs" / "sha256" /
             manifest["layers"][0]["digest"].removeprefix("sha256:")).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        assert [(m.name, m.isdir()) for m in tar.getmembers()] == [
            ("a.txt", False), ("etc", True), ("etc/motd", False)]
    for bad in ({"../x": b""}, {"/abs": b""}, {"a": b"", "a/b": b""}):
        with pytest.raises(ValueError):
            build_oci_layout(tmp_path / "bad", files=bad)
    with pytest.raises(ValueError):
        build_oci_layout(tmp_path / "bad", tag="-nope")


# ---------------------------------------------------------------- registry config and certs


def test_registry_config_formats_addresses_and_tls(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    write_registry_config(config, storage=tmp_path / "s", host="::1", port=5000)
    parsed = json.loads(config.read_text())
    assert parsed["http"]["addr"] == "[::1]:5000"
    assert "tls" not in parsed["http"]
    assert parsed["storage"]["filesystem"]["rootdirectory"] == str(tmp_path / "s")
    assert parsed["storage"]["delete"] == {"enabled": True}
    assert parsed["log"]["level"] == "warn"
    assert parsed["http"]["headers"] == {"X-Content-Type-Options": ["nosniff"]}
    assert "auth" not in parsed

    tls = RegistryTls(tmp_path / "cert.pem", tmp_path / "key.pem", (tmp_path / "ca.pem",))
    write_registry_config(config, storage=tmp_path / "s", host="127.0.0.1", port=443, tls=tls)
    parsed = json.loads(config.read_text())
    assert parsed["http"]["addr"] == "127.0.0.1:443"
    assert parsed["http"]["tls"] == {"certificate": str(tmp_path / "cert.pem"),
                                     "key": str(tmp_path / "key.pem"),
                                     "clientcas": [str(tmp_path / "ca.pem")]}


def test_server_certificate_names_and_key_mode(tmp_path: Path) -> None:
    ca, cert, key = issue_server_certificate(tmp_path / "tls", ["registry.demo", "10.1.2.3"])
    assert [p.name for p in (ca, cert, key)] == ["ca.pem", "server.pem", "server-key.pem"]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    root = x509.load_pem_x509_certificate(ca.read_bytes())
    leaf.verify_directly_issued_by(root)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1", "::1", "10.1.2.3"}
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "registry.demo"}
    server_key = serialization.load_pem_private_key(key.read_bytes(), None)
    assert server_key.public_key() == leaf.public_key()


def test_missing_programs_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(DemoDependencyMissing, match="apt-get install docker-registry"):
        registry_binary()
    with pytest.raises(DemoDependencyMissing, match="apt-get install skopeo"):
        skopeo_binary()


# ---------------------------------------------------------------- push and pull


@pytest.mark.usefixtures("registry_program", "skopeo_program")
async def test_push_then_pull_over_ipv4(tmp_path: Path) -> None:
    image = build_oci_layout(tmp_path / "image")
    async with running_registry(tmp_path / "registry", "127.0.0.1") as registry:
        port = registry.port
        await push_image(image, f"127.0.0.1:{port}", "demo/hello", timeout=30)
        base = f"http://127.0.0.1:{port}"
        result = await pull_image(base, "demo/hello", image.tag)
        assert result.manifest_digest == image.manifest_digest
        assert result.requests == 1 + len(image.blob_digests)
        sizes = [d["size"] for d in [json.loads(image.manifest)["config"],
                                     *json.loads(image.manifest)["layers"]]]
        assert result.bytes_read == len(image.manifest) + sum(sizes)
        by_digest = await pull_image(base, "demo/hello", image.manifest_digest)
        assert by_digest.manifest_digest == image.manifest_digest

        with pytest.raises(PullFailed) as missing:
            await pull_image(base, "demo/hello", "no-such-tag")
        assert missing.value.status == 404
        assert f"{base}/v2/demo/hello/manifests/no-such-tag" in str(missing.value)
        assert "MANIFEST_UNKNOWN" in str(missing.value)


@pytest.mark.usefixtures("registry_program", "skopeo_program")
async def test_push_then_pull_over_ipv6(tmp_path: Path) -> None:
    if not _ipv6_loopback():
        pytest.skip("this host has no IPv6 loopback (::1 cannot be bound)")
    image = build_oci_layout(tmp_path / "image", tag="v6")
    async with running_registry(tmp_path / "registry", "::1") as registry:
        port = registry.port
        await push_image(image, f"[::1]:{port}", "demo/six", timeout=30)
        result = await pull_image(f"http://[::1]:{port}/", "demo/six", "v6")
        assert result.manifest_digest == image.manifest_digest
        # Both the push (through push_image's relay) and the pull reached it over IPv6.
        access = registry.log.read_text(errors="replace").splitlines()
        assert any(line.startswith("::1 ") and '"PUT /v2/demo/six/manifests/v6 ' in line
                   for line in access), access
        assert any(line.startswith("::1 ") and '"GET /v2/demo/six/manifests/v6 ' in line
                   for line in access), access


@pytest.mark.usefixtures("skopeo_program")
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_push_refused_by_a_proxy_is_denied(tmp_path: Path, host: str) -> None:
    if ":" in host and not _ipv6_loopback():
        pytest.skip("this host has no IPv6 loopback (::1 cannot be bound)")
    image = build_oci_layout(tmp_path / "image")
    address = f"[{host}]" if ":" in host else host
    seen: list[bytes] = []

    async def forbid(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(65536))
        body = b"RBAC: access denied"
        writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async with local_server(forbid, host) as port:
        with pytest.raises(PushFailed) as refused:
            await push_image(image, f"{address}:{port}", "demo/hello", timeout=30)
    assert refused.value.denied
    assert refused.value.status == 403
    assert "HTTP 403" in str(refused.value)
    assert f"{address}:{port}" in str(refused.value)
    assert any(b"/v2/" in request for request in seen)

    # Nothing listening: a failure, but not a refusal.
    with pytest.raises(PushFailed) as unreachable:
        await push_image(image, f"{address}:{free_port(host)}", "demo/hello", timeout=30)
    assert not unreachable.value.denied
    assert unreachable.value.status is None
    if ":" in host:
        assert "cannot connect" in str(unreachable.value)
    else:
        assert "connection refused" in str(unreachable.value)


@pytest.mark.usefixtures("skopeo_program")
async def test_push_to_a_silent_server_times_out(tmp_path: Path) -> None:
    image = build_oci_layout(tmp_path / "image")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async with local_server(silent) as port:
        started = time.monotonic()
        with pytest.raises(PushFailed, match=r"took longer than 0\.5s") as slow:
            await push_image(image, f"127.0.0.1:{port}", "demo/hello", timeout=0.5)
        assert time.monotonic() - started < 5
    assert not slow.value.denied


def test_push_failure_reads_skopeo_wording() -> None:
    unauthorized = push_failure("r/x:1", 1, 'time="t" level=fatal msg="writing blob: '
                                'unauthorized: authentication required"\n')
    assert unauthorized.denied
    assert "writing blob: unauthorized: authentication required" in str(unauthorized)
    local = push_failure("r/x:1", 1, "open /root/.docker/config.json: permission denied\n")
    assert not local.denied
    broken = push_failure("r/x:1", 1, 'msg="received unexpected HTTP status: 500 Internal"')
    assert (broken.status, broken.denied) == (500, False)


@pytest.mark.usefixtures("registry_program")
async def test_registry_with_client_certificates(tmp_path: Path) -> None:
    ca, cert, key = issue_server_certificate(tmp_path / "server", ["localhost"])
    client_ca_key, client_ca = _mint_ca("demo client CA")
    client_ca_path = tmp_path / "client-ca.pem"
    client_ca_path.write_bytes(client_ca.public_bytes(serialization.Encoding.PEM))
    good_cert, good_key = _mint_client(tmp_path, "client", client_ca_key, client_ca)
    stranger_ca_key, stranger_ca = _mint_ca("some other CA")
    bad_cert, bad_key = _mint_client(tmp_path, "stranger", stranger_ca_key, stranger_ca)

    def context(client: tuple[Path, Path] | None,
                maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.maximum_version = maximum
        if client is not None:
            ctx.load_cert_chain(str(client[0]), str(client[1]))
        return ctx

    with_cert = context((good_cert, good_key))

    async def ready(port: int) -> bool:
        return (await _https_get(port, with_cert)).startswith(b"HTTP/1.1 200")

    tls = RegistryTls(cert, key, (client_ca_path,))
    async with running_registry(tmp_path / "registry", "127.0.0.1", tls, ready) as registry:
        port = registry.port
        answer = await _https_get(port, with_cert)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b"registry/2.0" in answer

        # TLS 1.2: the server's demand for a certificate fails the handshake itself.
        with pytest.raises(ssl.SSLError, match="alert"):
            await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, server_hostname="localhost",
                ssl=context(None, ssl.TLSVersion.TLSv1_2)), 5)
        # TLS 1.3: the client's side of the handshake completes first; the server's alert
        # arrives instead of an answer. Also for a certificate from a CA it does not trust.
        for client in (None, (bad_cert, bad_key)):
            with pytest.raises(ssl.SSLError, match="alert"):
                answer = await _https_get(port, context(client))
                pytest.fail(f"answered without a valid client certificate: {answer[:100]!r}")


# ---------------------------------------------------------------- pulls that must fail


async def test_pull_rejects_a_blob_that_does_not_match_its_digest(tmp_path: Path) -> None:
    image = build_oci_layout(tmp_path / "image")
    blobs = tmp_path / "image" / "blobs" / "sha256"
    tampered = image.blob_digests[1]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        path = head.split(" ")[1]
        if "/manifests/" in path:
            assert all(t in head for t in MANIFEST_MEDIA_TYPES)
            body, kind = image.manifest, image.manifest_media_type
        else:
            digest = path.rsplit("/", 1)[1]
            body = (blobs / digest.removeprefix("sha256:")).read_bytes()
            kind = "application/octet-stream"
            if digest == tampered:
                body = body[:-1] + bytes([body[-1] ^ 1])
        writer.write(f"HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\n"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()

    async with local_server(serve) as port:
        with pytest.raises(PullFailed) as mismatch:
            await pull_image(f"http://127.0.0.1:{port}", "demo/hello", "1.0")
    assert "digest mismatch" in str(mismatch.value)
    assert tampered in str(mismatch.value)
    assert f"http://127.0.0.1:{port}/v2/demo/hello/blobs/{tampered}" in str(mismatch.value)


async def test_pull_without_a_listener_fails_with_no_status() -> None:
    port = free_port("127.0.0.1")
    with pytest.raises(PullFailed) as refused:
        await pull_image(f"http://127.0.0.1:{port}", "demo/hello", "1.0")
    assert refused.value.status is None
    assert refused.value.what == "manifest"
    assert str(port) in str(refused.value)


# ---------------------------------------------------------------- the HTTP client


def _scripted(parts: list[bytes], requests: list[bytes] | None = None) -> Handler:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if requests is not None:
            requests.append(head)
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0)
        writer.close()
    return answer


async def test_http_request_reads_chunked_bodies() -> None:
    parts = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
             b"5\r\nhello\r\n", b"7;ext=1\r\n, world\r\n", b"A\r\n0123456789\r\n",
             b"0\r\nTrailer: yes\r\n\r\n"]
    requests: list[bytes] = []
    async with local_server(_scripted(parts, requests)) as port:
        response = await http_request(f"http://127.0.0.1:{port}/v2/x?y=1",
                                      headers={"Accept": "text/plain"})
    assert response.status == 200
    assert response.body == b"hello, world0123456789"
    assert response.headers["x-a"] == "1, 2"
    assert requests[0].startswith(b"GET /v2/x?y=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{port}\r\n".encode() in requests[0]
    assert b"Accept: text/plain\r\n" in requests[0]
    assert b"Connection: close\r\n" in requests[0]


async def test_http_request_reads_length_and_close_delimited_bodies() -> None:
    interim = [b"HTTP/1.1 100 Continue\r\n\r\n",
               b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nabcEXTRA"]
    async with local_server(_scripted(interim)) as port:
        response = await http_request(f"http://127.0.0.1:{port}/", "PUT", body=b"data")
    assert (response.status, response.body) == (201, b"abc")

    async with local_server(_scripted([b"HTTP/1.0 404 Not Found\r\n\r\n", b"gone"])) as port:
        response = await http_request(f"http://127.0.0.1:{port}/")
    assert (response.status, response.body) == (404, b"gone")


async def test_http_request_over_ipv6() -> None:
    if not _ipv6_loopback():
        pytest.skip("this host has no IPv6 loopback (::1 cannot be bound)")
    requests: list[bytes] = []
    parts = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    async with local_server(_scripted(parts, requests), host="::1") as port:
        response = await http_request(f"http://[::1]:{port}/v2/")
    assert response.body == b"ok"
    assert f"Host: [::1]:{port}\r\n".encode() in requests[0]


@pytest.mark.parametrize("parts", [
    [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"],
    [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
    [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"],
    [b"SSH-2.0-OpenSSH\r\n\r\n"],
    [],
])
async def test_http_request_rejects_broken_answers(parts: list[bytes]) -> None:
    async with local_server(_scripted(parts)) as port:
        with pytest.raises(BadHttpResponse):
            await http_request(f"http://127.0.0.1:{port}/")


async def test_http_request_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async with local_server(silent) as port:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await http_request(f"http://127.0.0.1:{port}/", timeout=0.2)
        assert time.monotonic() - started < 2


def test_oci_image_is_frozen(tmp_path: Path) -> None:
    image: OciImage = build_oci_layout(tmp_path)
    with pytest.raises(AttributeError):
        image.tag = "other"  # type: ignore[misc]

"""deploy/envoy/*.yaml run for real: pull through the node proxy, mTLS to the registry side,
SPIFFE ID pinning and RBAC. Only ports and the SDS socket path are rewritten.

Secrets come from the throwaway ``ScaffoldSds`` in test_envoy.py, fed by the builders; the
"registry" is a tiny HTTP server that echoes what it was asked.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.demo.chain import free_port
from agent.model import X509Svid
from agent.sds.names import SdsNames
from agent.sds.resources import pem_certificates, pem_private_key, select_secrets
from agent.sds.resources import use_spiffe_validator as use_spiffe
from tests.envoyproc import EnvoyProcess
from tests.sds.conftest import LOCAL_TD, Pki
from tests.sds.pki import make_svid
from tests.sds.test_envoy import ScaffoldSds, serve

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "envoy"
PROXY_ID = f"spiffe://{LOCAL_TD}/ns/zarf/sa/registry-proxy"
REGISTRY_ID = f"spiffe://{LOCAL_TD}/ns/zarf/sa/zarf-registry"
CI_ID = f"spiffe://{LOCAL_TD}/ns/ci/sa/image-publisher"
SOCKET_IN_CONFIG = "/run/spiffe-delegate/sds.sock"


def rewrite(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the deploy config"
        text = text.replace(old, new)
    return text


async def echo_registry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One HTTP/1.1 request -> 200 with a JSON echo of method, path and the caller's XFCC."""
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        request_line, *header_lines = head.split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in header_lines if line)}
        if int(headers.get("content-length", "0")):
            await reader.readexactly(int(headers["content-length"]))
        body = json.dumps({"method": method, "path": path,
                           "xfcc": headers.get("x-forwarded-client-cert", "")}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
    finally:
        writer.close()


def plain_http(method: str, url: str) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method,
                                     data=b"" if method in ("POST", "PUT", "PATCH") else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def mtls_request(port: int, method: str, path: str, svid: X509Svid, ca_der: bytes,
                 workdir: Path) -> tuple[int, str]:
    """A direct mTLS client of the registry side presenting ``svid``."""
    cert_file, key_file = workdir / f"{id(svid)}.crt", workdir / f"{id(svid)}.key"
    cert_file.write_bytes(pem_certificates(svid.cert_chain))
    key_file.write_bytes(pem_private_key(svid.private_key))
    key_file.chmod(0o600)
    context = ssl.create_default_context(cadata=pem_certificates([ca_der]).decode())
    context.check_hostname = False  # SVIDs carry a URI SAN, no DNS name
    context.load_cert_chain(cert_file, key_file)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request(method, path, body=b"" if method == "POST" else None)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


async def test_pull_through_node_proxy_with_pinning_and_rbac(
        pki: Pki, tmp_path: Path, envoy_factory: Callable[..., EnvoyProcess]) -> None:
    proxy_svid = make_svid(pki.local, PROXY_ID)
    registry_svid = make_svid(pki.local, REGISTRY_ID)
    impostor = make_svid(pki.local, f"spiffe://{LOCAL_TD}/ns/evil/sa/impostor")
    registry_side: dict[str, X509Svid] = {"svid": impostor}

    def build(names: Sequence[str], node: Any) -> Iterable[Any]:
        mine = proxy_svid if node.id == "registry-proxy" else registry_side["svid"]
        return select_secrets(names, [mine], pki.bundles, LOCAL_TD,
                              spiffe_validator=use_spiffe(node, SdsNames())).secrets

    scaffold = ScaffoldSds(build)
    sds_socket = tmp_path / "sds.sock"
    server = await serve(scaffold, sds_socket)
    registry = await asyncio.start_server(echo_registry, "127.0.0.1", 0)
    registry_port = registry.sockets[0].getsockname()[1]
    proxy_port, mtls_port = free_port(), free_port()
    envoys: list[EnvoyProcess] = []
    try:
        side = envoy_factory(rewrite((DEPLOY / "registry-side.yaml").read_text(), {
            SOCKET_IN_CONFIG: str(sds_socket),
            'address: "::", port_value: 5443, ipv4_compat: true':
            f"address: 127.0.0.1, port_value: {mtls_port}",
            "port_value: 5001": f"port_value: {registry_port}",
            "port_value: 9902": "port_value: 0",
        }))
        proxy = envoy_factory(rewrite((DEPLOY / "node-proxy.yaml").read_text(), {
            SOCKET_IN_CONFIG: str(sds_socket),
            "port_value: 5000": f"port_value: {proxy_port}",
            "address: zarf-docker-registry.zarf.svc.cluster.local, port_value: 5443":
                f"address: 127.0.0.1, port_value: {mtls_port}",
            "port_value: 9901": "port_value: 0",
        }))
        envoys = [side, proxy]
        await asyncio.gather(side.astart(), proxy.astart())
        for envoy in (side, proxy):
            await envoy.await_until(
                lambda e: e.sds_counter("default", "update_success") >= 1
                and e.sds_counter("ALL", "update_success") >= 1, what="default and ALL")

        # The registry side presents the wrong SPIFFE ID: the node proxy refuses it.
        status, body = await asyncio.to_thread(plain_http, "GET", f"http://127.0.0.1:{proxy_port}/v2/")
        if status != 503:
            raise proxy.fail(f"an unpinned registry was accepted: {status} {body}")

        registry_side["svid"] = registry_svid
        scaffold.push()
        await side.await_until(
            lambda e: any(REGISTRY_ID in c.uris for c in e.certs().chain_certs),
            what="the registry SVID on the registry side")

        for host in ("127.0.0.1", "[::1]"):
            status, body = await asyncio.to_thread(plain_http, "GET", f"http://{host}:{proxy_port}/v2/")
            if status != 200:
                raise proxy.fail(f"pull via {host} failed: {status} {body}" + side.log_tail())
            echoed = json.loads(body)
            assert (echoed["method"], echoed["path"]) == ("GET", "/v2/")
            assert f"URI={PROXY_ID}" in echoed["xfcc"]
        status, _ = await asyncio.to_thread(
            plain_http, "HEAD", f"http://127.0.0.1:{proxy_port}/v2/library/app/manifests/1.0")
        assert status == 200

        # Node proxies may not push, nor read outside /v2/.
        status, body = await asyncio.to_thread(
            plain_http, "POST", f"http://127.0.0.1:{proxy_port}/v2/library/app/blobs/uploads/")
        assert status == 403, body
        status, body = await asyncio.to_thread(plain_http, "GET", f"http://127.0.0.1:{proxy_port}/debug")
        assert status == 403, body

        # CI may do anything; someone else nothing; no client certificate: no TLS at all.
        ci = make_svid(pki.local, CI_ID)
        status, body = await asyncio.to_thread(
            mtls_request, mtls_port, "POST", "/v2/library/app/blobs/uploads/", ci,
            pki.local.der, tmp_path)
        assert status == 200 and f"URI={CI_ID}" in json.loads(body)["xfcc"]
        status, _ = await asyncio.to_thread(
            mtls_request, mtls_port, "GET", "/v2/", impostor, pki.local.der, tmp_path)
        assert status == 403
        stranger_ca_svid = make_svid(pki.federated, f"spiffe://{LOCAL_TD}/ns/ci/sa/image-publisher")
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            await asyncio.to_thread(mtls_request, mtls_port, "GET", "/v2/", stranger_ca_svid,
                                    pki.local.der, tmp_path)
    finally:
        for envoy in envoys:
            envoy.stop()
        registry.close()
        await server.stop(grace=1)


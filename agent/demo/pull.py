"""A small HTTP/1.1 client over asyncio streams, and registry pulls that verify every digest."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from agent.demo.errors import BadHttpResponse, PullFailed
from agent.demo.image import REPOSITORY, TAG

MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
USER_AGENT = "spiffe-delegate-demo"
MAX_HEADERS = 200
MAX_REDIRECTS = 5
EXCERPT = 200  # bytes of an error body quoted in PullFailed

_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HEX = re.compile(r"[0-9A-Fa-f]{1,16}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class HttpResponse:
    """An HTTP answer; header names are lower-case, repeated headers joined with ", "."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class PullResult:
    manifest_digest: str  # sha256 of the manifest bytes as served
    bytes_read: int  # manifest and blob bodies
    requests: int  # HTTP requests made, redirects included


async def http_request(url: str, method: str = "GET", *,
                       headers: Mapping[str, str] | None = None, body: bytes | None = None,
                       timeout: float = 10.0) -> HttpResponse:  # noqa: ASYNC109
    """One HTTP/1.1 request over a fresh connection (``Connection: close``).

    Only ``http://`` URLs; IPv6 literals as ``http://[::1]:5000/``. Reads Content-Length,
    chunked and read-until-close bodies. Raises OSError when it cannot connect or the
    connection breaks, TimeoutError after ``timeout`` seconds in all, and BadHttpResponse
    when the answer is not HTTP.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"unsupported URL {url!r}: only http://host[:port]/path is supported")
    try:
        port = parts.port or 80
    except ValueError as error:
        raise ValueError(f"invalid port in URL {url!r}") from error
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = _request_head(method, target, parts.netloc, headers or {}, body) + (body or b"")

    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(parts.hostname, port)
        try:
            writer.write(request)
            await writer.drain()
            return await _read_response(reader, method)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def pull_image(base_url: str, repository: str, tag: str, *,
                     timeout: float = 10.0) -> PullResult:  # noqa: ASYNC109
    """Pulls ``repository:tag`` (a tag or a ``sha256:`` digest) from the registry at
    ``base_url`` like a container runtime does: the manifest, then its config and layers,
    checking each against its digest. ``timeout`` bounds the whole pull.

    Raises PullFailed on any non-2xx answer, digest or size mismatch, unusable manifest,
    connection error or timeout.
    """
    if not REPOSITORY.fullmatch(repository):
        raise ValueError(f"invalid repository name {repository!r}")
    if not (TAG.fullmatch(tag) or _SHA256_DIGEST.fullmatch(tag)):
        raise ValueError(f"invalid tag {tag!r}: expected a tag or a sha256: digest")
    deadline = time.monotonic() + timeout
    requests = 0

    async def fetch(what: str, url: str, accept: str | None = None) -> HttpResponse:
        nonlocal requests
        for _ in range(MAX_REDIRECTS + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PullFailed(None, what, url=url, detail=f"timed out after {timeout:g}s")
            requests += 1
            try:
                response = await http_request(
                    url, headers={"Accept": accept} if accept else None, timeout=remaining)
            except TimeoutError:
                raise PullFailed(None, what, url=url,
                                 detail=f"timed out after {timeout:g}s") from None
            except (OSError, BadHttpResponse) as error:
                raise PullFailed(None, what, url=url, detail=str(error) or repr(error),
                                 hint="is the registry or its proxy listening there?") from error
            location = response.headers.get("location")
            if response.status in _REDIRECTS and location:
                url = urljoin(url, location)
                if not url.startswith("http://"):
                    raise PullFailed(response.status, what, url=url,
                                     detail="redirected to a URL this client cannot follow")
                continue
            if not 200 <= response.status < 300:
                raise PullFailed(response.status, what, url=url, detail=_excerpt(response.body),
                                 hint=_hint(response.status))
            return response
        raise PullFailed(None, what, url=url, detail=f"more than {MAX_REDIRECTS} redirects")

    base = base_url.rstrip("/")
    manifest_url = f"{base}/v2/{repository}/manifests/{tag}"
    response = await fetch("manifest", manifest_url, accept=", ".join(MANIFEST_MEDIA_TYPES))
    manifest_digest = _sha256(response.body)
    served = response.headers.get("docker-content-digest")
    expected = tag if tag.startswith("sha256:") else served
    if expected is not None and expected != manifest_digest:
        raise PullFailed(response.status, "manifest", url=manifest_url,
                         detail=f"digest mismatch: expected {expected}, got {manifest_digest}")
    bytes_read = len(response.body)

    for what, digest, size in _blobs(response, manifest_url):
        blob_url = f"{base}/v2/{repository}/blobs/{digest}"
        blob = await fetch(what, blob_url)
        bytes_read += len(blob.body)
        actual = _sha256(blob.body)
        if actual != digest:
            raise PullFailed(blob.status, what, url=blob_url,
                             detail=f"digest mismatch: got {actual}")
        if size is not None and size != len(blob.body):
            raise PullFailed(blob.status, what, url=blob_url,
                             detail=f"size mismatch: expected {size} bytes, got {len(blob.body)}")
    return PullResult(manifest_digest=manifest_digest, bytes_read=bytes_read, requests=requests)


def _blobs(response: HttpResponse, url: str) -> list[tuple[str, str, int | None]]:
    """(what, digest, size) of the config and each layer a manifest names."""
    def unusable(why: str) -> PullFailed:
        return PullFailed(response.status, "manifest", url=url, detail=f"unusable manifest: {why}")

    try:
        document = json.loads(response.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise unusable(f"not JSON ({error})") from None
    if not isinstance(document, dict) or document.get("schemaVersion") != 2:
        raise unusable("not a schema 2 image manifest")
    media_type = document.get("mediaType") or response.headers.get("content-type", "")
    if media_type.split(";")[0].strip() not in MANIFEST_MEDIA_TYPES:
        raise unusable(f"media type {media_type!r} is not an image manifest")
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise unusable("no layer list")
    blobs = []
    for index, descriptor in enumerate([document.get("config"), *layers]):
        what = "config" if index == 0 else f"layer {index}"
        if not isinstance(descriptor, dict):
            raise unusable(f"{what} is not a descriptor")
        digest: Any = descriptor.get("digest")
        size: Any = descriptor.get("size")
        if not isinstance(digest, str) or not _SHA256_DIGEST.fullmatch(digest):
            raise unusable(f"{what} digest {digest!r} is not sha256:<64 hex digits>")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise unusable(f"{what} size {size!r} is not a byte count")
        blobs.append((f"{what} {digest}", digest, size))
    return blobs


def _request_head(method: str, target: str, host: str, headers: Mapping[str, str],
                  body: bytes | None) -> bytes:
    if not _TOKEN.fullmatch(method):
        raise ValueError(f"invalid HTTP method {method!r}")
    fields: dict[str, tuple[str, str]] = {}  # lower-case name -> (name, value)
    defaults = {"Host": host, "User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    for name, value in {**defaults, **headers}.items():
        if not _TOKEN.fullmatch(name) or any(c in value for c in "\r\n\0"):
            raise ValueError(f"invalid HTTP header {name!r}: {value!r}")
        fields[name.lower()] = (name, value)
    # This client owns the framing: one request per connection, body length stated.
    for owned in ("connection", "content-length", "transfer-encoding"):
        fields.pop(owned, None)
    fields["connection"] = ("Connection", "close")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        fields["content-length"] = ("Content-Length", str(len(body or b"")))
    lines = [f"{method} {target} HTTP/1.1", *(f"{n}: {v}" for n, v in fields.values())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _read_response(reader: asyncio.StreamReader, method: str) -> HttpResponse:
    while True:
        status_line = await _read_line(reader)
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not (code.isdigit() and len(code) == 3):
            raise BadHttpResponse(f"not an HTTP/1.x status line: {status_line[:100]!r}")
        status = int(code)
        headers = await _read_headers(reader)
        if not 100 <= status < 200 or status == 101:
            break  # interim answers (100 Continue, 103 Early Hints) precede the real one
    if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return HttpResponse(status, headers)
    transfer_encoding = headers.get("transfer-encoding", "").lower()
    if transfer_encoding:
        if transfer_encoding.split(",")[-1].strip() != "chunked":
            raise BadHttpResponse(f"unsupported Transfer-Encoding {transfer_encoding!r}")
        return HttpResponse(status, headers, await _read_chunked(reader))
    length = headers.get("content-length")
    if length is not None:
        values = {value.strip() for value in length.split(",")}
        if len(values) != 1 or not (size := values.pop()).isdigit():
            raise BadHttpResponse(f"invalid Content-Length {length!r}")
        try:
            return HttpResponse(status, headers, await reader.readexactly(int(size)))
        except asyncio.IncompleteReadError as error:
            raise BadHttpResponse(f"connection closed after {len(error.partial)} of {size} "
                                  "body bytes") from None
    return HttpResponse(status, headers, await reader.read())


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    try:
        while True:
            size_line = await _read_line(reader)
            size_text = size_line.split(";", 1)[0].strip()  # chunk extensions are ignored
            if not _HEX.fullmatch(size_text):
                raise BadHttpResponse(f"invalid chunk size {size_line[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                await _read_headers(reader)  # trailers, dropped
                return bytes(body)
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise BadHttpResponse("chunk not followed by CRLF")
    except asyncio.IncompleteReadError:
        raise BadHttpResponse(f"connection closed inside a chunked body after {len(body)} "
                              "bytes") from None


async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS):
        line = await _read_line(reader)
        if not line:
            return headers
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadHttpResponse(f"malformed header line {line[:100]!r}")
        key, value = name.lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    raise BadHttpResponse(f"more than {MAX_HEADERS} header lines")


async def _read_line(reader: asyncio.StreamReader) -> str:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as error:
        if not error.partial:
            raise BadHttpResponse("connection closed before a complete answer") from None
        raise BadHttpResponse(f"connection closed mid-line: {error.partial[:100]!r}") from None
    except asyncio.LimitOverrunError:
        raise BadHttpResponse("line too long in the answer's head") from None
    return line.rstrip(b"\r\n").decode("latin-1")


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _excerpt(body: bytes) -> str:
    text = body[:EXCERPT].decode("utf-8", errors="replace").strip()
    return text + ("..." if len(body) > EXCERPT else "") if text else "(empty body)"


def _hint(status: int) -> str:
    if status in (401, 403):
        return "the registry or a proxy in front of it refused the request"
    if status == 404:
        return "was the image pushed to this repository and tag?"
    if status in (502, 503, 504):
        return "the proxy could not reach the registry behind it"
    return ""

"""Pushing a demo image from an OCI layout to a registry with skopeo."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent.demo.errors import DemoDependencyMissing, PushFailed
from agent.demo.image import REPOSITORY, OciImage

SKOPEO_PROGRAM = "skopeo"
STDERR_LINES = 5  # how much of skopeo's complaint goes into PushFailed's message

# The registry part of a docker:// reference: [IPv6]:port, or a host and an optional port.
_REGISTRY = re.compile(r"\[[0-9A-Fa-f:.%]+\]:\d{1,5}|[A-Za-z0-9.-]+(?::\d{1,5})?")
_IPV6_LITERAL = re.compile(r"\[([0-9A-Fa-f:.%]+)\]:(\d{1,5})")
# How containers/image words an HTTP status, e.g. "StatusCode: 403", "status code 403",
# "unexpected http code: 403", "received unexpected HTTP status: 403 Forbidden",
# "invalid status code from registry 403 (Forbidden)".
_STATUS = re.compile(r"(?:status ?code|http code|http status|from registry)\b[^0-9\n]{0,12}"
                     r"\b([1-5]\d\d)\b", re.IGNORECASE)
_DENIED = re.compile(r"\b(?:403|401)\b|(?<!permission )\bdenied\b|\bunauthorized\b|\bforbidden\b",
                     re.IGNORECASE)
# skopeo logs as logrus text: time="..." level=fatal msg="the part worth reading"
_LOGRUS_MSG = re.compile(r'^time="[^"]*" level=\w+ msg="((?:[^"\\]|\\.)*)"')


def skopeo_binary() -> Path:
    """Where ``skopeo`` is, from PATH."""
    found = shutil.which(SKOPEO_PROGRAM)
    if found is None:
        raise DemoDependencyMissing(f"{SKOPEO_PROGRAM!r} is not on PATH",
                                    "install it with `apt-get install skopeo`")
    return Path(found)


def push_argv(image: OciImage, registry: str, repository: str, *,
              tls_verify: bool = False) -> list[str]:
    """skopeo's command line that copies ``image`` to ``registry/repository:tag``."""
    if not _REGISTRY.fullmatch(registry):
        raise ValueError(f"invalid registry {registry!r}: expected host:port, e.g. "
                         "127.0.0.1:5000 or [::1]:5000")
    if not REPOSITORY.fullmatch(repository):
        raise ValueError(f"invalid repository name {repository!r}: lower-case letters, digits "
                         "and separators ('.', '_', '-', '/') only")
    if ":" in str(image.layout):
        # skopeo splits oci:PATH:TAG at the first ':'; such a path cannot be named.
        raise ValueError(f"the OCI layout path {str(image.layout)!r} contains ':', which "
                         "skopeo's oci: transport cannot express")
    return [
        str(skopeo_binary()), "--insecure-policy", "copy",
        f"--dest-tls-verify={'true' if tls_verify else 'false'}",
        f"oci:{image.layout}:{image.tag}",
        f"docker://{registry}/{repository}:{image.tag}",
    ]


async def push_image(image: OciImage, registry: str, repository: str, *,
                     tls_verify: bool = False, timeout: float = 60.0) -> None:  # noqa: ASYNC109
    """Pushes ``image`` to ``docker://registry/repository:tag`` with skopeo.

    ``registry`` is ``127.0.0.1:PORT`` or ``[::1]:PORT``. Without ``tls_verify`` skopeo
    also falls back to plain HTTP, which a plain-HTTP registry needs. skopeo is killed if the
    push takes longer than ``timeout`` seconds or the caller is cancelled.

    skopeo 1.9's reference grammar has no IPv6 literals, so for ``[addr]:PORT`` skopeo is
    pointed at a relay on 127.0.0.1 that this call runs for the push's duration and that
    forwards each connection to ``[addr]:PORT``; the registry (or proxy) is still reached
    over IPv6, but sees the relay's address in the Host header, and with ``tls_verify`` the
    certificate must name 127.0.0.1.
    """
    push_argv(image, registry, repository, tls_verify=tls_verify)  # reject bad input first
    destination = f"{registry}/{repository}:{image.tag}"
    relay_errors: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        via = registry
        literal = _IPV6_LITERAL.fullmatch(registry)
        if literal is not None:
            relay = _relay(literal.group(1), int(literal.group(2)), relay_errors)
            via = f"127.0.0.1:{await stack.enter_async_context(relay)}"
        argv = push_argv(image, via, repository, tls_verify=tls_verify)
        returncode, stderr = await _run(argv, timeout, destination)
    if returncode == 0:
        return
    failure = push_failure(destination, returncode, stderr.replace(via, registry))
    if relay_errors:
        failure.message += f" (relay to {registry}: {relay_errors[-1]})"
    raise failure


async def _run(argv: list[str], limit: float, destination: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        try:
            async with asyncio.timeout(limit):  # not wait_for: see agent/devspire/server.py
                _, stderr = await process.communicate()
        except TimeoutError:
            raise PushFailed(f"pushing to {destination} took longer than {limit:g}s",
                             "is the registry (or the proxy in front of it) answering?") from None
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            # Shielded so that a second cancellation still leaves no zombie behind.
            await asyncio.shield(process.wait())
    returncode = process.returncode
    assert returncode is not None  # communicate() returned, so skopeo has exited
    return returncode, stderr.decode(errors="replace")


@contextlib.asynccontextmanager
async def _relay(host: str, port: int, errors: list[str]) -> AsyncIterator[int]:
    """A TCP forwarder from an ephemeral 127.0.0.1 port to host:port; yields that port."""
    connections: set[asyncio.Task[Any]] = set()

    async def forward(client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
            except OSError as error:
                reason = os.strerror(error.errno) if error.errno else str(error)
                errors.append(f"cannot connect: {reason}")
                return
            try:
                await asyncio.gather(_pipe(client_reader, upstream_writer),
                                     _pipe(upstream_reader, client_writer),
                                     return_exceptions=True)
            finally:
                upstream_writer.close()
        finally:
            client_writer.close()
            connections.discard(task)

    server = await asyncio.start_server(forward, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


def push_failure(destination: str, returncode: int, stderr: str) -> PushFailed:
    """The PushFailed that skopeo's exit status and stderr describe."""
    lines = [_readable(line) for line in stderr.splitlines() if line.strip()]
    tail = "; ".join(lines[-STDERR_LINES:]) or f"no output, exit status {returncode}"
    statuses = [int(found) for found in _STATUS.findall(stderr)]
    status = statuses[-1] if statuses else None
    denied = status in (401, 403) or bool(_DENIED.search(stderr))
    hint = ("the registry or a proxy in front of it refused the push; check its access policy"
            if denied else "is the registry running and reachable at that address?")
    message = f"skopeo could not push to {destination}"
    if status is not None:
        message += f" (HTTP {status})"
    return PushFailed(f"{message}: {tail}", hint, denied=denied, status=status, stderr=stderr)


def _readable(line: str) -> str:
    found = _LOGRUS_MSG.match(line.strip())
    if found is None:
        return line.strip()
    return found.group(1).replace('\\"', '"').replace("\\\\", "\\")

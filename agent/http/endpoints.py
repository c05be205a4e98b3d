"""The agent's HTTP endpoints: /healthz, /readyz and /status on --health-address, /metrics on
--metrics-address (plain, or mutual TLS from the agent's own SVID or from files)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from agent.config import AgentSettings, HostPort
from agent.http.readiness import ReadinessProbe
from agent.http.server import HttpLimits, HttpServer, Request, Response, TlsSource
from agent.http.tls import FileTls, PeerIdAuthorizer, SpiffeTls
from agent.metrics import render
from agent.model import X509Bundles, X509SvidUpdate
from agent.spire.client import DelegatedIdentityClient

__all__ = ["Endpoints", "SdsSocket", "sds_socket_problem"]

_LOG = logging.getLogger("spiffe_delegate.http")


class SdsSocket(Protocol):
    """What readiness needs of the SDS server (:class:`agent.sds.server.SdsServer`)."""

    @property
    def socket_path(self) -> Path: ...

    @property
    def listening(self) -> bool: ...


def sds_socket_problem(sds: SdsSocket) -> str | None:
    """Why Envoy could not connect to the SDS socket now, or None."""
    path = sds.socket_path
    if not sds.listening:
        return f"not listening on {path}"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"the socket file {path} was removed; restart the agent to recreate it"
    except OSError as exc:
        return f"cannot stat {path}: {exc.strerror or exc}"
    if not stat.S_ISSOCK(mode):
        return f"{path} is no longer a socket; restart the agent to recreate it"
    return None


def _healthz(_: Request) -> Response:
    # Answering at all proves the event loop runs; nothing else is checked on purpose
    # (a liveness probe that fails on SPIRE outages would restart a healthy agent).
    return Response.text(HTTPStatus.OK, "ok")


class Endpoints:
    """Both servers of one agent. Construction validates the settings (ConfigError);
    ``start`` loads TLS files and binds (ConfigError naming the flag); ``close`` stops."""

    def __init__(self, settings: AgentSettings, *, client: DelegatedIdentityClient,
                 sds: SdsSocket, registry: CollectorRegistry,
                 limits: HttpLimits | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 status: Callable[[], Mapping[str, Any]] | None = None) -> None:
        tls_settings = settings.metrics_tls
        tls_settings.validate(settings.trust_domain)
        self._settings = settings
        self._registry = registry
        self._status_source = status
        self.readiness = ReadinessProbe(
            sds_problem=lambda: sds_socket_problem(sds), spire_status=lambda: client.status,
            spire_timeout=settings.ready_spire_timeout, clock=clock)
        self.spiffe_tls: SpiffeTls | None = None
        self.file_tls: FileTls | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.health: HttpServer | None = None
        self.metrics: HttpServer | None = None
        if settings.health_address is not None:
            routes = {"/healthz": _healthz, "/readyz": self._readyz}
            if status is not None:
                routes["/status"] = self._status
            self.health = HttpServer(
                settings.health_address, routes,
                flag="--health-address", name="/healthz and /readyz", limits=limits)
        if settings.metrics_address is not None:
            tls: TlsSource | None = None
            if tls_settings.mode == "spiffe":
                tls = self.spiffe_tls = SpiffeTls()
            elif tls_settings.mode == "files":
                assert tls_settings.cert_file and tls_settings.key_file
                assert tls_settings.client_ca_file
                tls = self.file_tls = FileTls(tls_settings.cert_file, tls_settings.key_file,
                                              tls_settings.client_ca_file,
                                              reload_interval=tls_settings.reload_interval)
            authorize = (PeerIdAuthorizer(tls_settings.allowed_ids)
                         if tls is not None and tls_settings.allowed_ids else None)
            self.metrics = HttpServer(settings.metrics_address, {"/metrics": self._metrics},
                                      flag="--metrics-address", name="/metrics", tls=tls,
                                      authorize=authorize, limits=limits)

    @property
    def health_address(self) -> HostPort | None:
        return self.health.address if self.health is not None else None

    @property
    def metrics_address(self) -> HostPort | None:
        return self.metrics.address if self.metrics is not None else None

    def own_identity_changed(self, update: X509SvidUpdate, bundles: X509Bundles | None) -> None:
        """The agent's own accepted SVIDs or the bundles changed (spiffe mode's material)."""
        if self.spiffe_tls is not None:
            self.spiffe_tls.update(update, bundles)

    async def start(self, *, follows_own_identity: bool = True) -> None:
        try:
            if self.file_tls is not None:
                self.file_tls.load()
            for server in (self.health, self.metrics):
                if server is not None:
                    await server.start()
        except BaseException:
            await self.close()
            raise
        if self.file_tls is not None:
            self._tasks.append(asyncio.create_task(self.file_tls.watch(),
                                                   name="metrics-tls-files"))
        if self.spiffe_tls is not None and not follows_own_identity:
            _LOG.warning("--metrics-tls-mode spiffe needs the agent's own X.509-SVID, which "
                         "this agent does not follow; /metrics refuses every connection")
        if self.metrics is not None and self.metrics.scheme == "https":
            allowed = self._settings.metrics_tls.allowed_ids
            _LOG.info("/metrics requires a client certificate%s",
                      f"; allowed SPIFFE IDs: {', '.join(allowed)}" if allowed else "")
        for name, address in (("/healthz and /readyz", self._settings.health_address),
                              ("/metrics", self._settings.metrics_address)):
            if address is None:
                _LOG.info("%s: disabled (address off)", name)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for server in (self.health, self.metrics):
            if server is not None:
                await server.close()

    def _readyz(self, _: Request) -> Response:
        readiness = self.readiness.check()
        status = HTTPStatus.OK if readiness.ready else HTTPStatus.SERVICE_UNAVAILABLE
        return Response(status, readiness.to_json(), content_type="application/json")

    def _status(self, _: Request) -> Response:
        # What the agent holds (agent.admin.status: public facts only) and its readiness.
        assert self._status_source is not None
        body = {**self._status_source(), "readiness": dict(self.readiness.check().checks)}
        return Response(HTTPStatus.OK, json.dumps(body, indent=1).encode() + b"\n",
                        content_type="application/json")

    def _metrics(self, _: Request) -> Response:
        body, content_type = render(self._registry)
        return Response(HTTPStatus.OK, body, content_type=content_type)

"""A real Envoy for tests: start it, read its admin interface, stop it, keep its log.

Usage (sync)::

    with EnvoyProcess(sds_bootstrap(sock, tls_certificates=["default"]), tmp_path) as envoy:
        envoy.wait_until(lambda e: e.sds_counter("default", "update_success") > 0)
        print(envoy.certs().chain_serials, envoy.stats()["sds.default.update_rejected"])

Usage (async, when the SDS server runs on the same event loop: never block it)::

    envoy = EnvoyProcess(config, tmp_path)
    await envoy.astart()
    await envoy.await_until(lambda e: e.counter(...) > 0)   # admin calls run in a thread
    certs = await envoy.acall(envoy.certs)
    envoy.stop()

In pytest, import ``envoy_factory`` into a conftest.py: every Envoy it makes is stopped at
teardown. The binary is the real one (``envoy_binary()``), so ``user=`` works too.

Every failure message ends with the tail of Envoy's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.demo.envoy import CertDetails, CertsView
from agent.demo.envoy import envoy_binary as find_envoy_binary
from agent.demo.errors import DemoDependencyMissing

__all__ = [
    "CertDetails",
    "CertsView",
    "EnvoyProcess",
    "EnvoyStartError",
    "envoy_binary",
    "envoy_factory",
    "sds_bootstrap",
    "sds_config_source",
    "sds_stats_name",
    "validate_config",
]

_READY_TIMEOUT = 15.0
_counter = itertools.count()


def envoy_binary() -> Path:
    """The real Envoy binary (see :func:`agent.demo.envoy.envoy_binary`); skips the test
    when there is none."""
    try:
        return find_envoy_binary()
    except DemoDependencyMissing as exc:
        pytest.skip(str(exc))


def validate_config(config: Path | str | Mapping[str, Any], workdir: Path,
                    timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate -c FILE``; returns the finished process (check ``returncode``)."""
    path = _write_config(config, workdir, "validate")
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path),
         "--disable-hot-restart", "--use-dynamic-base-id", "-l", "warning"],
        capture_output=True, text=True, timeout=timeout, check=False)


def _whole_admin_api(config: str | Mapping[str, Any]) -> str | Mapping[str, Any]:
    """The config without ``admin.allow_paths``: the shipped configs allow only /ready and
    /stats/prometheus, and the harness reads /certs, /stats and /config_dump (the
    restriction itself is tested in tests/sds/test_envoy.py)."""
    document = yaml.safe_load(config) if isinstance(config, str) else config
    admin = document.get("admin") if isinstance(document, Mapping) else None
    if not isinstance(admin, Mapping) or "allow_paths" not in admin:
        return config
    return {**document, "admin": {k: v for k, v in admin.items() if k != "allow_paths"}}


def _write_config(config: Path | str | Mapping[str, Any], workdir: Path, stem: str,
                  *, whole_admin_api: bool = False) -> Path:
    if isinstance(config, Path):
        return config
    if whole_admin_api:
        config = _whole_admin_api(config)
    workdir.mkdir(parents=True, exist_ok=True)
    if isinstance(config, str):
        path = workdir / f"{stem}.yaml"
        path.write_text(config)
    else:
        path = workdir / f"{stem}.json"
        path.write_text(json.dumps(config, indent=1))
    return path


# --- /certs -----------------------------------------------------------------------------

# --- the process ------------------------------------------------------------------------

def stop_process(process: subprocess.Popen[Any] | None, timeout: float) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; the exit status (None if never started).
    Idempotent."""
    if process is None:
        return None
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout)
    return process.returncode


class EnvoyStartError(AssertionError):
    """Envoy exited or never became ready; the message carries its log tail."""


@dataclass
class EnvoyProcess:
    """One Envoy process. Not started until ``start()``/``astart()``/``with``.

    ``config``: a bootstrap as a dict (written as JSON), YAML text, or a path.
    ``workdir``: where the config, the admin address file and ``envoy.log`` go (created).
    ``user``/``group``: run as that uid/gid (group defaults to the uid's number; no
    supplementary groups; the workdir is handed over to it, and it and its parents must be
    reachable by that uid). This needs the real binary, not the venv wrapper.
    ``preexec_fn`` runs in the child before exec (e.g. to join a cgroup); ``cwd`` defaults
    to ``workdir``; ``extra_args`` go on Envoy's command line.
    """

    config: Path | str | Mapping[str, Any]
    workdir: Path
    user: int | None = None
    group: int | None = None
    preexec_fn: Callable[[], None] | None = None
    cwd: Path | None = None
    binary: Path | None = None
    log_level: str = "info"
    component_log_level: str | None = None
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    admin_address: str = field(default="", init=False)

    # --- life cycle ---

    @property
    def log_path(self) -> Path:
        return self.workdir / "envoy.log"

    @property
    def admin_url(self) -> str:
        if not self.admin_address:
            raise EnvoyStartError("Envoy's admin address is not known yet" + self._tail())
        return f"http://{self.admin_address}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "Envoy was not started"
        return self.process.pid

    def launch(self) -> None:
        """Starts the process and returns at once (no waiting)."""
        if self.process is not None:
            raise RuntimeError("this Envoy was already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = _write_config(self.config, self.workdir, "bootstrap",
                                    whole_admin_api=True)
        address_file = self.workdir / "admin-address"
        address_file.unlink(missing_ok=True)
        if self.user is not None:
            self._hand_over(config_path)
        args = [str(self.binary or envoy_binary()), "-c", str(config_path),
                "--disable-hot-restart", "--concurrency", "1", "--use-dynamic-base-id",
                "--admin-address-path", str(address_file), "-l", self.log_level,
                *(["--component-log-level", self.component_log_level]
                  if self.component_log_level else []),
                *self.extra_args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=str(self.cwd or self.workdir), env=dict(self.env) if self.env else None,
                user=self.user, group=self._gid(),
                extra_groups=[] if self.user is not None else None,
                preexec_fn=self.preexec_fn, start_new_session=True)

    def _gid(self) -> int | None:
        """The group to run as: ``group``, else the uid's number (as ``setpriv --regid``)."""
        return self.group if self.group is not None else self.user

    def _hand_over(self, config_path: Path) -> None:
        gid = self._gid()
        for path in (self.workdir, config_path):
            os.chown(path, self.user if self.user is not None else -1,
                     gid if gid is not None else -1)
        self.workdir.chmod(0o755)

    def _admin_step(self) -> bool:
        """One poll: True once the admin address is known. Raises if Envoy died."""
        self._check_alive()
        if not self.admin_address:
            address_file = self.workdir / "admin-address"
            with contextlib.suppress(FileNotFoundError):
                text = address_file.read_text().strip()
                if text:
                    self.admin_address = text
        return bool(self.admin_address)

    def _ready_step(self) -> bool:
        if not self._admin_step():
            return False
        try:
            return self.get("/ready").strip() == "LIVE"
        except (OSError, urllib.error.URLError):
            return False

    def start(self, wait_ready: bool = True, timeout: float = _READY_TIMEOUT) -> EnvoyProcess:
        self.launch()
        self._poll(self._ready_step if wait_ready else self._admin_step, timeout,
                   "Envoy to be ready (/ready = LIVE)" if wait_ready else "Envoy's admin address")
        return self

    async def astart(self, wait_ready: bool = True,
                     timeout: float = _READY_TIMEOUT) -> EnvoyProcess:  # noqa: ASYNC109
        """``start`` without blocking the event loop (admin polls run in a thread)."""
        self.launch()
        step = self._ready_step if wait_ready else self._admin_step
        await self._apoll(lambda: asyncio.to_thread(step), timeout,
                          "Envoy to be ready (/ready = LIVE)" if wait_ready
                          else "Envoy's admin address")
        return self

    def _check_alive(self) -> None:
        if self.process is None:
            raise EnvoyStartError("Envoy was not started")
        code = self.process.poll()
        if code is not None:
            raise EnvoyStartError(f"Envoy exited with status {code}" + self._tail())

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status. Idempotent."""
        return stop_process(self.process, timeout)

    def __enter__(self) -> EnvoyProcess:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the log ---

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _tail(self) -> str:
        return f"\n--- last lines of {self.log_path} ---\n{self.log_tail()}"

    def fail(self, message: str) -> AssertionError:
        """An AssertionError carrying ``message`` and Envoy's log tail (raise it)."""
        return AssertionError(message + self._tail())

    # --- admin ---

    def get(self, path: str, timeout: float = 5.0) -> str:
        """GET an admin path; returns the body even on an HTTP error status (e.g. /ready 503)."""
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as response:
                body: bytes = response.read()
        except urllib.error.HTTPError as error:
            body = error.read()
        return body.decode(errors="replace")

    def post(self, path: str, timeout: float = 5.0) -> str:
        request = urllib.request.Request(self.admin_url + path, method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: bytes = response.read()
        return body.decode(errors="replace")

    def ready_state(self) -> str:
        return self.get("/ready").strip()

    def certs(self) -> CertsView:
        return CertsView.parse(json.loads(self.get("/certs")))

    def stats(self, filter_regex: str | None = None) -> dict[str, int | str]:
        """``/stats`` as a dict: counters and gauges as ints, anything else as text."""
        path = "/stats" + (f"?filter={urllib.parse.quote(filter_regex)}" if filter_regex
                           else "")
        out: dict[str, int | str] = {}
        for line in self.get(path).splitlines():
            name, sep, value = line.partition(": ")
            if not sep:
                continue
            value = value.strip()
            out[name] = int(value) if re.fullmatch(r"-?\d+", value) else value
        return out

    def sds_counter(self, secret_name: str, counter: str) -> int:
        """``sds.<secret>.<counter>``, e.g. ``sds_counter("ROOTCA", "update_success")``."""
        return self.counter(f"sds.{sds_stats_name(secret_name)}.{counter}")

    def counter(self, name: str) -> int:
        """One counter or gauge (0 when Envoy does not have it yet)."""
        value = self.stats(f"^{re.escape(name)}$").get(name, 0)
        return value if isinstance(value, int) else 0

    def config_dump(self, include_eds: bool = False,
                    resource: str | None = None) -> dict[str, Any]:
        query = []
        if include_eds:
            query.append("include_eds")
        if resource:
            query.append(f"resource={resource}")
        text = self.get("/config_dump" + ("?" + "&".join(query) if query else ""))
        document: dict[str, Any] = json.loads(text)
        return document

    def active_secrets(self) -> dict[str, dict[str, Any]]:
        """Name -> Secret (as JSON) of the dynamic secrets Envoy has accepted; Envoy redacts
        private keys in this dump."""
        out: dict[str, dict[str, Any]] = {}
        for config in self.config_dump().get("configs", []):
            if config.get("@type", "").endswith("SecretsConfigDump"):
                for entry in config.get("dynamic_active_secrets", []):
                    out[entry["name"]] = entry.get("secret", {})
        return out

    # --- waiting ---

    def _poll(self, step: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            if step():
                return
            if time.monotonic() > deadline:
                raise EnvoyStartError(f"timed out after {timeout}s waiting for {what}"
                                      + self._tail())
            time.sleep(delay)  # polling with a deadline: there is no event to wait on
            delay = min(delay * 2, 0.05)

    async def _apoll(self, step: Callable[[], Awaitable[bool]],
                     timeout: float, what: str) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            if await step():
                return
            if time.monotonic() > deadline:
                raise EnvoyStartError(f"timed out after {timeout}s waiting for {what}"
                                      + self._tail())
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def wait_until(self, condition: Callable[[EnvoyProcess], bool], timeout: float = 10.0,
                   what: str = "condition") -> None:
        """Polls ``condition(self)`` until true; fails with the log tail after ``timeout``."""
        def step() -> bool:
            self._check_alive()
            return condition(self)
        self._poll(step, timeout, what)

    async def await_until(self, condition: Callable[[EnvoyProcess], bool],
                          timeout: float = 10.0,  # noqa: ASYNC109
                          what: str = "condition") -> None:
        """``wait_until`` for async tests: each check runs in a thread."""
        def step() -> bool:
            self._check_alive()
            return condition(self)
        await self._apoll(lambda: asyncio.to_thread(step), timeout, what)

    async def acall(self, method: Callable[..., Any], *args: Any) -> Any:
        """Runs a blocking admin method (``envoy.certs`` ...) in a thread."""
        return await asyncio.to_thread(method, *args)


def sds_stats_name(secret_name: str) -> str:
    """How Envoy writes a secret name in ``sds.<name>.*`` stats (measured with 1.40: a colon
    and up to two slashes after it become ``_``: ``spiffe://a/b`` -> ``spiffe_a/b``)."""
    return re.sub(r":/{0,2}", "_", secret_name)


# --- bootstrap generation ---------------------------------------------------------------

def sds_config_source(cluster: str = "sds", api_type: str = "GRPC",
                      initial_fetch_timeout: str = "5s",
                      retry_base: str = "0.05s", retry_max: str = "0.5s") -> dict[str, Any]:
    """An ``sds_config`` pointing at the gRPC cluster ``cluster`` (GRPC or DELTA_GRPC)."""
    if api_type not in ("GRPC", "DELTA_GRPC"):
        raise ValueError(f"api_type must be GRPC or DELTA_GRPC, not {api_type!r}")
    return {
        "resource_api_version": "V3",
        "initial_fetch_timeout": initial_fetch_timeout,
        "api_config_source": {
            "api_type": api_type,
            "transport_api_version": "V3",
            "set_node_on_first_message_only": True,
            "grpc_services": [{"envoy_grpc": {
                "cluster_name": cluster,
                "retry_policy": {"retry_back_off": {"base_interval": retry_base,
                                                    "max_interval": retry_max}},
            }}],
        },
    }


def _probe_cluster(name: str, tls_context: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                          "port_value": 9}}}}]}]},
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/"
                         "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": tls_context,
            },
        },
    }


def sds_bootstrap(sds_socket: Path | str, *, tls_certificates: Sequence[str] = ("default",),
                  validation_contexts: Sequence[str] = ("ROOTCA",),
                  node_id: str = "test-envoy", node_cluster: str = "test",
                  node_metadata: Mapping[str, Any] | None = None,
                  api_type: str = "GRPC", initial_fetch_timeout: str = "5s",
                  retry_base: str = "0.05s", retry_max: str = "0.5s",
                  admin_port: int = 0) -> dict[str, Any]:
    """A minimal bootstrap that asks an SDS server on a Unix socket for secrets by name.

    Each name gets its own static upstream cluster (``probe_cert_<i>`` holding one TLS
    certificate, ``probe_ca_<i>`` one validation context) that is never connected to, so
    ``/certs`` shows exactly what Envoy holds for each name and ``/stats`` has
    ``sds.<name>.update_success`` / ``update_rejected``.
    """
    source = sds_config_source("sds", api_type, initial_fetch_timeout, retry_base, retry_max)
    clusters: list[dict[str, Any]] = [{
        "name": "sds",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                         "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "load_assignment": {"cluster_name": "sds", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"pipe": {"path": str(sds_socket)}}}}]}]},
    }]
    for index, name in enumerate(tls_certificates):
        clusters.append(_probe_cluster(f"probe_cert_{index}", {
            "tls_certificate_sds_secret_configs": [{"name": name, "sds_config": source}]}))
    for index, name in enumerate(validation_contexts):
        clusters.append(_probe_cluster(f"probe_ca_{index}", {
            "validation_context_sds_secret_config": {"name": name, "sds_config": source}}))
    node: dict[str, Any] = {"id": node_id, "cluster": node_cluster}
    if node_metadata:
        node["metadata"] = dict(node_metadata)
    return {
        "node": node,
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {"clusters": clusters},
    }


# --- pytest -----------------------------------------------------------------------------

@pytest.fixture
def envoy_factory(tmp_path: Path) -> Iterator[Callable[..., EnvoyProcess]]:
    """``envoy_factory(config, **kwargs)`` -> an unstarted ``EnvoyProcess`` in its own
    directory under ``tmp_path``; every one made is stopped at teardown.

    Import it into a ``conftest.py`` to use it (``from tests.envoyproc import envoy_factory``).
    """
    made: list[EnvoyProcess] = []
    scratch: list[Path] = []

    def make(config: Path | str | Mapping[str, Any], **kwargs: Any) -> EnvoyProcess:
        workdir = kwargs.pop("workdir", None)
        if workdir is None and kwargs.get("user") is not None:
            # pytest's tmp_path sits under a 0700 directory another uid cannot traverse.
            workdir = Path(tempfile.mkdtemp(prefix="envoy-"))
            scratch.append(workdir)
        envoy = EnvoyProcess(config, Path(workdir or tmp_path / f"envoy-{next(_counter)}"),
                             **kwargs)
        made.append(envoy)
        return envoy

    yield make
    for envoy in made:
        envoy.stop()
    for directory in scratch:
        shutil.rmtree(directory, ignore_errors=True)

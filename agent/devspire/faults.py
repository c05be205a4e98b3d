"""Fault injection for tests: delays, dropped streams, injected statuses, corrupt or huge responses.

Everything is off by default. Set faults in-process through a :class:`Faults` object, or
write a JSON file (``--faults FILE``, reloaded when it changes; a change replaces every fault,
counters included)::

    {
      "delays": {"SubscribeToX509SVIDs": 0.5, "FetchJWTSVIDs": 2},
      "drop_after": {"SubscribeToX509SVIDs": 2},
      "drop_now": true,
      "inject": [{"code": "RESOURCE_EXHAUSTED", "count": 2, "rpcs": ["FetchJWTSVIDs"],
                  "message": "slow down"}],
      "corrupt_x509": {"mode": "expired", "count": 1},
      "oversize": {"count": 1, "bytes": 5000000, "rpcs": ["SubscribeToX509Bundles"]},
      "drop_ca_from_bundle": "active",
      "malformed_bundle": "spiffe://partner.example"
    }

- ``delays``: seconds to wait before handling each call of that RPC ("*" = every RPC).
- ``drop_after``: a stream of that RPC ends with UNAVAILABLE once it has sent N messages.
- ``drop_now``: every open stream ends with UNAVAILABLE (once, when the file is loaded).
- ``inject``: the next ``count`` calls of ``rpcs`` (default all) fail with ``code`` before
  anything else happens (``count`` -1 = until cleared).
- ``corrupt_x509``: the next ``count`` SubscribeToX509SVIDs responses that carry SVIDs carry
  broken ones. Modes: malformed, expired, not_yet_valid, wrong_trust_domain, key_mismatch,
  wrong_san. An SVID is broken the same way every time it is re-sent (as SPIRE re-sends the
  same bytes), so a retry is visibly the same certificate. ``valid_in`` (not_yet_valid only,
  default 3600): seconds until the broken certificate becomes valid.
- ``drop_ca_from_bundle``: X.509 bundle responses leave out local CAs until cleared: "active"
  (the one signing now) or a list of CA serials (``TrustDomainCA`` serials, 1 = the first);
  ``null`` turns it off. SVIDs are still signed as before, so the bundle no longer holds the
  CA they chain to (what a forced revocation racing a rotation looks like).
- ``malformed_bundle``: X.509 bundle responses carry a malformed value (DER framing around
  something that is not a certificate) for that trust domain until cleared; the others are
  sent as usual.
- ``oversize``: the next ``count`` responses of ``rpcs`` (default the three streams) are padded
  past ``bytes`` (default 5 MiB): SVID responses repeat their SVIDs (or, when empty, list
  padding trust domains in federates_with); bundle responses gain ``spiffe://padding-N.invalid``
  trust domains.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from agent.errors import ConfigError

_LOG = logging.getLogger("spiffe_delegate.devspire")

RPCS = ("SubscribeToX509SVIDs", "SubscribeToX509Bundles", "FetchJWTSVIDs",
        "SubscribeToJWTBundles")
STREAM_RPCS = ("SubscribeToX509SVIDs", "SubscribeToX509Bundles", "SubscribeToJWTBundles")
CORRUPT_MODES = ("malformed", "expired", "not_yet_valid", "wrong_trust_domain", "key_mismatch",
                 "wrong_san")
DEFAULT_OVERSIZE = 5 * 1024 * 1024


@dataclass
class InjectedStatus:
    code: grpc.StatusCode
    count: int
    rpcs: frozenset[str]
    message: str


@dataclass
class _Counted:
    count: int
    value: str = ""
    size: int = DEFAULT_OVERSIZE
    rpcs: frozenset[str] = field(default_factory=frozenset)


def _rpc_set(rpcs: Iterable[str] | None, default: Iterable[str] = RPCS) -> frozenset[str]:
    chosen = frozenset(default if rpcs is None else rpcs)
    unknown = chosen - set(RPCS)
    if unknown:
        raise ValueError(f"unknown RPC names {sorted(unknown)}; use {', '.join(RPCS)}")
    return chosen


def _take(counted: _Counted | None) -> bool:
    """Consumes one use of a counted fault; -1 means unlimited."""
    if counted is None or counted.count == 0:
        return False
    if counted.count > 0:
        counted.count -= 1
    return True


class Faults:
    """Runtime-settable faults. All methods are cheap and safe to call from the event loop."""

    def __init__(self) -> None:
        self._delays: dict[str, float] = {}
        self._drop_after: dict[str, int] = {}
        self._inject: list[InjectedStatus] = []
        self._corrupt: _Counted | None = None
        self._valid_in: float | None = None
        self._oversize: _Counted | None = None
        self._drop_cas: str | frozenset[int] | None = None
        self._malformed_bundle: str | None = None
        self.drop_epoch = 0
        self._listeners: set[Callable[[], None]] = set()

    # --- setting faults ---------------------------------------------------------------------
    def clear(self) -> None:
        self._delays.clear()
        self._drop_after.clear()
        self._inject.clear()
        self._corrupt = None
        self._valid_in = None
        self._oversize = None
        self._drop_cas = None
        self._malformed_bundle = None
        self._wake_streams()

    def set_delay(self, rpc: str, seconds: float) -> None:
        """``rpc`` "*" delays every RPC; 0 removes the delay."""
        for name in (RPCS if rpc == "*" else _rpc_set([rpc])):
            if seconds > 0:
                self._delays[name] = seconds
            else:
                self._delays.pop(name, None)

    def drop_after(self, messages: int | None, rpcs: Iterable[str] | None = None) -> None:
        """Streams end with UNAVAILABLE after sending ``messages``; None turns that off."""
        for name in _rpc_set(rpcs, STREAM_RPCS):
            if messages is None:
                self._drop_after.pop(name, None)
            else:
                self._drop_after[name] = messages
        self._wake_streams()

    def drop_streams_now(self) -> None:
        """Every stream open right now ends with UNAVAILABLE."""
        self.drop_epoch += 1
        self._wake_streams()

    def _wake_streams(self) -> None:
        for listener in list(self._listeners):
            listener()

    def inject_status(self, code: grpc.StatusCode, count: int = 1,
                      rpcs: Iterable[str] | None = None, message: str = "") -> None:
        self._inject.append(InjectedStatus(code, count, _rpc_set(rpcs),
                                           message or f"dev-spire injected fault: {code.name}"))

    def corrupt_x509(self, mode: str, count: int = 1, valid_in: float | None = None) -> None:
        """``valid_in``: for not_yet_valid, seconds until the certificate becomes valid."""
        if mode not in CORRUPT_MODES:
            raise ValueError(f"unknown corruption mode {mode!r}; use {', '.join(CORRUPT_MODES)}")
        if valid_in is not None and (mode != "not_yet_valid" or valid_in <= 0):
            raise ValueError("valid_in is a positive number of seconds, for not_yet_valid only")
        self._corrupt = _Counted(count, mode)
        self._valid_in = valid_in

    def drop_ca_from_bundle(self, which: str | Iterable[int] | None) -> None:
        """X.509 bundles leave out the local CA "active" (the one signing now) or the CAs
        with these serials; None: bundles are whole again. Open bundle streams re-send."""
        if which is None or which == "active":
            self._drop_cas = which
        elif isinstance(which, str):
            raise ValueError(f"drop_ca_from_bundle: {which!r}; use \"active\" or CA serials")
        else:
            serials = frozenset(which)
            if not serials or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                  for n in serials):
                raise ValueError("drop_ca_from_bundle: CA serials are whole numbers >= 1")
            self._drop_cas = serials
        self._wake_streams()

    def malformed_bundle(self, trust_domain: str | None) -> None:
        """X.509 bundles carry a malformed value for ``trust_domain`` (None: off)."""
        if trust_domain is not None and not trust_domain.removeprefix("spiffe://"):
            raise ValueError("malformed_bundle: name a trust domain")
        self._malformed_bundle = trust_domain
        self._wake_streams()

    def oversize(self, count: int = 1, size: int = DEFAULT_OVERSIZE,
                 rpcs: Iterable[str] | None = None) -> None:
        self._oversize = _Counted(count, size=size, rpcs=_rpc_set(rpcs, STREAM_RPCS))

    # --- consulted by the service ----------------------------------------------------------
    def delay_for(self, rpc: str) -> float:
        return self._delays.get(rpc, 0.0)

    def drop_limit(self, rpc: str) -> int | None:
        return self._drop_after.get(rpc)

    def take_injected(self, rpc: str) -> InjectedStatus | None:
        for fault in self._inject:
            if rpc in fault.rpcs and fault.count != 0:
                if fault.count > 0:
                    fault.count -= 1
                return fault
        return None

    def take_corruption(self) -> str | None:
        corrupt = self._corrupt
        return corrupt.value if _take(corrupt) and corrupt else None

    @property
    def valid_in(self) -> float | None:
        return self._valid_in

    @property
    def dropped_cas(self) -> str | frozenset[int] | None:
        return self._drop_cas

    @property
    def malformed_bundle_domain(self) -> str | None:
        return self._malformed_bundle

    def take_oversize(self, rpc: str) -> int | None:
        over = self._oversize
        if over is None or rpc not in over.rpcs:
            return None
        return over.size if _take(over) else None

    def add_drop_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.add(listener)

    def remove_drop_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.discard(listener)

    # --- JSON -------------------------------------------------------------------------------
    def apply_document(self, document: object, source: str = "faults") -> None:
        """Replaces every fault with those in ``document``; ConfigError if it is invalid.

        Validation happens first, so a bad document leaves the current faults alone.
        """
        staged = Faults()
        try:
            drop_now = _parse_into(staged, document)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{source}: {exc}", "see agent/devspire/faults.py for the format"
                              ) from None
        self._delays, self._drop_after = staged._delays, staged._drop_after
        self._inject, self._corrupt, self._oversize = (staged._inject, staged._corrupt,
                                                       staged._oversize)
        self._valid_in = staged._valid_in
        self._drop_cas, self._malformed_bundle = staged._drop_cas, staged._malformed_bundle
        self._wake_streams()
        if drop_now:
            self.drop_streams_now()

    def load_file(self, path: str | Path) -> None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read faults file {path}: {exc.strerror}") from None
        if not text.strip():
            self.clear()
            return
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        self.apply_document(document, str(path))


def _parse_into(faults: Faults, document: object) -> bool:
    if not isinstance(document, Mapping):
        raise ValueError("expected a JSON object")
    unknown = set(document) - {"delays", "drop_after", "drop_now", "inject", "corrupt_x509",
                               "oversize", "drop_ca_from_bundle", "malformed_bundle"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    for rpc, seconds in (document.get("delays") or {}).items():
        if not isinstance(seconds, int | float) or seconds < 0:
            raise ValueError(f"delays.{rpc}: must be a number of seconds >= 0")
        faults.set_delay(rpc, float(seconds))
    for rpc, messages in (document.get("drop_after") or {}).items():
        if not isinstance(messages, int) or messages < 0:
            raise ValueError(f"drop_after.{rpc}: must be a whole number >= 0")
        faults.drop_after(messages, STREAM_RPCS if rpc == "*" else [rpc])
    for i, item in enumerate(document.get("inject") or []):
        code_name = str(item.get("code", "")).upper()
        try:
            code = grpc.StatusCode[code_name]
        except KeyError:
            raise ValueError(f"inject[{i}].code: {code_name!r} is not a gRPC status code") from None
        if code is grpc.StatusCode.OK:
            raise ValueError(f"inject[{i}].code: OK is not a fault")
        faults.inject_status(code, int(item.get("count", 1)), item.get("rpcs"),
                             str(item.get("message", "")))
    if (corrupt := document.get("corrupt_x509")) is not None:
        valid_in = corrupt.get("valid_in")
        faults.corrupt_x509(str(corrupt.get("mode")), int(corrupt.get("count", 1)),
                            float(valid_in) if valid_in is not None else None)
    if (drop := document.get("drop_ca_from_bundle")) is not None:
        if not isinstance(drop, str | list):
            raise ValueError('drop_ca_from_bundle: "active" or a list of CA serials')
        faults.drop_ca_from_bundle(drop)
    if (malformed := document.get("malformed_bundle")) is not None:
        if not isinstance(malformed, str):
            raise ValueError("malformed_bundle: a trust domain name")
        faults.malformed_bundle(malformed)
    if (over := document.get("oversize")) is not None:
        faults.oversize(int(over.get("count", 1)), int(over.get("bytes", DEFAULT_OVERSIZE)),
                        over.get("rpcs"))
    drop_now = document.get("drop_now", False)
    if not isinstance(drop_now, bool):
        raise ValueError("drop_now: must be true or false")
    return drop_now


async def apply_delay(faults: Faults, rpc: str) -> None:
    if (seconds := faults.delay_for(rpc)) > 0:
        await asyncio.sleep(seconds)

"""Incremental (delta) xDS bookkeeping for one DeltaSecrets stream. Pure: no I/O, no clock.

* Subscriptions: ``resource_names_subscribe`` adds names, ``..._unsubscribe`` drops them. A
  first request subscribing to nothing (or to ``*``) is a wildcard subscription: everything
  the caller has, as SotW's empty request.
* Per-resource versions are content digests, so the versions Envoy reports in
  ``initial_resource_versions`` when it reconnects (after an agent restart, say) are
  understood: a secret it already holds is not sent again.
* Each response has its own nonce; a request echoing one ACKs (or, with ``error_detail``,
  NACKs) exactly that response's resources. Several responses may be in flight. A request
  with an unknown nonce still counts for its subscription changes.
* After a NACK the client keeps what it had; that content is never sent again for that
  name; a later, different content is.
* ``removed_resources`` tells the client a secret it holds is gone: a subscribed name the
  caller's (non-empty) state can no longer serve, or, for a wildcard subscription, a name
  no longer in it. While the caller has no identity at all nothing is removed.
* As in SotW, ``build(..., sent_at=...)`` stamps a response and the outcome of the request
  answering it hands the stamp back (push-to-ACK latency).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from agent.sds.resources import SECRET_TYPE_URL
from agent.sds.sotw import Held, new_nonce, remember_rejected, secret_digest, slim_node

__all__ = ["DeltaOutcome", "DeltaProtocol"]

WILDCARD = "*"
_MAX_IN_FLIGHT = 64


@dataclass(frozen=True)
class DeltaOutcome:
    """``subscribed``: names newly subscribed (a response may be due). ``acked`` /
    ``nacked``: resources of the response this request answered. ``unknown_nonce``: the
    nonce named no response in flight (from a previous agent, or already answered).
    ``sent_at``: the ``sent_at`` given to ``build`` for the response answered, if any."""

    subscribed: tuple[str, ...] = ()
    acked: tuple[str, ...] = ()
    nacked: tuple[str, ...] = ()
    error_detail: str = ""
    unknown_nonce: bool = False
    sent_at: float | None = None


class DeltaProtocol:
    """One delta stream's protocol state."""

    def __init__(self) -> None:
        self.node: Any = None
        self.wildcard = False
        self.subscribed: set[str] = set()
        self._first = True
        self._in_flight: OrderedDict[str, dict[str, Held | None]] = OrderedDict()
        self._sent_at: dict[str, float] = {}  # nonce -> stamp, for responses in flight
        self._client: dict[str, str] = {}     # name -> version the client holds (or will)
        self._acked: dict[str, str] = {}      # name -> version last ACKed (or reported)
        self._rejected: dict[str, list[str]] = {}

    @property
    def client_versions(self) -> Mapping[str, str]:
        return self._client

    def rejected(self, name: str) -> tuple[str, ...]:
        return tuple(self._rejected.get(name, ()))

    def requested(self) -> Sequence[str] | None:
        """The names to resolve: ``[]`` for a wildcard (everything), None for nothing."""
        if self.wildcard:
            return []
        return sorted(self.subscribed) if self.subscribed else None

    def on_request(self, request: Any) -> DeltaOutcome:
        if request.HasField("node"):
            self.node = slim_node(request.node)
        detail = request.error_detail.message if request.HasField("error_detail") else ""
        acked: tuple[str, ...] = ()
        nacked: tuple[str, ...] = ()
        unknown = False
        sent_at: float | None = None
        if request.response_nonce:
            sent = self._in_flight.pop(request.response_nonce, None)
            sent_at = self._sent_at.pop(request.response_nonce, None)
            if sent is None:
                unknown = True
            elif request.HasField("error_detail"):
                nacked = tuple(sent)
                for name, held in sent.items():
                    if held is not None:
                        remember_rejected(self._rejected, name, held.digest)
                    if name in self._acked:
                        self._client[name] = self._acked[name]
                    else:
                        self._client.pop(name, None)
            else:
                acked = tuple(sent)
                for name, held in sent.items():
                    if held is None:
                        self._acked.pop(name, None)
                    else:
                        self._acked[name] = held.digest
        subscribe = list(request.resource_names_subscribe)
        if self._first:
            self._first = False
            if not subscribe:
                self.wildcard = True
            for name, version in request.initial_resource_versions.items():
                self._client[name] = version
                self._acked[name] = version
        added = []
        for name in subscribe:
            if name == WILDCARD:
                self.wildcard = True
            elif name not in self.subscribed:
                self.subscribed.add(name)
                added.append(name)
        for name in request.resource_names_unsubscribe:
            if name == WILDCARD:
                self.wildcard = False
                continue
            self.subscribed.discard(name)
            if not self.wildcard:
                for table in (self._client, self._acked, self._rejected):
                    table.pop(name, None)
        return DeltaOutcome(subscribed=tuple(added), acked=acked, nacked=nacked,
                            error_detail=detail, unknown_nonce=unknown, sent_at=sent_at)

    def build(self, version: int, secrets: Mapping[str, Any], gone: Sequence[str],
              settled: bool, *, sent_at: float | None = None) -> Any | None:
        """The response bringing the client up to ``secrets``, or None when it is up to
        date. ``gone``: subscribed names the caller's state can no longer serve;
        ``settled``: the caller has an identity (only then may a wildcard remove names);
        ``sent_at``: kept with the response and handed back with its ACK or NACK."""
        resources = []
        sent: dict[str, Held | None] = {}
        wanted = sorted(secrets) if self.wildcard else sorted(self.subscribed)
        for name in wanted:
            secret = secrets.get(name)
            if secret is None:
                continue
            held = Held(secret_digest(secret), secret)
            if held.digest in self._rejected.get(name, ()) or self._client.get(name) == held.digest:
                continue
            resource = discovery_pb2.Resource(name=name, version=held.digest)
            resource.resource.Pack(secret)
            resources.append(resource)
            sent[name] = held
        removed = [name for name in gone if name in self._client]
        if self.wildcard and settled:
            removed += [name for name in self._client
                        if name not in secrets and name not in self.subscribed
                        and name not in removed]
        for name in removed:
            sent[name] = None
        if not sent:
            return None
        response = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=str(version), type_url=SECRET_TYPE_URL, nonce=new_nonce(),
            resources=resources, removed_resources=sorted(removed))
        for name, entry in sent.items():
            if entry is None:
                self._client.pop(name, None)
            else:
                self._client[name] = entry.digest
        self._in_flight[response.nonce] = sent
        if sent_at is not None:
            self._sent_at[response.nonce] = sent_at
        while len(self._in_flight) > _MAX_IN_FLIGHT:
            oldest, _ = self._in_flight.popitem(last=False)
            self._sent_at.pop(oldest, None)
        return response

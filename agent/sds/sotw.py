"""State-of-the-world xDS bookkeeping for one StreamSecrets stream: nonces, ACK/NACK, and
which response (if any) a new resolution calls for. Pure: no I/O, no clock.

Rules (SPIRE's where SPIRE has one, ``pkg/agent/endpoints/sdsv3``):

* Every response carries a fresh random nonce (8 hex characters) and the version of the
  cache state(s) it was built from.
* Before the first response any nonce is accepted (Envoy reconnecting after an agent
  restart echoes a nonce of the previous agent). After it, a request whose nonce is not
  the last one sent is stale and ignored entirely.
* A request echoing the last nonce is an ACK when it carries that response's version and
  no ``error_detail``; otherwise a NACK. A stale request answering an older response
  (Envoy's ACK crossing our next push) is still booked as that response's ACK or NACK,
  though otherwise ignored. Per resource name the protocol remembers the
  secret last ACKed and the contents NACKed: a NACKed content is never sent again (the
  last ACKed secret is sent in its place, or nothing when there is none), and a response
  identical to what the client already holds (or is about to) is not sent.
* A response is due when the requested names change (the first request included) and on
  every state change once names are known.

The caller may stamp each response with the time it is sent (``build(..., sent_at=...)``);
the outcome of the request that answers it hands that stamp back, for push-to-ACK latency.
"""

from __future__ import annotations

import hashlib
import secrets as random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from agent.sds.resources import SECRET_TYPE_URL

__all__ = ["Held", "RequestOutcome", "SotwProtocol", "new_nonce", "remember_rejected",
           "secret_digest"]

_MAX_REJECTED = 8
_MAX_IN_FLIGHT = 16


def secret_digest(secret: Any) -> str:
    """A short, stable fingerprint of a Secret's content (deterministic serialization)."""
    return hashlib.sha256(secret.SerializeToString(deterministic=True)).hexdigest()[:16]


def new_nonce() -> str:
    """4 random bytes, hex: SPIRE's nonce shape."""
    return random.token_hex(4)


@dataclass(frozen=True)
class Held:
    """One secret as sent: its digest and the Secret proto."""

    digest: str
    secret: Any


@dataclass(frozen=True)
class RequestOutcome:
    """What one request meant. ``stale``: ignored (old nonce). ``names_changed``: a
    response is due. ``acked``/``nacked``: the resource names of the response this request
    answered (empty when it answered none). ``error_detail``: the NACK's message.
    ``sent_at``: the ``sent_at`` given to ``build`` for the response answered, if any."""

    stale: bool = False
    names_changed: bool = False
    acked: tuple[str, ...] = ()
    nacked: tuple[str, ...] = ()
    error_detail: str = ""
    sent_at: float | None = None


def remember_rejected(rejected: dict[str, list[str]], name: str, digest: str) -> None:
    bucket = rejected.setdefault(name, [])
    if digest not in bucket:
        bucket.append(digest)
        del bucket[:-_MAX_REJECTED]


def slim_node(node: Any) -> Any:
    """What the agent reads of Envoy's Node (resources.py: user agent build version,
    metadata), copied out of the request. Keeping ``request.node`` itself would pin the
    whole decoded first request (upb keeps a sub-message's arena alive): Envoy's Node
    lists its ~500 extensions, ~60 kB on the wire, ~180 kB decoded, per stream."""
    kept = base_pb2.Node(id=node.id, cluster=node.cluster,
                         user_agent_name=node.user_agent_name)
    if node.HasField("metadata"):
        kept.metadata.CopyFrom(node.metadata)
    if node.HasField("user_agent_build_version"):
        kept.user_agent_build_version.CopyFrom(node.user_agent_build_version)
    return kept


class SotwProtocol:
    """One stream's protocol state; the handler feeds it requests and resolutions."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] | None = None
        self.node: Any = None
        self.last_nonce = ""
        self.last_version = ""
        # Responses not answered yet, oldest first: nonce -> (version, what was sent, when).
        self._in_flight: OrderedDict[str, tuple[str, dict[str, Held], float | None]] = (
            OrderedDict())
        self._expected: dict[str, str] = {}
        self._acked: dict[str, Held] = {}
        self._rejected: dict[str, list[str]] = {}
        self._owed = False  # the names changed and no response has gone out since

    @property
    def acked(self) -> Mapping[str, Held]:
        return self._acked

    def rejected(self, name: str) -> tuple[str, ...]:
        return tuple(self._rejected.get(name, ()))

    def _answer(self, nonce: str, request: Any
                ) -> tuple[tuple[str, ...], tuple[str, ...], float | None]:
        """Books the ACK or NACK of response ``nonce`` (and forgets the older ones, which
        Envoy has answered already, in order); returns (acked, nacked) names and the
        response's ``sent_at``."""
        version, sent, sent_at = self._in_flight[nonce]
        while self._in_flight:
            oldest, _ = self._in_flight.popitem(last=False)
            if oldest == nonce:
                break
        if request.HasField("error_detail") or request.version_info != version:
            for name, held in sent.items():
                remember_rejected(self._rejected, name, held.digest)
            return (), tuple(sent), sent_at
        self._acked.update(sent)
        return tuple(sent), (), sent_at

    def on_request(self, request: Any) -> RequestOutcome:
        if request.HasField("node"):
            self.node = slim_node(request.node)  # set_node_on_first_message_only
        detail = request.error_detail.message if request.HasField("error_detail") else ""
        acked: tuple[str, ...] = ()
        nacked: tuple[str, ...] = ()
        sent_at: float | None = None
        if self.last_nonce:
            nonce = request.response_nonce
            if nonce != self.last_nonce:
                # Stale: ignored as SPIRE ignores it, except that an answer to an older
                # response still tells what the client accepted or refused.
                if nonce in self._in_flight:
                    acked, nacked, sent_at = self._answer(nonce, request)
                return RequestOutcome(stale=True, acked=acked, nacked=nacked,
                                      error_detail=detail, sent_at=sent_at)
            if nonce in self._in_flight:  # else answered already (e.g. names changed since)
                acked, nacked, sent_at = self._answer(nonce, request)
            for name in nacked:
                kept = self._acked.get(name)
                if kept is None:
                    self._expected.pop(name, None)
                else:
                    self._expected[name] = kept.digest
        names = tuple(request.resource_names)
        changed = self.names is None or set(names) != set(self.names)
        self.names = names
        if changed:
            self._owed = True
            wanted = set(names)
            for table in (self._acked, self._expected, self._rejected):
                for name in [n for n in table if wanted and n not in wanted]:
                    del table[name]
        return RequestOutcome(names_changed=changed, acked=acked, nacked=nacked,
                              error_detail=detail, sent_at=sent_at)

    def build(self, version: int, secrets: Mapping[str, Any], *,
              sent_at: float | None = None) -> Any | None:
        """The response for ``secrets`` (by name), or None when none is due: a NACKed
        content with nothing ACKed to stand in for it, or nothing new for the client.
        ``sent_at`` is kept with the response and handed back with its ACK or NACK."""
        chosen: dict[str, Held] = {}
        for name, secret in secrets.items():
            held = Held(secret_digest(secret), secret)
            if held.digest in self._rejected.get(name, ()):
                kept = self._acked.get(name)
                if kept is None:
                    return None
                held = kept
            chosen[name] = held
        digests = {name: held.digest for name, held in chosen.items()}
        if digests == self._expected and not self._owed:
            return None
        response = discovery_pb2.DiscoveryResponse(
            version_info=str(version), nonce=new_nonce(), type_url=SECRET_TYPE_URL)
        for held in chosen.values():
            response.resources.add().Pack(held.secret)
        self._in_flight[response.nonce] = (response.version_info, chosen, sent_at)
        while len(self._in_flight) > _MAX_IN_FLIGHT:
            self._in_flight.popitem(last=False)
        self._expected = digests
        self._owed = False
        self.last_nonce = response.nonce
        self.last_version = response.version_info
        return response

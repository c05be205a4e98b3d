"""Registration entries: load and check an `entry create -data` style file; match selectors."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.model import Selector, trust_domain_key

_LOG = logging.getLogger("spiffe_delegate.devspire")

# Fields of spire.common.RegistrationEntry that dev-spire accepts but does not act on.
_ACCEPTED_UNUSED = frozenset({
    "store_svid", "revision_number", "created_at", "jwt_svid_include_jti",
    "disable_x509_svid_prefetch", "entry_expiry", "node", "id",
})
_KNOWN = frozenset({
    "entry_id", "spiffe_id", "parent_id", "selectors", "x509_svid_ttl", "jwt_svid_ttl",
    "federates_with", "admin", "downstream", "dns_names", "hint", "entryExpiry",
}) | _ACCEPTED_UNUSED


@dataclass(frozen=True)
class Entry:
    """One workload registration entry. TTLs of 0 mean "use the server default"."""

    entry_id: str
    spiffe_id: str
    parent_id: str
    selectors: frozenset[Selector]
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    federates_with: tuple[str, ...] = ()
    admin: bool = False
    downstream: bool = False
    dns_names: tuple[str, ...] = ()
    hint: str = ""
    expires_at: int = 0

    @property
    def path(self) -> str:
        return "/" + self.spiffe_id.removeprefix("spiffe://").partition("/")[2]

    def matches(self, selectors: frozenset[Selector]) -> bool:
        """SPIRE's rule: every selector of the entry is among the given ones."""
        return self.selectors <= selectors


def matching_entries(entries: Iterable[Entry], selectors: frozenset[Selector],
                     now: float) -> list[Entry]:
    """Entries whose selectors are a subset of ``selectors``, ordered by entry ID."""
    if not selectors:
        return []
    found = [e for e in entries
             if e.matches(selectors) and not (e.expires_at and e.expires_at <= now)]
    return sorted(found, key=lambda e: e.entry_id)


def validate_spiffe_id(text: object, *, trust_domain: str | None = None) -> str:
    """Returns the normalized SPIFFE ID or raises ValueError saying what is wrong."""
    if not isinstance(text, str) or not text:
        raise ValueError("must be a non-empty string like spiffe://example.org/workload")
    if not text.startswith("spiffe://"):
        raise ValueError(f"{text!r} does not start with spiffe://")
    td, sep, path = text.removeprefix("spiffe://").partition("/")
    validate_trust_domain(td)
    if not sep or not path:
        raise ValueError(f"{text!r} has no path; workload IDs look like spiffe://{td}/name")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"{text!r} has an empty, '.' or '..' path segment")
        if any(not (c.isascii() and (c.isalnum() or c in "-._")) for c in segment):
            raise ValueError(
                f"{text!r}: path segments may hold only letters, digits, '-', '.', '_'")
    if trust_domain is not None and td != trust_domain:
        raise ValueError(f"{text!r} is not in the trust domain {trust_domain!r}")
    return text


def validate_trust_domain(td: str) -> str:
    if not td:
        raise ValueError("trust domain is empty")
    if any(not (c.isascii() and (c.islower() or c.isdigit() or c in "-._")) for c in td):
        raise ValueError(
            f"trust domain {td!r} may hold only lowercase letters, digits, '-', '.', '_'")
    return td


def parse_selector(raw: object) -> Selector:
    """``{"type": t, "value": v}`` (the SPIRE shape) or the string ``"t:v"``."""
    if isinstance(raw, str):
        try:
            sel = Selector.parse(raw)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
    elif isinstance(raw, Mapping):
        kind, value = raw.get("type"), raw.get("value")
        if not isinstance(kind, str) or not isinstance(value, str):
            raise ValueError(f"{raw!r} needs string fields 'type' and 'value'")
        sel = Selector(kind, value)
    else:
        raise ValueError(f"{raw!r} is neither {{\"type\", \"value\"}} nor \"type:value\"")
    if not sel.type or ":" in sel.type or not sel.value:
        raise ValueError(f"{sel!s}: the type must be non-empty without ':', the value non-empty")
    return sel


def derive_entry_id(spiffe_id: str, parent_id: str, selectors: Iterable[Selector]) -> str:
    """A stable ID from what makes an entry unique in SPIRE (its "similar entry" check)."""
    material = "\n".join([spiffe_id, parent_id, *sorted(str(s) for s in selectors)])
    digest = hashlib.sha256(material.encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def _ttl(raw: Mapping[str, Any], name: str) -> int:
    value = raw.get(name, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be a whole number of seconds >= 0, got {value!r}")
    return value


def _bool(raw: Mapping[str, Any], name: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _strings(raw: Mapping[str, Any], name: str) -> list[str]:
    value = raw.get(name) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"must be a list of non-empty strings, got {value!r}")
    return list(value)


def parse_entry(raw: object, trust_domain: str) -> Entry:
    """Validates one entry object; ValueError messages start with the offending field."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        _LOG.warning("entry %s: ignoring unknown fields %s", raw.get("spiffe_id"), unknown)

    def field(name: str, fn: Any) -> Any:
        try:
            return fn()
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None

    spiffe_id = field("spiffe_id", lambda: validate_spiffe_id(
        raw.get("spiffe_id"), trust_domain=trust_domain))
    parent_raw = raw.get("parent_id") or f"spiffe://{trust_domain}/spire/agent/dev-spire"
    parent_id = field("parent_id", lambda: validate_spiffe_id(parent_raw))
    raw_selectors = raw.get("selectors")
    if not isinstance(raw_selectors, list) or not raw_selectors:
        raise ValueError("selectors: must be a non-empty list of {\"type\", \"value\"} objects")
    selectors: list[Selector] = []
    for i, item in enumerate(raw_selectors):
        selectors.append(field(f"selectors[{i}]", lambda item=item: parse_selector(item)))
    federates = []
    for td in field("federates_with", lambda: _strings(raw, "federates_with")):
        key = trust_domain_key(td)
        field("federates_with", lambda key=key: validate_trust_domain(key.removeprefix("spiffe://")))
        if key == trust_domain_key(trust_domain):
            raise ValueError(f"federates_with: {td!r} is the server's own trust domain")
        federates.append(key)
    dns_names = field("dns_names", lambda: _strings(raw, "dns_names"))
    hint = raw.get("hint", "") or ""
    if not isinstance(hint, str):
        raise ValueError(f"hint: must be a string, got {hint!r}")
    expiry = field("entryExpiry", lambda: _ttl(raw, "entryExpiry"))
    entry_id = raw.get("entry_id") or derive_entry_id(spiffe_id, parent_id, selectors)
    if not isinstance(entry_id, str):
        raise ValueError(f"entry_id: must be a string, got {entry_id!r}")
    return Entry(
        entry_id=entry_id,
        spiffe_id=spiffe_id,
        parent_id=parent_id,
        selectors=frozenset(selectors),
        x509_svid_ttl=field("x509_svid_ttl", lambda: _ttl(raw, "x509_svid_ttl")),
        jwt_svid_ttl=field("jwt_svid_ttl", lambda: _ttl(raw, "jwt_svid_ttl")),
        federates_with=tuple(sorted(set(federates))),
        admin=field("admin", lambda: _bool(raw, "admin")),
        downstream=field("downstream", lambda: _bool(raw, "downstream")),
        dns_names=tuple(dns_names),
        hint=hint,
        expires_at=expiry,
    )


def parse_entries(document: object, trust_domain: str,
                  source: str = "entries") -> tuple[Entry, ...]:
    """Validates a whole ``{"entries": [...]}`` document; ConfigError names index and field."""
    if not isinstance(document, Mapping) or not isinstance(document.get("entries"), list):
        raise ConfigError(f"{source}: expected a JSON object {{\"entries\": [...]}}",
                          "use the shape of `spire-server entry create -data`")
    entries: list[Entry] = []
    seen_ids: dict[str, int] = {}
    seen_similar: dict[tuple[str, str, frozenset[Selector]], int] = {}
    for index, raw in enumerate(document["entries"]):
        try:
            entry = parse_entry(raw, trust_domain)
        except ValueError as exc:
            raise ConfigError(f"{source}: entries[{index}]: {exc}",
                              "fix that entry; the previous entries stay in force") from None
        similar = (entry.spiffe_id, entry.parent_id, entry.selectors)
        if similar in seen_similar:
            raise ConfigError(
                f"{source}: entries[{index}]: spiffe_id: a similar entry (same spiffe_id, "
                f"parent_id and selectors) is entries[{seen_similar[similar]}]",
                "remove the duplicate")
        if entry.entry_id in seen_ids:
            raise ConfigError(
                f"{source}: entries[{index}]: entry_id: {entry.entry_id!r} is already used by "
                f"entries[{seen_ids[entry.entry_id]}]", "give each entry its own entry_id")
        seen_ids[entry.entry_id] = index
        seen_similar[similar] = index
        entries.append(entry)
    return tuple(entries)


def load_entries(path: str | Path, trust_domain: str) -> tuple[Entry, ...]:
    """Reads and validates an entries file; raises ConfigError with a useful message."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read entries file {path}: {exc.strerror}",
                          "check the --entries path") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}", "fix the JSON syntax") from None
    return parse_entries(document, trust_domain, source=str(path))


def entries_document(entries: Sequence[Mapping[str, Any]]) -> str:
    """Serializes raw entry dicts into a file body (a helper for tests and demos)."""
    return json.dumps({"entries": list(entries)}, indent=2)

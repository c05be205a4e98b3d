"""Entry files: SPIRE's -data shape, validation errors naming index and field, matching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.devspire.entries import load_entries, matching_entries, parse_entries
from agent.errors import ConfigError
from agent.model import Selector

TD = "example.org"


def doc(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"entries": list(entries)}


GOOD = {"spiffe_id": "spiffe://example.org/web", "parent_id": "spiffe://example.org/agent",
        "selectors": [{"type": "k8s", "value": "ns:web"}, {"type": "k8s", "value": "sa:web"}],
        "x509_svid_ttl": 600, "jwt_svid_ttl": 60, "federates_with": ["spiffe://other.org"],
        "dns_names": ["web.local"], "hint": "external", "store_svid": False}


def test_spire_shape_is_read() -> None:
    (e,) = parse_entries(doc(GOOD), TD)
    assert e.spiffe_id == "spiffe://example.org/web"
    assert e.selectors == {Selector("k8s", "ns:web"), Selector("k8s", "sa:web")}
    assert (e.x509_svid_ttl, e.jwt_svid_ttl) == (600, 60)
    assert e.federates_with == ("spiffe://other.org",)
    assert e.dns_names == ("web.local",)
    assert e.hint == "external"


def test_entry_ids_are_stable_and_explicit_ids_win() -> None:
    a = parse_entries(doc(GOOD), TD)[0].entry_id
    b = parse_entries(doc(dict(GOOD, hint="other")), TD)[0].entry_id
    c = parse_entries(doc(dict(GOOD, selectors=[{"type": "k8s", "value": "ns:x"}])), TD)[0]
    assert a == b != c.entry_id
    assert parse_entries(doc(dict(GOOD, entry_id="my-id")), TD)[0].entry_id == "my-id"


@pytest.mark.parametrize(("bad", "where"), [
    ({"spiffe_id": "http://example.org/x"}, "entries[1]: spiffe_id"),
    ({"spiffe_id": "spiffe://other.org/x"}, "entries[1]: spiffe_id"),
    ({"spiffe_id": "spiffe://example.org"}, "entries[1]: spiffe_id"),
    ({"selectors": []}, "entries[1]: selectors"),
    ({"selectors": [{"type": "k8s:ns", "value": "x"}]}, "entries[1]: selectors[0]"),
    ({"selectors": [{"type": "k8s", "value": "ns:a"}, {"type": "k8s", "value": ""}]},
     "entries[1]: selectors[1]"),
    ({"x509_svid_ttl": "1h"}, "entries[1]: x509_svid_ttl"),
    ({"jwt_svid_ttl": -1}, "entries[1]: jwt_svid_ttl"),
    ({"admin": "yes"}, "entries[1]: admin"),
    ({"federates_with": ["spiffe://example.org"]}, "entries[1]: federates_with"),
    ({"federates_with": ["Bad Domain"]}, "entries[1]: federates_with"),
    ({"parent_id": "nope"}, "entries[1]: parent_id"),
])
def test_errors_name_index_and_field(bad: dict[str, Any], where: str) -> None:
    other = {**GOOD, "spiffe_id": "spiffe://example.org/other", **bad}
    with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
        parse_entries(doc(GOOD, other), TD)


def test_duplicates_are_rejected() -> None:
    with pytest.raises(ConfigError, match="similar entry"):
        parse_entries(doc(GOOD, dict(GOOD)), TD)
    with pytest.raises(ConfigError, match="entry_id"):
        parse_entries(doc(dict(GOOD, entry_id="x"),
                          dict(GOOD, entry_id="x", spiffe_id="spiffe://example.org/b")), TD)


def test_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "e.json"
    with pytest.raises(ConfigError, match="cannot read"):
        load_entries(path, TD)
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_entries(path, TD)
    path.write_text(json.dumps([GOOD]))
    with pytest.raises(ConfigError, match='"entries"'):
        load_entries(path, TD)


def test_matching_is_entry_subset_of_request() -> None:
    small = dict(GOOD, spiffe_id="spiffe://example.org/small",
                 selectors=[{"type": "k8s", "value": "ns:web"}])
    entries = parse_entries(doc(GOOD, small), TD)
    ns = Selector("k8s", "ns:web")
    sa = Selector("k8s", "sa:web")
    extra = Selector("k8s", "pod-uid:123")
    got = {e.spiffe_id for e in matching_entries(entries, frozenset({ns, sa, extra}), 0)}
    assert got == {"spiffe://example.org/web", "spiffe://example.org/small"}
    assert {e.spiffe_id for e in matching_entries(entries, frozenset({ns}), 0)} == {
        "spiffe://example.org/small"}
    assert matching_entries(entries, frozenset({sa}), 0) == []
    assert matching_entries(entries, frozenset(), 0) == []


def test_expired_entries_do_not_match() -> None:
    (e,) = parse_entries(doc(dict(GOOD, entryExpiry=1000)), TD)
    sels = frozenset(e.selectors)
    assert matching_entries([e], sels, 999) == [e]
    assert matching_entries([e], sels, 1000) == []

"""The private-key scanner of the secrets scenarios: every private key that existed in a run,
and a search for any 16-byte slice of one in whatever the run printed or wrote.

A key is looked for as:

- a PEM block (``-----BEGIN ... PRIVATE KEY-----``), whoever's key it is;
- every 16-byte window of the key's DER (PKCS#8 and the traditional SEC1 / PKCS#1 form)
  that holds at least one byte of the private value (windows wholly made of ASN.1 headers
  or of the public key are not secret, and appear in every certificate), in these forms:
  raw bytes; hex in either case, also with ``:``, ``-`` or blank separators; base64 and
  base64url at each of the three alignments a slice can have in a longer encoding;
- the same after undoing the escapes that text formats put on bytes: Python ``repr``
  (``\\xNN``), JSON (``\\u00NN``), protobuf text format and C (``\\NNN`` octal, ``\\n``);
  and with line breaks removed (wrapped base64 or hex);
- the private value in decimal.

Findings name the source, line, form and key, never the material itself.
"""

from __future__ import annotations

import base64
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

WINDOW = 16
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_PEM = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_HEX_RUN = re.compile(rb"[0-9a-fA-F]{32,}")
_SEPARATED_HEX = re.compile(rb"(?:[0-9a-fA-F]{2}[:\- ]){15,}[0-9a-fA-F]{2}")
_B64_RUN = re.compile(rb"[A-Za-z0-9+/_\-]{20,}")
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|u00[0-9a-fA-F]{2}|[0-7]{1,3}|[nrtbfva/\\'\"])")
_BREAKS = re.compile(rb"\s+|\\[nrt]")
_SIMPLE = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"f": b"\f", b"v": b"\v",
           b"a": b"\a", b"/": b"/", b"\\": b"\\", b"'": b"'", b'"': b'"'}


def _b64_needles(window: bytes) -> Iterator[str]:
    """What a base64 encoding that contains ``window`` always contains, for each of the
    three positions the window can start at within a 3-byte group."""
    for pad in range(3):
        encoded = base64.b64encode(bytes(pad) + window).decode()
        start = -(-8 * pad // 6)
        end = 8 * (pad + len(window)) // 6
        yield encoded[start:end]


def _secret_ranges(der: bytes, secrets: Iterable[bytes]) -> list[tuple[int, int]]:
    ranges = []
    for value in secrets:
        at = der.find(value)
        if at < 0:
            raise ValueError("a private value is not in its own DER")
        ranges.append((at, at + len(value)))
    return ranges


def _private_values(key: PrivateKey) -> list[int]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return [key.private_numbers().private_value]
    numbers = key.private_numbers()
    return [numbers.d, numbers.p, numbers.q, numbers.dmp1, numbers.dmq1, numbers.iqmp]


@dataclass(frozen=True)
class Finding:
    source: str
    line: int
    form: str
    key: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line or '?'}: {self.form} of {self.key}"


@dataclass
class KeySet:
    """Every private key of a run, and the needles that find any slice of one."""

    labels: list[str] = field(default_factory=list)
    raw: dict[bytes, str] = field(default_factory=dict)
    hex: dict[bytes, str] = field(default_factory=dict)
    b64: dict[bytes, str] = field(default_factory=dict)
    decimal: dict[bytes, str] = field(default_factory=dict)
    _seen: set[bytes] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, key: PrivateKey, label: str) -> None:
        pkcs8 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        if pkcs8 in self._seen:
            return
        self._seen.add(pkcs8)
        label = f"{label} #{len(self.labels) + 1}"
        self.labels.append(label)
        traditional = key.private_bytes(serialization.Encoding.DER,
                                        serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption())
        values = _private_values(key)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            size = (key.curve.key_size + 7) // 8
            blobs = [values[0].to_bytes(size, "big")]
        else:
            blobs = [v.to_bytes((v.bit_length() + 7) // 8, "big") for v in values]
        for der in (pkcs8, traditional):
            ranges = _secret_ranges(der, blobs)
            for start in range(len(der) - WINDOW + 1):
                if any(start < end and start + WINDOW > begin for begin, end in ranges):
                    self._add_window(der[start:start + WINDOW], label)
        for value in values:
            self.decimal[str(value).encode()] = label

    def add_der(self, der: bytes, label: str) -> None:
        """A private key given as PKCS#8 DER (as SPIRE hands it out)."""
        key = serialization.load_der_private_key(der, None)
        assert isinstance(key, PrivateKey)
        self.add(key, label)

    def _add_window(self, window: bytes, label: str) -> None:
        self.raw[window] = label
        self.hex[window.hex().encode()] = label
        for needle in _b64_needles(window):
            self.b64[needle.encode()] = label

    @property
    def window_count(self) -> int:
        return len(self.raw)


_Note = Callable[[str, str, int, bytes], None]


def unescape(data: bytes) -> bytes:
    """The bytes that Python repr, JSON, protobuf text format or C escapes in ``data`` stand
    for (text outside escapes is kept as is)."""
    def one(match: re.Match[bytes]) -> bytes:
        body = match.group(1)
        if body[:1] == b"x":
            return bytes([int(body[1:], 16)])
        if body[:1] == b"u":
            return bytes([int(body[3:], 16)])
        if body[:1].isdigit():
            return bytes([int(body, 8) & 0xFF])
        return _SIMPLE[body]
    return _ESCAPE.sub(one, data)


@dataclass
class Scanner:
    keys: KeySet
    bytes_scanned: int = 0
    lines_scanned: int = 0
    sources: int = 0

    def scan(self, source: str, data: bytes) -> list[Finding]:
        """Every finding in ``data`` (a whole output or file), at most one per form and key."""
        self.sources += 1
        self.bytes_scanned += len(data)
        self.lines_scanned += data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        found: dict[tuple[str, str], Finding] = {}

        def note(form: str, key: str, at: int, text: bytes) -> None:
            if (form, key) in found:
                return
            if text is data:
                line = text.count(b"\n", 0, at) + 1
            elif form.startswith("escaped "):  # escapes never span lines: find the line
                line = next((number for number, one in enumerate(data.split(b"\n"), 1)
                             if self._line_holds(unescape(one), form, key)), 0)
            else:
                line = 0  # wrapped over several lines
            found[(form, key)] = Finding(source, line, form, key)

        for match in _PEM.finditer(data):
            note("PEM block", "a private key", match.start(), data)
        variants = [("", data)]
        unescaped = unescape(data)
        if unescaped != data:
            variants.append(("escaped ", unescaped))
        joined = _BREAKS.sub(b"", data)
        if joined != data:
            variants.append(("wrapped ", joined))
        for prefix, text in variants:
            self._raw(prefix, text, note)
            self._hex(prefix, text, note)
            self._b64(prefix, text, note)
        for needle, label in self.keys.decimal.items():
            at = data.find(needle)
            if at >= 0:
                note("decimal private value", label, at, data)
        return list(found.values())

    def _line_holds(self, text: bytes, form: str, key: str) -> bool:
        hits: list[str] = []

        def collect(f: str, k: str, at: int, t: bytes) -> None:
            hits.append(f"{f}/{k}")
        self._raw("escaped ", text, collect)
        self._hex("escaped ", text, collect)
        self._b64("escaped ", text, collect)
        return f"{form}/{key}" in hits

    def _raw(self, prefix: str, text: bytes, note: _Note) -> None:
        raw = self.keys.raw
        for start in range(len(text) - WINDOW + 1):
            label = raw.get(text[start:start + WINDOW])
            if label is not None:
                note(prefix + "raw DER slice", label, start, text)

    def _hex(self, prefix: str, text: bytes, note: _Note) -> None:
        hexes = self.keys.hex
        size = 2 * WINDOW
        runs = [(m.start(), m.group().lower()) for m in _HEX_RUN.finditer(text)]
        runs += [(m.start(), re.sub(rb"[:\- ]", b"", m.group()).lower())
                 for m in _SEPARATED_HEX.finditer(text)]
        for at, run in runs:
            for start in range(len(run) - size + 1):
                label = hexes.get(run[start:start + size])
                if label is not None:
                    note(prefix + "hex DER slice", label, at, text)

    def _b64(self, prefix: str, text: bytes, note: _Note) -> None:
        needles = self.keys.b64
        for match in _B64_RUN.finditer(text):
            run = match.group().replace(b"-", b"+").replace(b"_", b"/")
            for size in (20, 21):
                for start in range(len(run) - size + 1):
                    label = needles.get(run[start:start + size])
                    if label is not None:
                        note(prefix + "base64 DER slice", label, match.start(), text)


# --- a process's files -----------------------------------------------------------------------

@dataclass(frozen=True)
class OpenFile:
    fd: int
    target: str


def open_files(pid: int) -> list[OpenFile]:
    """The descriptors of ``pid`` and what they name (``socket:[…]``, a path, ``/memfd:…``)."""
    out = []
    base = Path(f"/proc/{pid}/fd")
    for entry in base.iterdir():
        try:
            out.append(OpenFile(int(entry.name), os.readlink(entry)))
        except OSError:
            continue  # closed meanwhile
    return out


def is_memfd(target: str) -> bool:
    return target.startswith("/memfd:")


def read_open_file(pid: int, fd: int, limit: int = 8 << 20) -> bytes | None:
    """The content of a regular file ``pid`` holds open (deleted ones too), or None."""
    path = f"/proc/{pid}/fd/{fd}"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as handle:
            return handle.read(limit)
    except OSError:
        return None


def regular_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root`` (sockets, FIFOs and links skipped)."""
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                yield path

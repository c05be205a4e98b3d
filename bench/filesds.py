"""The file-based peer of the rotation benchmark: a helper that writes SVID files.

It does what spiffe-helper does beside an Envoy that reads its certificate from files: it
follows one workload's X.509-SVID (here from dev-spire's Delegated Identity API, by the
workload's selectors) and on every update writes three PEM files into a directory,
``svid.pem`` (the chain), ``svid_key.pem`` (PKCS#8, mode 0600) and ``svid_bundle.pem`` (the
trust domain's CAs), in that order, as spiffe-helper's ``WriteX509Context`` does. How each
file lands is the ``--mode``:

- ``inplace``: spiffe-helper's own way, Go's ``os.WriteFile``: open with O_TRUNC and write
  over the file that is there. No file is moved, so an Envoy watching the directory for
  moves (``path_config_source.watched_directory``) is never told.
- ``rename``: each file written to a temporary name in the directory, then renamed over
  the old one (the usual atomic-write fix): three moves, one per file, so a reader can see
  the new chain with the old key in between.
- ``swap``: Kubernetes' atomic writer (how a Secret volume is updated): the three files go
  into a fresh ``..<stamp>`` directory, a ``..data_tmp`` symlink to it is renamed over
  ``..data``, and the visible names are symlinks through ``..data``: one move swaps all.

Each write is logged to stdout as ``written <serial hex> <written at> <received at>``
(CLOCK_MONOTONIC seconds) so the benchmark can split the latency into its stages. Nothing else is
printed; the key is only ever in the files.

Run: ``python -m bench.filesds --socket ADMIN.sock --selector unix:uid:2101 --dir D --mode M``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.model import Selector, X509Svid
from agent.spire.backoff import BackoffPolicy
from agent.spire.client import DelegatedIdentityClient

MODES = ("inplace", "rename", "swap")
CERT, KEY, BUNDLE = "svid.pem", "svid_key.pem", "svid_bundle.pem"
_CERT_MODE, _KEY_MODE = 0o644, 0o600


def pem_certificates(ders: Sequence[bytes]) -> bytes:
    return b"".join(x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)
                    for der in ders)


def pem_key(pkcs8_der: bytes) -> bytes:
    """PKCS#8 DER as a ``PRIVATE KEY`` PEM block (what spiffe-helper writes), no parsing."""
    body = base64.encodebytes(pkcs8_der).replace(b"\n", b"")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN PRIVATE KEY-----\n" + b"\n".join(lines) + b"\n-----END PRIVATE KEY-----\n"


def _write_over(path: Path, data: bytes, mode: int) -> None:
    """Go's os.WriteFile: O_TRUNC then write, in place."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


class FileWriter:
    """Writes one SVID's three files into ``directory`` the way ``mode`` says."""

    def __init__(self, directory: Path, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; use one of {', '.join(MODES)}")
        self.directory = directory
        self.mode = mode
        self._stamps = itertools.count(1)

    def write(self, chain: Sequence[bytes], key_der: bytes, bundle: Sequence[bytes]) -> None:
        files = ((CERT, pem_certificates(chain), _CERT_MODE),
                 (KEY, pem_key(key_der), _KEY_MODE),
                 (BUNDLE, pem_certificates(bundle), _CERT_MODE))
        if self.mode == "inplace":
            for name, data, mode in files:
                _write_over(self.directory / name, data, mode)
        elif self.mode == "rename":
            for name, data, mode in files:
                temporary = self.directory / f".{name}.tmp"
                _write_over(temporary, data, mode)
                os.replace(temporary, self.directory / name)
        else:
            self._swap(files)

    def _swap(self, files: Sequence[tuple[str, bytes, int]]) -> None:
        data_link = self.directory / "..data"
        old = os.readlink(data_link) if data_link.is_symlink() else None
        stamp = f"..{os.getpid()}_{next(self._stamps)}"
        fresh = self.directory / stamp
        fresh.mkdir(mode=0o755)
        for name, data, mode in files:
            _write_over(fresh / name, data, mode)
        temporary = self.directory / "..data_tmp"
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        temporary.symlink_to(stamp)
        os.replace(temporary, data_link)
        for name, _, _ in files:
            visible = self.directory / name
            if not visible.is_symlink():
                visible.symlink_to(Path("..data") / name)
        if old is not None:
            shutil.rmtree(self.directory / old, ignore_errors=True)


async def follow(socket: str, selectors: Sequence[Selector], writer: FileWriter) -> None:
    """Writes the files on every SVID (or bundle) update until cancelled."""
    client = DelegatedIdentityClient(socket, backoff=BackoffPolicy(initial=0.02, maximum=0.2))
    state: dict[str, object] = {}
    changed = asyncio.Event()

    async def svids() -> None:
        async for update in client.subscribe_x509_svids(selectors=selectors):
            if update.svids:
                state["svid"] = update.svids[0]
                state["received"] = time.monotonic()
                changed.set()

    async def bundles() -> None:
        async for message in client.subscribe_x509_bundles():
            state["bundles"] = message.bundles
            changed.set()

    tasks = [asyncio.create_task(svids()), asyncio.create_task(bundles())]
    try:
        while True:
            await changed.wait()
            changed.clear()
            svid, all_bundles = state.get("svid"), state.get("bundles")
            if not isinstance(svid, X509Svid) or not isinstance(all_bundles, dict):
                continue
            bundle = all_bundles.get(f"spiffe://{svid.trust_domain}")
            if not bundle:
                continue
            writer.write(svid.cert_chain, svid.private_key, bundle)
            serial = x509.load_der_x509_certificate(svid.cert_chain[0]).serial_number
            received = state.get("received")
            sys.stdout.write(f"written {serial:x} {time.monotonic():.6f} "
                             f"{received if isinstance(received, float) else 0:.6f}\n")
            sys.stdout.flush()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()


async def _main(args: argparse.Namespace) -> None:
    writer = FileWriter(Path(args.dir), args.mode)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(follow(args.socket, [Selector.parse(s) for s in args.selector],
                                      writer))
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.filesds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True, help="dev-spire's admin socket")
    parser.add_argument("--selector", action="append", required=True,
                        help="the workload's selector, type:value (repeatable)")
    parser.add_argument("--dir", required=True, help="where the files go")
    parser.add_argument("--mode", choices=MODES, default="inplace")
    asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    main()

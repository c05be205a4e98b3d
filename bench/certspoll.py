"""Watches Envoys' ``/certs`` for a serial number, in its own process (rotation benchmark).

The rotation benchmark runs dev-spire in its own process; polling from there would make the
poll threads and dev-spire's event loop take turns on one GIL, and the rotation being timed
would wait for the pollers. So the polling happens here: one thread per Envoy, each on a
kept-alive HTTP/1.1 connection to that Envoy's admin port.

Protocol (one line each way per rotation): the benchmark writes ``<serial hex>``; when every
Envoy has shown it (or ``--timeout`` has passed) this prints ``seen <t1> <t2> ...``, the
CLOCK_MONOTONIC time of the first ``/certs`` answer showing it, per Envoy in the order of
the command line (``-`` for none). ``stats`` prints ``stats <mean ms per poll> ...``; end of
input ends the process.

Run: ``python -m bench.certspoll [--interval S] [--timeout S] HOST:PORT ...``
"""

from __future__ import annotations

import argparse
import http.client
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

_SERIAL = re.compile(rb'"serial_number":\s*"([0-9A-Fa-f]+)"')


class CertsPoller:
    """One Envoy's ``/certs`` on a kept-alive connection (one thread at a time)."""

    def __init__(self, address: str, interval: float) -> None:
        host, _, port = address.rpartition(":")
        self._host, self._port = host, int(port)
        self._interval = interval
        self._connection: http.client.HTTPConnection | None = None
        self.polls = 0
        self.poll_seconds = 0.0

    def get(self, path: str) -> bytes:
        """One GET on the kept-alive connection (made again after a failure)."""
        if self._connection is None:
            self._connection = http.client.HTTPConnection(self._host, self._port, timeout=5)
        try:
            self._connection.request("GET", path)
            return self._connection.getresponse().read()
        except (OSError, http.client.HTTPException):
            self._connection.close()
            self._connection = None
            raise

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()

    def serials(self) -> set[int]:
        started = time.monotonic()
        body = self.get("/certs")
        self.polls += 1
        self.poll_seconds += time.monotonic() - started
        return {int(m, 16) for m in _SERIAL.findall(body)}

    def wait_for(self, serial: int, timeout: float) -> float | None:
        """Monotonic time of the first answer showing ``serial``; None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if serial in self.serials():
                return time.monotonic()
            if time.monotonic() > deadline:
                return None
            time.sleep(self._interval)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.certspoll", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.002,
                        help="seconds between one Envoy's answer and the next poll")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("admins", nargs="+", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    pollers = [CertsPoller(address, args.interval) for address in args.admins]
    with ThreadPoolExecutor(max_workers=len(pollers)) as pool:
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                means = [p.poll_seconds / max(p.polls, 1) * 1000 for p in pollers]
                print("stats " + " ".join(f"{m:.4f}" for m in means), flush=True)
                continue
            serial = int(command, 16)
            waits = [pool.submit(p.wait_for, serial, args.timeout) for p in pollers]
            seen = [wait.result() for wait in waits]
            print("seen " + " ".join("-" if t is None else f"{t:.6f}" for t in seen),
                  flush=True)


if __name__ == "__main__":
    main()

"""The demo's terminal view: one compact table, redrawn in place on a terminal, printed as
plain lines (events as they happen, a status line now and then) otherwise."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["IdentityRow", "Screen", "render_table", "short_serial"]


def short_serial(serial: str) -> str:
    return serial if len(serial) <= 12 else f"{serial[:6]}..{serial[-4:]}"


@dataclass(frozen=True)
class IdentityRow:
    title: str
    spiffe_id: str
    serial: str | None
    seconds_left: float | None
    rotations: int


def render_table(rows: Sequence[IdentityRow], *, ok: int, failed: int, elapsed: float,
                 header: str, events: Sequence[str]) -> list[str]:
    """The whole screen as lines (no colours: readable in logs and CI output too)."""
    width_title = max((len(r.title) for r in rows), default=0)
    width_id = max((len(r.spiffe_id) for r in rows), default=0)
    lines = [header, f"running {elapsed:5.1f}s", "",
             f"  {'Envoy'.ljust(width_title)}  {'SPIFFE ID'.ljust(width_id)}  "
             f"{'serial':<14} {'left':>6}  rotations"]
    for row in rows:
        serial = short_serial(row.serial) if row.serial else "(waiting)"
        left = f"{row.seconds_left:5.1f}s" if row.seconds_left is not None else "     -"
        lines.append(f"  {row.title.ljust(width_title)}  {row.spiffe_id.ljust(width_id)}  "
                     f"{serial:<14} {left:>6}  {row.rotations:>9}")
    lines += ["", f"  pulls through the node proxy: {ok} ok, {failed} failed", ""]
    lines += [f"  {event}" for event in events]
    return lines


class Screen:
    """Draws frames: in place with ANSI on a terminal, else only what is new."""

    def __init__(self, *, interactive: bool, status_every: float = 5.0) -> None:
        self.interactive = interactive
        self.status_every = status_every
        self._last_status = 0.0
        self._printed_events = 0

    def event(self, line: str) -> None:
        """A one-off event (rotation, policy check): printed at once when not interactive."""
        if not self.interactive:
            print(line, flush=True)

    def frame(self, lines: Sequence[str], status: str) -> None:
        if self.interactive:
            print("\x1b[H\x1b[J" + "\n".join(lines), flush=True)
            return
        now = time.monotonic()
        if now - self._last_status >= self.status_every:
            self._last_status = now
            print(status, flush=True)

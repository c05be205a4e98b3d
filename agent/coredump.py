"""Keeps the agent's memory, which holds SVID private keys, out of core dump files."""

from __future__ import annotations

import logging
import resource

_LOG = logging.getLogger("spiffe_delegate.run")


def forbid_core_dumps() -> bool:
    """Sets the core file size limit to 0 (soft and hard), so a crash writes no core file
    holding private keys to the node's disk (containerd's default is unlimited; the kernel,
    and systemd-coredump behind a piped core_pattern, honour a zero limit). True if set."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        _LOG.warning("could not turn off core dumps (a crash could write private keys to "
                     "disk): %s", exc)
        return False
    return True

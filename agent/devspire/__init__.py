"""dev-spire: a SPIRE-agent-compatible Delegated Identity API server for development and tests."""

from agent.devspire.attestor import Attestor, locate_in_cgroup_file
from agent.devspire.entries import Entry, load_entries
from agent.devspire.faults import CORRUPT_MODES, RPCS, Faults
from agent.devspire.pods import Pod, PodList, load_pods
from agent.devspire.server import DevSpire, DevSpireSettings, serve_dev_spire
from agent.devspire.stats import Stats

__all__ = [
    "CORRUPT_MODES",
    "RPCS",
    "Attestor",
    "DevSpire",
    "DevSpireSettings",
    "Entry",
    "Faults",
    "Pod",
    "PodList",
    "Stats",
    "load_entries",
    "load_pods",
    "locate_in_cgroup_file",
    "serve_dev_spire",
]

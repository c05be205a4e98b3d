"""Every scenario of the reliability and security suite: what it does and what is promised.

Tests claim a scenario with ``@pytest.mark.scenario("<id>")`` (several tests may share one,
and one test may claim several). ``tests/conftest.py`` refuses unknown ids, and
``python -m tests.reliability.report`` turns a run into ``docs/reliability.md``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    id: str
    area: str
    scenario: str
    promise: str
    soak: bool = False  # run on demand only (pytest -m soak)


AREAS = ("SPIRE faults", "SDS abuse", "Attestation attacks", "Secrets", "Endurance",
         "Graceful shutdown")

_S = Scenario
SCENARIOS: tuple[Scenario, ...] = (
    # --- 1. SPIRE faults -------------------------------------------------------------------
    _S("spire.down-at-start", "SPIRE faults", "SPIRE's admin socket is missing when the agent "
       "starts", "the agent starts, says so once, and serves as soon as SPIRE appears"),
    _S("spire.killed-mid-stream", "SPIRE faults", "SPIRE is killed while streams are open",
       "every still-valid SVID keeps being served; streams resume by themselves"),
    _S("spire.restarted-repeatedly", "SPIRE faults", "SPIRE restarts again and again",
       "no SVID is lost or pushed twice; the agent recovers after each restart"),
    _S("spire.slow-answers", "SPIRE faults", "every SPIRE call is delayed",
       "served SVIDs stay; the slow first answers are warned about once per episode"),
    _S("spire.resource-exhausted-burst", "SPIRE faults", "a burst of RESOURCE_EXHAUSTED",
       "retried with backoff, logged once per episode, recovers"),
    _S("spire.unavailable-burst", "SPIRE faults", "a burst of UNAVAILABLE",
       "retried with backoff, logged once per episode, recovers"),
    _S("spire.response-over-4mb", "SPIRE faults", "SVID and bundle responses larger than 4 MB",
       "received and applied (gRPC's default 4 MB limit is raised)"),
    _S("spire.svid-malformed", "SPIRE faults", "SPIRE sends an unparsable SVID",
       "rejected, counted, the previous SVID kept and never replaced by the bad one"),
    _S("spire.svid-expired", "SPIRE faults", "SPIRE sends an expired SVID",
       "rejected; the previous SVID kept"),
    _S("spire.svid-not-yet-valid", "SPIRE faults", "SPIRE sends an SVID valid only later",
       "held back until it becomes valid; the previous SVID kept meanwhile"),
    _S("spire.svid-wrong-trust-domain", "SPIRE faults",
       "SPIRE sends an SVID from a foreign trust domain", "rejected; the previous SVID kept"),
    _S("spire.svid-key-mismatch", "SPIRE faults",
       "SPIRE sends a key that does not match the certificate", "rejected; the previous kept"),
    _S("spire.svid-wrong-san", "SPIRE faults",
       "the certificate's URI SAN differs from the SPIFFE ID", "rejected; the previous kept"),
    _S("spire.bundle-drops-ca-in-use", "SPIRE faults",
       "a bundle update drops the CA that signed the SVIDs in use",
       "the dropped CA stays in the bundles served while SVIDs in use chain to it (logged "
       "once); it goes once SPIRE re-issues them; nothing breaks"),
    _S("spire.bad-trust-domain-in-bundle", "SPIRE faults",
       "one federated trust domain's bundle is malformed",
       "only that trust domain is refused (its last good bundle kept, logged once); the "
       "others are applied"),
    # --- 2. SDS abuse ----------------------------------------------------------------------
    _S("sds.random-bytes", "SDS abuse", "random bytes on the SDS socket",
       "closed before gRPC sees it, logged once per process; others unaffected; no leak"),
    _S("sds.http1", "SDS abuse", "an HTTP/1.1 request on the SDS socket",
       "closed with a plain-text 400 naming http2_protocol_options; others unaffected"),
    _S("sds.tls-client-hello", "SDS abuse", "a TLS ClientHello on the SDS socket",
       "closed at once, logged once saying to drop TLS; other clients unaffected"),
    _S("sds.half-open", "SDS abuse", "connections that send half a request, or shut down "
       "their write side", "cleaned up; no task or descriptor is leaked"),
    _S("sds.idle-connections", "SDS abuse", "many idle connections",
       "at most --sds-max-connections, closed after the handshake or idle timeout"),
    _S("sds.unknown-type-url", "SDS abuse", "requests for unknown type URLs",
       "INVALID_ARGUMENT naming the type; other streams unaffected"),
    _S("sds.absurd-names", "SDS abuse", "absurdly long or binary resource names",
       "INVALID_ARGUMENT naming the limit (2048 bytes); quoted and cut in errors and logs"),
    _S("sds.thousands-of-names", "SDS abuse", "thousands of names in one request",
       "over 1,024: INVALID_ARGUMENT naming --sds-max-names; up to 1,024 answered"),
    _S("sds.client-never-reads", "SDS abuse", "a client that never reads its pushes",
       "its buffers fill without delaying anyone else's push"),
    _S("sds.concurrent-streams-1000", "SDS abuse", "1,000 concurrent SDS streams",
       "all served; a rotation reaches every stream"),
    _S("sds.client-vanishes-mid-push", "SDS abuse", "a client disappears during a push",
       "its stream is cleaned up; others unaffected"),
    _S("sds.envoy-throughout", "SDS abuse", "a real Envoy stays connected through the abuse",
       "it keeps its certificate and gets every rotation on time"),
    # --- 3. Attestation attacks -------------------------------------------------------------
    _S("attest.pid-reuse-before-call", "Attestation attacks",
       "the caller's PID is reused by another pod before the SPIRE call",
       "refused (the pidfd pinned at accept says the caller exited); SPIRE is not asked; "
       "no certificate reaches the other pod, whose own processes are still served"),
    _S("attest.pid-reuse-during-call", "Attestation attacks",
       "the caller's PID is reused while SPIRE is answering",
       "the call is dropped at the exit (pidfd), or SPIRE's answer about the new process is "
       "discarded (/proc re-check); no certificate reaches the other pod"),
    _S("attest.pid-reuse-after-call", "Attestation attacks",
       "the caller's PID is reused after SPIRE answered, before delivery",
       "the answer is discarded; no certificate reaches the other pod"),
    _S("attest.pid-reuse-during-stream", "Attestation attacks",
       "the caller's PID is reused while its stream is open",
       "the stream ends with its process; SPIRE's answer about the PID's new owner is "
       "discarded; later rotations never reach the connection"),
    _S("attest.cgroup-move", "Attestation attacks", "a process moves to another pod's cgroup",
       "its stream is refused at the next push: neither the other pod's SVID nor its old "
       "pod's rotations; its old pod is re-attested through another process"),
    _S("attest.exit-before-attestation", "Attestation attacks",
       "the caller exits before it is attested",
       "nothing is served; no cache entry, SPIRE stream, descriptor or task is left"),
    _S("attest.workload-names-untrusted", "Attestation attacks",
       "an untrusted caller asks for workload:<uid> names",
       "refused with PERMISSION_DENIED, logged; a caller without identity gets nothing; "
       "the pod named is never attested for them"),
    _S("attest.other-pid-namespace", "Attestation attacks",
       "the caller is in a PID namespace the agent cannot see",
       "a caller in a child PID namespace is attested as its host PID; one the agent cannot "
       "see (PID 0) is refused, the log saying why; nothing is served"),
    # --- 4. Secrets ------------------------------------------------------------------------
    _S("secrets.no-key-in-output", "Secrets",
       "every log line (text and JSON), metric and status output of a full run",
       "no private key material: no PEM, no DER, no 16-byte slice of any key (raw, hex, "
       "base64, escaped)"),
    _S("secrets.no-key-on-disk", "Secrets", "the agent's files during a full run",
       "private keys never touch the disk: none in any file the agents hold open or in their "
       "directories; no file written (strace); the metrics TLS key only in memfds"),
    _S("secrets.socket-and-file-modes", "Secrets", "socket and file modes",
       "as documented, whatever the umask: SDS socket 0666 (or 0660 and a group), its "
       "directory 0755, a 0700 private directory; dev-spire's socket 0770, keys.json 0600"),
    # --- 5. Endurance ----------------------------------------------------------------------
    _S("endurance.quick", "Endurance", "rotations across pods with Envoy attached (CI size)",
       "no RSS, descriptor or task growth; zero failed requests"),
    _S("endurance.soak", "Endurance",
       "10,000 rotations across 100 pods with Envoy attached",
       "RSS growth under 5 MB after warm-up; no descriptor or task growth; zero failures",
       soak=True),
    # --- 6. Graceful shutdown --------------------------------------------------------------
    _S("shutdown.sigterm-drains", "Graceful shutdown", "SIGTERM with streams open",
       "every SDS stream (Envoy's, SotW, delta) ends with OK before the exit, the socket "
       "file goes, status 0 within --shutdown-grace even with a client that never reads; "
       "SIGINT the same; a second signal ends the drain at once"),
    _S("shutdown.sigkill-restart", "Graceful shutdown", "SIGKILL, then a restart",
       "Envoy keeps serving mTLS with its certificate, the restarted agent replaces the "
       "stale socket, Envoy reconnects within its back-off, a rotation reaches it; no "
       "request fails"),
)

BY_ID: dict[str, Scenario] = {s.id: s for s in SCENARIOS}

"""Every timing of a pair, derived from ``[pair] heartbeat``/``dead_after``/``claim_wait`` in one place.

Why one place: the heartbeat process, the sync link and the takeover all depend on
``dead_after``, and they only work together in the right proportions (a stopped node must fall silent
long after a stalled one would, the link must not drop a connection for a stall the detector rides out). Spelled
out at each call site, one of them drifts; here each derived value says why it is what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config import PairConfig


@dataclass(frozen=True)
class PairTimings:
    """The pair's timings in seconds; build with :meth:`from_config`."""

    heartbeat: float
    dead_after: float
    claim_wait: float

    @classmethod
    def from_config(cls, pair: PairConfig) -> "PairTimings":
        return cls(heartbeat=pair.heartbeat, dead_after=pair.dead_after, claim_wait=pair.claim_wait)

    # -- failure detection (proxy.heartbeat, sync.detector) ---------------------------------------
    @property
    def detector_tick(self) -> float:
        """How often the node's detector task looks at the link's refusals and the clock (the verdicts
        themselves come from the heartbeat process the moment it sees the silence)."""
        return 0.05

    @property
    def unheard_peer_after(self) -> float:
        """A starting node acts on a death verdict only once it has heard the peer's heartbeats (a peer
        not heard yet may be starting, slower); a peer never heard for this long since the node started
        is down, and its silence counts. 30 s at least: the lab saw Python starts of 10-20 s under load."""
        return max(30.0, 10 * self.claim_wait)

    @property
    def link_only_dead_after(self) -> float:
        """A peer heard on the sync link but never by the heartbeat process (killed right after its
        start) is dead once the link is down and silent this long. Longer than ``dead_after``: a live
        peer's service-path heartbeats can flow only once both nodes hold their service addresses (their
        claims) and take an echo round trip to count, so a sync network cut right after the start is
        silence on both paths for up to about a claim (the lab saw 540 ms, and a false takeover with
        dead_after as the bound). Two claim_waits, at least dead_after."""
        return max(self.dead_after, 2 * self.claim_wait)

    @property
    def heartbeat_hold_limit(self) -> float:
        """A starting stateful node heartbeats (and dials the link) only once its observer's capture
        rings exist, at most this long: setting up 3 x 128 MiB of TPACKET rings runs ~300 ms in the
        kernel without preemption on this machine (bench/results/stateful-start-stall-2026-11-28.txt), so a
        node heartbeating meanwhile fell silent for that long and its peer took it over. Past this the
        node heartbeats anyway (an observer that never starts must not keep the node out of the pair)."""
        return 30.0

    @property
    def loop_stall_limit(self) -> float:
        """The heartbeat process stops sending when the node's loop has not written to it this long: a
        hung loop (the process runs, its trio loop does not) must look dead to the peer. A *stopped*
        node (SIGSTOP, a debugger) or an exiting one falls silent at once instead: the heartbeat process
        reads its state in /proc before every send. Far longer than ``dead_after``: a loop busy for
        tens of ms (GC, a big status) is a stall the heartbeats must ride out, which is why they are sent
        from their own process. 3 s (50 ``dead_after`` for slow detectors): the detection soak
        (bench/FAILOVER.md, 2026-11-27) saw a healthy node's loop stall over 1 s on a shared 2-core
        machine at load 60, and each such stall was a false takeover with a 1 s limit."""
        return max(3.0, 50 * self.dead_after)

    # -- the sync link (sync.link) ---------------------------------------------------------------
    @property
    def link_heartbeat(self) -> float:
        """The sync link's own heartbeat (round trips for status, and idle detection): no longer the
        failure detector's input, so not faster than every 25 ms, which the node's loop pays for."""
        return max(self.heartbeat, 0.025)

    @property
    def link_idle_timeout(self) -> float:
        """A link connection silent this long is dropped (a half-open one must not block a fresh one for
        long). At least half a second: the link runs in the node's loop, and dropping it for a loop
        stall would cost a reconnect and a hello for nothing; the takeover does not wait for it."""
        return max(3 * self.dead_after, 0.5)

    # -- the stateful observer (proxy.standby) ---------------------------------------------------
    @property
    def observer_timeout(self) -> float:
        """Longest wait for the observer on the takeover's path (and in the decision task): a stuck
        observer costs a takeover at most this, and the takeover goes on without what it would have
        said (a stateless takeover)."""
        return self.dead_after

    @property
    def prepared_takeover_max_age(self) -> float:
        """A prefetched list of the peer's connections is used at takeover only if fetched within this
        (and after the last heartbeat); older, it is fetched again."""
        return self.dead_after

    digest_every: float = 0.25  # stateful: how often the owner sends the digest of its own address
    status_observer_timeout: float = 2.0  # status may wait longer than a takeover, but not forever

    own_stuck_warn_every: float = 30.0  # the warning about an own address not served, repeated this often

    # -- an own address not served (proxy.roles, issue 9.7) ---------------------------------------
    @property
    def own_stuck_after(self) -> float:
        """Claiming or yielded this long is no start-up or hand-back any more (both take about one
        claim_wait): the node warns, at most every :attr:`own_stuck_warn_every`, and status says why."""
        return 5 * self.claim_wait

    # -- takeover retries (proxy.roles) ----------------------------------------------------------
    @property
    def takeover_retry_first(self) -> float:
        """First backoff after a takeover failed on a kernel error (doubling up to :attr:`takeover_retry_max`)."""
        return max(self.dead_after / 2, 0.02)

    @property
    def takeover_retry_max(self) -> float:
        return max(1.0, 10 * self.dead_after)
